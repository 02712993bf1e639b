"""The conformance suite every offline volume backend passes.

Backends: directory folders, tape through the simulated drive and changer
(tapefake.py, the same interfaces as st and mtx), and optical images made
by the real xorriso (skipped, saying why, when xorriso is not installed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import ConfigError, VolumeError, VolumeFull, VolumeNotReachable
from appliance.storage.volumes import PackLocation, VolumeLibrary, open_library
from appliance.storage.volumes.directory import DirectoryLibrary

MiB = 1 << 20
RECORD_SIZE = 64 * 1024
CARTRIDGE_CAPACITY = 512 * MiB


def pack_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int = 7777) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def read_all(library: VolumeLibrary, location: PackLocation) -> bytes:
    return b"".join(library.read_pack(location))


class Backend:
    """How one kind of library is set up, and what a person does to it."""

    kind = ""

    def __init__(self, root: Path) -> None:
        self.root = root

    def settings(self) -> dict[str, object]:
        raise NotImplementedError

    def open(self, archive: str = "") -> VolumeLibrary:
        return open_library(self.kind, self.settings(), archive=archive)

    def medium(self, library: VolumeLibrary, label: str) -> Path:
        """The file or folder that stands for the medium ``label``."""
        raise NotImplementedError

    def add_blank(self, library: VolumeLibrary, label: str) -> None:
        """Make a blank medium named ``label`` available for labelling."""

    def shelve(self, library: VolumeLibrary, label: str) -> None:
        raise NotImplementedError

    def unshelve(self, library: VolumeLibrary, label: str) -> None:
        raise NotImplementedError

    def leftovers(self) -> list[Path]:
        """Temporary files the backend should not leave behind."""
        return []


class DirectoryBackend(Backend):
    kind = "directory"

    def settings(self) -> dict[str, object]:
        return {"path": str(self.root / "library")}

    def shelve(self, library: VolumeLibrary, label: str) -> None:
        (self.root / "shelf").mkdir(exist_ok=True)
        shutil.move(self.root / "library" / label, self.root / "shelf" / label)

    def unshelve(self, library: VolumeLibrary, label: str) -> None:
        shutil.move(self.root / "shelf" / label, self.root / "library" / label)

    def leftovers(self) -> list[Path]:
        return list((self.root / "library").glob("*/incoming/*"))

    def medium(self, library: VolumeLibrary, label: str) -> Path:
        return self.root / "library" / label


class TapeBackend(Backend):
    kind = "tape"

    def settings(self) -> dict[str, object]:
        return {
            "simulated_path": str(self.root / "simulated"),
            "state_path": str(self.root / "state"),
            "record_size": RECORD_SIZE,
        }

    def add_blank(self, library: VolumeLibrary, label: str) -> None:
        library.changer.insert_cartridge(label, CARTRIDGE_CAPACITY)

    def shelve(self, library: VolumeLibrary, label: str) -> None:
        changer = library.changer
        if changer.status().drive_of(label):
            library.unload()
        changer.remove_cartridge(label)

    def unshelve(self, library: VolumeLibrary, label: str) -> None:
        library.changer.insert_cartridge(label, CARTRIDGE_CAPACITY)

    def medium(self, library: VolumeLibrary, label: str) -> Path:
        # Out of the drive first: a person swaps cartridges in their slots.
        if library.changer.status().drive_of(label):
            library.unload()
        return library.changer.cartridge_path(label)


class OpticalBackend(Backend):
    kind = "optical"

    def settings(self) -> dict[str, object]:
        return {"path": str(self.root / "discs")}

    def shelve(self, library: VolumeLibrary, label: str) -> None:
        (self.root / "shelf").mkdir(exist_ok=True)
        shutil.move(self.root / "discs" / f"{label}.iso", self.root / "shelf")

    def unshelve(self, library: VolumeLibrary, label: str) -> None:
        shutil.move(self.root / "shelf" / f"{label}.iso", self.root / "discs")

    def leftovers(self) -> list[Path]:
        return list((self.root / "discs" / ".staging").iterdir())

    def medium(self, library: VolumeLibrary, label: str) -> Path:
        return self.root / "discs" / f"{label}.iso"


BACKENDS = {
    "directory": DirectoryBackend,
    "tape": TapeBackend,
    "optical": OpticalBackend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "optical" and shutil.which("xorriso") is None:
        pytest.skip("xorriso is not installed (apt-get install xorriso)")
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
def library(backend: Backend) -> VolumeLibrary:
    return backend.open()


def labelled(backend: Backend, library: VolumeLibrary, label: str, capacity: int):
    backend.add_blank(library, label)
    return library.label(label, capacity)


def test_label_makes_a_reachable_empty_volume(backend, library):
    info = labelled(backend, library, "VOL001", 64 * MiB)

    assert (info.label, info.capacity, info.reachable, info.full) == (
        "VOL001",
        64 * MiB,
        True,
        False,
    )
    assert [v.label for v in library.list_volumes()] == ["VOL001"]
    assert library.is_reachable("VOL001")
    assert 0 < library.free_bytes("VOL001") <= 64 * MiB
    assert library.list_packs("VOL001") == []


def test_a_labelled_volume_is_never_labelled_again(backend, library):
    labelled(backend, library, "VOL001", 64 * MiB)

    with pytest.raises(VolumeError, match="VOL001"):
        library.label("VOL001", 64 * MiB)


def test_names_that_could_leave_the_library_are_refused(backend, library):
    labelled(backend, library, "VOL001", 64 * MiB)

    with pytest.raises(ValueError, match="label"):
        library.label("../VOL001", MiB)
    with pytest.raises(ValueError, match="pack id"):
        library.write_pack("VOL001", "../p-1", [b"x"])


@pytest.mark.parametrize(
    "size",
    [0, 1, 1000, RECORD_SIZE - 1, RECORD_SIZE, RECORD_SIZE + 1, 3 * MiB + 17],
)
def test_packs_read_back_byte_identical(backend, library, size):
    labelled(backend, library, "VOL001", 64 * MiB)
    data = pack_bytes(size, seed=size)

    location = library.write_pack("VOL001", "p-000001", chunked(data))

    assert (location.volume, location.pack_id, location.size) == (
        "VOL001",
        "p-000001",
        size,
    )
    assert location.sha256 == hashlib.sha256(data).hexdigest()
    assert read_all(library, location) == data
    assert b"".join(library.read_pack(location, check=False)) == data
    assert library.list_packs("VOL001") == [location]


def test_many_packs_keep_their_order(backend, library):
    labelled(backend, library, "VOL001", 128 * MiB)
    written = {}
    for number in range(1, 31):
        data = pack_bytes(number * 911, seed=number)
        written[library.write_pack("VOL001", f"p-{number:06d}", [data])] = data

    listed = library.list_packs("VOL001")

    assert listed == list(written)
    assert [loc.position for loc in listed] == sorted({loc.position for loc in listed})
    for location in listed[::7]:
        assert read_all(library, location) == written[location]
    used = library.list_volumes()[0].used
    assert used >= sum(len(data) for data in written.values())


def test_volume_full_mid_pack_leaves_no_pack(backend, library):
    labelled(backend, library, "VOL002", 2 * MiB)
    labelled(backend, library, "VOL003", 64 * MiB)
    small = library.write_pack("VOL002", "p-000001", [b"small pack"])
    big = pack_bytes(6 * MiB, seed=6)
    consumed = []

    def chunks() -> Iterator[bytes]:
        for chunk in chunked(big, 256 * 1024):
            consumed.append(len(chunk))
            yield chunk

    with pytest.raises(VolumeFull, match="VOL002"):
        library.write_pack("VOL002", "p-000002", chunks())

    assert 0 < sum(consumed) < len(big), "the pack was not streamed"
    assert library.list_packs("VOL002") == [small]
    guessed = PackLocation(
        "VOL002",
        small.position + 1,
        "p-000002",
        len(big),
        hashlib.sha256(big).hexdigest(),
    )
    with pytest.raises(VolumeError):
        read_all(library, guessed)
    assert read_all(library, small) == b"small pack"
    assert backend.leftovers() == []

    elsewhere = library.write_pack("VOL003", "p-000002", chunked(big))
    assert read_all(library, elsewhere) == big


def test_a_failing_source_leaves_no_pack(backend, library):
    labelled(backend, library, "VOL001", 64 * MiB)

    def broken() -> Iterator[bytes]:
        yield pack_bytes(200_000, seed=1)
        raise RuntimeError("source vanished")

    with pytest.raises(RuntimeError, match="source vanished"):
        library.write_pack("VOL001", "p-000001", broken())

    assert library.list_packs("VOL001") == []
    assert backend.leftovers() == []
    location = library.write_pack("VOL001", "p-000001", [b"second try"])
    assert read_all(library, location) == b"second try"


def test_a_volume_on_the_shelf_is_not_reachable(backend, library):
    labelled(backend, library, "VOL004", 64 * MiB)
    labelled(backend, library, "VOL005", 64 * MiB)
    location = library.write_pack("VOL004", "p-000001", [b"kept safe"])

    backend.shelve(library, "VOL004")

    assert not library.is_reachable("VOL004")
    states = {v.label: v.reachable for v in library.list_volumes()}
    assert states == {"VOL004": False, "VOL005": True}
    assert library.free_bytes("VOL004") > 0
    with pytest.raises(VolumeNotReachable, match="VOL004"):
        library.write_pack("VOL004", "p-000002", [b"more"])
    with pytest.raises(VolumeNotReachable, match="VOL004"):
        library.read_pack(location)
    with pytest.raises(VolumeNotReachable, match="VOL004"):
        library.list_packs("VOL004")

    library.write_pack("VOL005", "p-000002", [b"still writable"])
    backend.unshelve(library, "VOL004")
    assert library.is_reachable("VOL004")
    assert read_all(library, location) == b"kept safe"


def test_an_unknown_volume_is_an_error(backend, library):
    with pytest.raises(VolumeError, match="NOPE01"):
        library.write_pack("NOPE01", "p-000001", [b"x"])
    assert not library.is_reachable("NOPE01")


def test_a_new_library_object_sees_the_same_volumes_and_packs(backend, library):
    labelled(backend, library, "VOL001", 64 * MiB)
    labelled(backend, library, "VOL002", 32 * MiB)
    first = library.write_pack("VOL001", "p-000001", [pack_bytes(100_000, seed=1)])
    second = library.write_pack("VOL002", "p-000002", [pack_bytes(5, seed=2)])

    reopened = backend.open()

    assert reopened.list_volumes() == library.list_volumes()
    assert reopened.list_packs("VOL001") == [first]
    assert reopened.list_packs("VOL002") == [second]
    assert read_all(reopened, first) == pack_bytes(100_000, seed=1)
    third = reopened.write_pack("VOL001", "p-000003", [b"after reopening"])
    assert third.position > first.position


# Archive ids (made-up), as volume labels name them.
MINE = "3f1e0c4a-6b2d-4c8e-9a7f-1d2e3f4a5b6c"
THEIRS = "8a9b0c1d-2e3f-4a5b-8c7d-9e0f1a2b3c4d"


def swap_media(
    backend: Backend, library: VolumeLibrary, other: Backend, theirs: VolumeLibrary
) -> Path:
    """Put ``theirs``'s VOL001 in place of ``library``'s, which goes to the
    shelf folder; the shelf folder."""
    shelf = backend.root / "own-shelf"
    shelf.mkdir()
    ours = backend.medium(library, "VOL001")
    shutil.move(ours, shelf / ours.name)
    foreign = other.medium(theirs, "VOL001")
    copy = shutil.copytree if foreign.is_dir() else shutil.copyfile
    copy(foreign, ours)
    return shelf


def test_another_archives_volume_of_the_same_label_is_not_the_volume(backend, tmp_path):
    library = backend.open(archive=MINE)
    labelled(backend, library, "VOL001", 64 * MiB)
    own = library.write_pack("VOL001", "p-000001", [b"this archive's pack"])
    other = type(backend)(tmp_path / "other")
    theirs = other.open(archive=THEIRS)
    labelled(other, theirs, "VOL001", 64 * MiB)
    theirs.write_pack("VOL001", "p-000001", [b"another archive's pack"])

    shelf = swap_media(backend, library, other, theirs)
    medium = backend.medium(library, "VOL001")
    before = sorted(p.stat().st_size for p in [medium, *medium.rglob("*")])

    both = f"holds volume VOL001 of archive {THEIRS}, not of this archive \\({MINE}\\)"
    with pytest.raises(VolumeNotReachable, match=both):
        library.write_pack("VOL001", "p-000002", [b"meant for this archive"])
    with pytest.raises(VolumeNotReachable, match=both):
        library.read_pack(own)
    if backend.kind == "tape":
        # The changer holds a cartridge of that barcode: loading it is
        # when its label is read.
        with pytest.raises(VolumeNotReachable, match=both):
            library.load("VOL001")
    else:
        assert not library.is_reachable("VOL001")
        with pytest.raises(VolumeNotReachable, match=both):
            library.list_packs("VOL001")
    assert sorted(p.stat().st_size for p in [medium, *medium.rglob("*")]) == before

    backend.medium(library, "VOL001")  # out of the drive again (tape)
    if medium.is_dir():
        shutil.rmtree(medium)
    shutil.move(shelf / medium.name, medium)
    assert library.is_reachable("VOL001")
    assert read_all(library, own) == b"this archive's pack"


def test_volumes_labelled_before_labels_named_an_archive_are_still_read(
    backend, tmp_path
):
    before = backend.open()
    labelled(backend, before, "VOL001", 64 * MiB)
    old = before.write_pack("VOL001", "p-000001", [b"labelled without an archive"])

    library = backend.open(archive=MINE)

    assert library.is_reachable("VOL001")
    assert read_all(library, old) == b"labelled without an archive"
    later = library.write_pack("VOL001", "p-000002", [b"written once it had one"])
    assert read_all(library, later) == b"written once it had one"
    # A volume labelled now names this archive: another archive refuses it.
    labelled(backend, library, "VOL002", 64 * MiB)
    new = library.write_pack("VOL002", "p-000003", [b"named"])
    with pytest.raises(VolumeNotReachable, match=f"of archive {MINE}"):
        read_all(backend.open(archive=THEIRS), new)


def test_another_archives_folder_is_not_adopted(tmp_path, caplog):
    DirectoryLibrary(tmp_path / "other", archive=THEIRS).label("VOL009", 4 * MiB)
    DirectoryLibrary(tmp_path / "old").label("VOL008", 4 * MiB)
    library = open_library("directory", {"path": str(tmp_path / "lib")}, archive=MINE)
    shutil.move(tmp_path / "other" / "VOL009", tmp_path / "lib" / "VOL009")
    shutil.move(tmp_path / "old" / "VOL008", tmp_path / "lib" / "VOL008")

    # Labelled before labels named an archive: adopted as before.
    assert [v.label for v in library.list_volumes()] == ["VOL008"]
    assert f"VOL009 of archive {THEIRS}, not of this archive ({MINE})" in caplog.text
    with pytest.raises(VolumeError, match=f"of archive {THEIRS}"):
        library.write_pack("VOL009", "p-000001", [b"x"])


def test_settings_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as caught:
        open_library("floppy", {"record_size": 1000})

    keys = [key for key, _ in caught.value.problems]
    assert keys == ["volumes.kind", "volumes.record_size"]
    with pytest.raises(ConfigError, match=r"volumes\.path"):
        open_library("directory", {})
    with pytest.raises(ConfigError, match=r"volumes\.state_path"):
        open_library("tape", {"simulated_path": str(tmp_path)})


def test_directory_pack_altered_on_disk_fails_its_check(tmp_path):
    library = open_library("directory", {"path": str(tmp_path)})
    library.label("VOL001", 4 * MiB)
    location = library.write_pack("VOL001", "p-000001", [b"original bytes"])
    (path,) = (tmp_path / "VOL001" / "packs").iterdir()
    path.write_bytes(b"0riginal bytes")

    with pytest.raises(VolumeError, match="p-000001"):
        read_all(library, location)
    # Unchecked, for a restore to salvage what the pack still holds.
    assert b"".join(library.read_pack(location, check=False)) == b"0riginal bytes"


def test_directory_volume_folder_from_elsewhere_is_adopted(tmp_path):
    first = open_library("directory", {"path": str(tmp_path / "a")})
    first.label("VOL009", 4 * MiB)
    location = first.write_pack("VOL009", "p-000001", [b"moved with its folder"])
    shutil.move(tmp_path / "a" / "VOL009", tmp_path / "VOL009")
    (tmp_path / "b").mkdir()
    shutil.move(tmp_path / "VOL009", tmp_path / "b" / "VOL009")

    second = open_library("directory", {"path": str(tmp_path / "b")})

    assert [v.label for v in second.list_volumes()] == ["VOL009"]
    assert read_all(second, location) == b"moved with its folder"


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a directory library needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_directory_volume_on_a_full_disk_is_full(small_disk):
    library = open_library("directory", {"path": str(small_disk / "library")})
    library.label("VOL001", 1 << 40)  # far more than the disk holds
    kept = library.write_pack("VOL001", "p-000001", [pack_bytes(MiB, seed=1)])
    assert library.free_bytes("VOL001") < 8 * MiB

    def filling_the_disk() -> Iterator[bytes]:
        yield pack_bytes(MiB, seed=2)
        # Something else takes the rest of the disk while the pack streams.
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as out:
            while True:
                out.write(bytes(MiB))
        yield pack_bytes(MiB, seed=3)

    with pytest.raises(VolumeFull, match=r"VOL001 is full: .*disk is full"):
        library.write_pack("VOL001", "p-000002", filling_the_disk())

    assert library.list_packs("VOL001") == [kept]
    assert read_all(library, kept) == pack_bytes(MiB, seed=1)
    assert list((small_disk / "library" / "VOL001" / "incoming").iterdir()) == []


def test_a_stray_labelled_folder_is_ignored(tmp_path: Path) -> None:
    from appliance.storage.volumes import DirectoryLibrary

    library = DirectoryLibrary(tmp_path / "library")
    library.label("T3", 10**6)
    shutil.copytree(tmp_path / "library" / "T3", tmp_path / "library" / "T3-backup")

    again = DirectoryLibrary(tmp_path / "library")

    assert [v.label for v in again.list_volumes()] == ["T3"]
    location = again.write_pack("T3", "p-000000001", [b"pack bytes"])
    assert b"".join(again.read_pack(location)) == b"pack bytes"
