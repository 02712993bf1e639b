"""An empty catalog folder (made by hand, or the mount point of a catalog
disk that is not mounted) is no archive: the commands that need one say so
in one line, exit 1, and make nothing, neither a new catalog nor the tiers
around it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [
    ("status",),
    ("migrate", "--dry-run"),
    ("volumes", "label", "VOL001", "--capacity", "1G"),
    ("recall", "1.2.826.0.1.3680043.10.1009.1"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_an_empty_catalog_folder_is_no_archive(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "catalog").mkdir(parents=True)
    command = [sys.executable, "-m", "appliance", *args, "--data-dir", str(data_dir)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"no catalog at {data_dir / 'catalog'}: the folder holds none (nothing "
        "stored yet, its disk not mounted, or --data-dir / --config point "
        "elsewhere)"
    ]
    assert [p.name for p in data_dir.rglob("*")] == ["catalog"]
