"""``appliance migrate`` pointed at a folder that holds no archive (a
mistyped --data-dir, the wrong --config) says so in one line and exits 1,
and leaves nothing behind there: no lock file, no folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.catalog.store import Catalog


@pytest.mark.parametrize("flag", ["--dry-run", "--now"])
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_migrate_without_an_archive_is_one_line(
    tmp_path: Path, flag: str, exists: bool
) -> None:
    data_dir = tmp_path / "not-an-archive"
    if exists:
        data_dir.mkdir()
    command = [sys.executable, "-m", "appliance", "migrate", flag]
    command += ["--data-dir", str(data_dir)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"no catalog at {data_dir / 'catalog'}: nothing stored yet, or "
        "--data-dir / --config point elsewhere"
    ]
    assert data_dir.exists() == exists
    assert not exists or list(data_dir.iterdir()) == []


@pytest.mark.parametrize("flag", ["--dry-run", "--now"])
def test_migrate_with_a_catalog_elsewhere_and_no_data_dir_is_one_line(
    tmp_path: Path, flag: str
) -> None:
    """With storage.catalog_path set, the catalog is found whatever
    --data-dir says: a mistyped one is refused all the same."""
    catalog = tmp_path / "ssd" / "catalog"
    Catalog(catalog, 2**24).close()
    config = tmp_path / "appliance.toml"
    config.write_text(f'[storage]\ncatalog_path = "{catalog}"\n')
    data_dir = tmp_path / "not-an-archive"
    command = [sys.executable, "-m", "appliance", "migrate", flag]
    command += ["--config", str(config), "--data-dir", str(data_dir)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"no data directory {data_dir} for the catalog at {catalog}: "
        "--data-dir / --config point elsewhere"
    ]
    assert not data_dir.exists()
