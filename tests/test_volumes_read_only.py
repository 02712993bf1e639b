"""A directory library on a folder that has become read only (a mount
remounted read only after an error, an LTFS tape write-protected): a pack
or a label it refuses is one clear error naming the volume, never a
traceback about the clean-up that followed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import StorageError
from appliance.overview import volume_rows
from appliance.storage.volumes import open_library
from tests.conftest import new_archive
from tests.read_only import need_root, read_only

MiB = 1 << 20


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The library's folder, to be made read only."""
    need_root()
    made = tmp_path / "library"
    made.mkdir()
    return made


def test_a_pack_refused_by_a_read_only_volume_is_a_storage_error(folder):
    library = open_library("directory", {"path": str(folder)})
    library.label("VOL001", 4 * MiB)

    with read_only(folder):
        with pytest.raises(StorageError, match="cannot write to volume VOL001"):
            library.write_pack("VOL001", "p-000001", [b"pack bytes"])
        assert library.list_packs("VOL001") == []


def test_labelling_in_a_read_only_library_is_one_line(folder, tmp_path):
    new_archive(tmp_path / "data")
    command = [sys.executable, "-m", "appliance", "volumes", "label", "L00001"]
    command += ["--capacity", "1G", "--data-dir", str(tmp_path / "data")]
    (tmp_path / "app.toml").write_text(f'[volumes]\npath = "{folder}"\n')
    command += ["--config", str(tmp_path / "app.toml")]

    with read_only(folder):
        labelled = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert labelled.returncode == 1
    assert "Traceback" not in labelled.stderr
    assert labelled.stderr.strip().splitlines() == [
        f"cannot label L00001: {folder / 'L00001'}: Read-only file system"
    ]
    assert list(folder.iterdir()) == []


def test_a_read_only_volume_is_listed_read_only(folder, tmp_path):
    """Seen without writing to it: the administrator learns why packs pass
    the volume over, in the list and in its JSON rows."""
    library = open_library("directory", {"path": str(folder)})
    library.label("VOL001", 4 * MiB)
    library.label("VOL002", 4 * MiB)
    (tmp_path / "app.toml").write_text(f'[volumes]\npath = "{folder}"\n')
    command = [sys.executable, "-m", "appliance", "volumes", "list"]
    command += ["--config", str(tmp_path / "app.toml")]
    command += ["--data-dir", str(tmp_path / "data")]

    with read_only(folder / "VOL001"):
        rows = volume_rows(library)
        listed = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert {row["label"]: row["read_only"] for row in rows} == {
        "VOL001": True,
        "VOL002": False,
    }
    assert listed.returncode == 0, listed.stderr
    states = {
        line.split()[1]: line for line in listed.stdout.splitlines() if "VOL00" in line
    }
    assert "loaded, read only" in states["VOL001"]
    assert "read only" not in states["VOL002"]
    assert list((folder / "VOL001" / "incoming").iterdir()) == []
