"""``appliance migrate`` pointed at a folder that holds no archive (a
mistyped --data-dir, the wrong --config) says so in one line and exits 1,
and leaves nothing behind there: no lock file, no folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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
