"""What only the optical library does: undoing appends, MD5 checks,
finalising, adopting images; against the real xorriso."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.errors import SpoolError, VolumeError, VolumeFull
from appliance.storage.volumes.optical import OpticalLibrary
from appliance.storage.volumes.xorriso import Xorriso
from tests.read_only import read_only

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("xorriso") is None,
    reason="xorriso is not installed (apt-get install xorriso)",
)


@pytest.fixture
def library(tmp_path: Path) -> OpticalLibrary:
    library = OpticalLibrary(tmp_path / "discs")
    library.label("DISC01", 16 * MiB)
    return library


def image_of(library: OpticalLibrary, label: str = "DISC01") -> Path:
    return library.path / f"{label}.iso"


class FailingVerify(Xorriso):
    def verify(self, image: Path, iso_path: str) -> None:
        raise VolumeError("simulated MD5 mismatch")


def test_an_append_that_fails_its_check_is_undone(library):
    first = library.write_pack("DISC01", "p-1", [b"first"])
    before = image_of(library).read_bytes()
    library.xorriso = FailingVerify()

    with pytest.raises(VolumeError, match="simulated"):
        library.write_pack("DISC01", "p-2", [b"second" * 1000])

    assert image_of(library).read_bytes() == before
    library.xorriso = Xorriso()
    assert library.list_packs("DISC01") == [first]
    assert list(library.staging.iterdir()) == []


def test_an_append_cut_by_a_crash_is_undone_on_opening(library, monkeypatch):
    library.write_pack("DISC01", "p-1", [b"first"])
    before = image_of(library).read_bytes()
    library.xorriso = FailingVerify()
    # A crash leaves the journal: the in-process undo never runs.
    monkeypatch.setattr(OpticalLibrary, "_roll_back", lambda self, volume: None)
    with pytest.raises(VolumeError):
        library.write_pack("DISC01", "p-2", [b"second" * 1000])
    assert image_of(library).read_bytes() != before
    monkeypatch.undo()

    reopened = OpticalLibrary(library.path)

    assert image_of(library).read_bytes() == before
    assert [p.pack_id for p in reopened.list_packs("DISC01")] == ["p-1"]
    assert list(reopened.staging.iterdir()) == []


def test_a_pack_altered_in_the_image_fails_its_md5(library):
    location = library.write_pack("DISC01", "p-1", [b"ABCDEFGH" * 4096])
    image = image_of(library)
    raw = image.read_bytes()
    image.write_bytes(raw.replace(b"ABCDEFGH" * 8, b"ABCDEFGX" + b"ABCDEFGH" * 7, 1))

    with pytest.raises(VolumeError, match="MD5"):
        b"".join(library.read_pack(location))
    assert list(library.staging.iterdir()) == []


def test_a_finalised_volume_takes_no_more_packs(library):
    location = library.write_pack("DISC01", "p-1", [b"burn me"])

    library.finalise("DISC01")

    assert library.free_bytes("DISC01") == 0
    assert library.list_volumes()[0].full
    with pytest.raises(VolumeFull, match="DISC01"):
        library.write_pack("DISC01", "p-2", [b"late"])
    assert b"".join(library.read_pack(location)) == b"burn me"


def test_a_pack_that_does_not_fit_finalises_the_volume(library):
    with pytest.raises(VolumeFull):
        library.write_pack("DISC01", "p-1", [b"x" * 20 * MiB])

    assert library.list_volumes()[0].full


def test_an_image_from_another_library_is_adopted(library, tmp_path):
    location = library.write_pack("DISC01", "p-1", [b"carried over"])
    (tmp_path / "other").mkdir()
    shutil.copy(image_of(library), tmp_path / "other" / "DISC01.iso")

    other = OpticalLibrary(tmp_path / "other")

    [info] = other.list_volumes()
    assert (info.label, info.capacity, info.reachable) == ("DISC01", 16 * MiB, True)
    assert b"".join(other.read_pack(location)) == b"carried over"


def test_the_image_is_plain_iso_9660_with_md5(library):
    library.write_pack("DISC01", "p-1", [b"data"])

    Xorriso().verify_all(image_of(library))
    assert Xorriso().list_files(image_of(library), "/") == {
        "VOLUME": len(image_volume_file(library))
    }
    assert b'"capacity": 16777216' in image_volume_file(library)


def image_volume_file(library: OpticalLibrary) -> bytes:
    destination = library.staging / "volume-copy"
    Xorriso().extract(image_of(library), "/VOLUME", destination)
    data = destination.read_bytes()
    destination.unlink()
    return data


def test_an_image_whose_label_names_no_capacity_is_ignored(tmp_path, caplog):
    """A label edited by hand (or written by something else) is not taken
    on trust: the image is left out with one warning, and the other
    volumes are still listed."""
    written = OpticalLibrary(tmp_path / "written")
    real = written.label_fields
    written.label_fields = lambda volume, capacity: {  # type: ignore[method-assign]
        **real(volume, capacity),
        "capacity": "big",
    }
    written.label("DISC07", 16 * MiB)
    (tmp_path / "other").mkdir()
    shutil.copy(written.path / "DISC07.iso", tmp_path / "other" / "DISC07.iso")
    other = OpticalLibrary(tmp_path / "other")
    other.label("DISC08", 16 * MiB)

    listed = other.list_volumes()

    assert [info.label for info in listed] == ["DISC08"]
    assert "its label names no usable capacity" in caplog.text


def test_an_image_that_may_not_be_written_is_listed_read_only(library):
    library.label("DISC02", 16 * MiB)

    with read_only(image_of(library)):
        listed = {info.label: info.read_only for info in library.list_volumes()}

    assert listed == {"DISC01": True, "DISC02": False}


def test_a_read_only_staging_folder_is_named_not_the_volumes(library):
    """Labels and packs pass through the staging folder: while it may not be
    written, every use of the library says so and what to do, and no disc
    is called unreadable or on the shelf."""
    location = library.write_pack("DISC01", "p-1", [b"first"])
    image = image_of(library).read_bytes()
    staging = str(library.staging)

    with read_only(library.staging):
        with pytest.raises(SpoolError) as written:
            library.write_pack("DISC01", "p-2", [b"second"])
        with pytest.raises(SpoolError) as read:
            library.read_pack(location)
        reopened = OpticalLibrary(library.path, recover=False)
        with pytest.raises(SpoolError) as listed:
            reopened.list_volumes()
        with pytest.raises(SpoolError) as labelled:
            reopened.label("DISC02", 16 * MiB)

    for raised in (written, read, listed, labelled):
        message = str(raised.value)
        assert f"staging folder {staging} is on a file system mounted read " in message
        assert "the volumes are not at fault); remount it read-write" in message
        assert "DISC01" not in message
    assert image_of(library).read_bytes() == image
    assert b"".join(library.read_pack(location)) == b"first"
