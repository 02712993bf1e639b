"""``appliance volumes label --capacity``: a figure without its unit ("2"
meant as 2T) would label a volume of 2 bytes, which takes no pack and
cannot be labelled again; it is refused, and nothing is labelled."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.overview import volume_rows
from appliance.storage.volumes.directory import DirectoryLibrary
from tests.conftest import new_archive


def volumes(*args: str, folder: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", "volumes", *args]
    command += ["--data-dir", str(folder / "data")]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("capacity", ["2", "800", "999999", "0.5M"])
def test_a_capacity_below_a_megabyte_is_refused(tmp_path: Path, capacity) -> None:
    labelled = volumes("label", "L00001", "--capacity", capacity, folder=tmp_path)
    listed = volumes("list", folder=tmp_path)

    assert labelled.returncode == 2
    assert "at least 1M" in labelled.stderr
    assert "L00001" not in listed.stdout


@pytest.mark.parametrize(
    ("capacity", "shown"), [("1M", "1.0 MB"), ("2T", "2.0 TB"), ("400G", "400.0 GB")]
)
def test_a_capacity_with_its_unit_is_taken(tmp_path: Path, capacity, shown) -> None:
    new_archive(tmp_path / "data")
    labelled = volumes("label", "L00002", "--capacity", capacity, folder=tmp_path)

    assert labelled.returncode == 0, labelled.stderr
    assert f"volume L00002 labelled, {shown} for packs" in labelled.stdout


def test_the_room_listed_is_no_more_than_the_disk_has(tmp_path: Path) -> None:
    library = DirectoryLibrary(tmp_path / "volumes")
    library.label("L00003", 2**60)  # an exbibyte: more than any test disk
    disk_free = shutil.disk_usage(tmp_path).free

    [row] = volume_rows(library)

    assert row["capacity_bytes"] == 2**60
    assert 0 < row["free_bytes"] <= disk_free


def test_labelling_where_there_is_no_archive_is_refused(tmp_path: Path) -> None:
    # A mistyped --data-dir: the label would name a new archive, on tape for
    # good.
    labelled = volumes("label", "L00004", "--capacity", "1G", folder=tmp_path)

    assert labelled.returncode == 1
    assert labelled.stderr.startswith("no catalog at ")
    assert not (tmp_path / "data").exists()


def test_a_label_with_a_line_break_is_refused_in_one_line(tmp_path: Path) -> None:
    new_archive(tmp_path / "data")

    labelled = volumes("label", "L2\nX", "--capacity", "1G", folder=tmp_path)

    assert labelled.returncode == 1
    [line] = labelled.stderr.splitlines()
    assert line.startswith("cannot label L2\\x0aX: ")
