"""A directory library on a folder that has become read only (a mount
remounted read only after an error, an LTFS tape write-protected): a pack
or a label it refuses is one clear error naming the volume, never a
traceback about the clean-up that followed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import StorageError
from appliance.storage.volumes import open_library

MiB = 1 << 20


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder the test fills, then makes read only with a bind mount (a
    chmod does not stop root, which the suite may run as)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    folder = tmp_path / "library"
    folder.mkdir()
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def make_read_only(folder: Path) -> None:
    for command in (
        ["mount", "--bind", str(folder), str(folder)],
        ["mount", "-o", "remount,ro,bind", str(folder)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")


def test_a_pack_refused_by_a_read_only_volume_is_a_storage_error(read_only):
    library = open_library("directory", {"path": str(read_only)})
    library.label("VOL001", 4 * MiB)
    make_read_only(read_only)

    with pytest.raises(StorageError, match="cannot write to volume VOL001"):
        library.write_pack("VOL001", "p-000001", [b"pack bytes"])

    assert library.list_packs("VOL001") == []


def test_labelling_in_a_read_only_library_is_one_line(read_only, tmp_path):
    make_read_only(read_only)
    command = [sys.executable, "-m", "appliance", "volumes", "label", "L00001"]
    command += ["--capacity", "1G", "--data-dir", str(tmp_path / "data")]
    (tmp_path / "app.toml").write_text(f'[volumes]\npath = "{read_only}"\n')
    command += ["--config", str(tmp_path / "app.toml")]

    labelled = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert labelled.returncode == 1
    assert "Traceback" not in labelled.stderr
    assert labelled.stderr.strip().splitlines() == [
        f"cannot label L00001: {read_only / 'L00001'}: Read-only file system"
    ]
    assert list(read_only.iterdir()) == []
