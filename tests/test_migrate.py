"""The migrator and recall on real files: copy a study to nearline, verify,
release it from online, and bring it back byte for byte."""

from __future__ import annotations

import errno
import hashlib
import logging
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from appliance.catalog import copies, requests
from appliance.catalog.store import Catalog
from appliance.errors import StorageError, VolumeFull
from appliance.hsm import extraction as extraction_module
from appliance.hsm import recall as recall_module
from appliance.hsm.migrator import Migrator
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import Tiers
from appliance.ingest import Ingest
from appliance.storage.keys import KeyStore
from appliance.storage.nearline import NearlineTier
from appliance.storage.offline import OfflineTier
from appliance.storage.online import OnlineTier
from appliance.storage.packs import write_pack_file
from appliance.storage.volumes import DirectoryLibrary
from tests.datasets import study_files, uid

STUDY = uid("study", "migrate")


@dataclass
class Archive:
    catalog: Catalog
    online: OnlineTier
    nearline: NearlineTier
    keys: KeyStore
    originals: dict[str, bytes]  # SOP Instance UID -> the file's bytes

    def tiers(self) -> Tiers:
        return Tiers(self.online, {"nearline": self.nearline}, self.keys)

    def migrator(self, min_copies: int = 1) -> Migrator:
        return Migrator(self.catalog, self.tiers(), min_copies)

    def recaller(self) -> Recaller:
        return Recaller(self.catalog, self.tiers())

    def where(self, study: str = STUDY) -> dict[str, int]:
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, study)
        assert found is not None
        return found.copies

    def online_bytes(self, study: str = STUDY) -> dict[str, bytes]:
        found = {}
        for record in copies.instances_of(self.catalog, study):
            copy = record.copy_on("online")
            if copy is not None:
                found[record.sop_instance_uid] = self.online.path_of(
                    copy.location
                ).read_bytes()
        return found


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    nearline = NearlineTier(tmp_path / "nearline")
    nearline.open()
    keys = KeyStore.create_if_missing(tmp_path / "keys" / "master.keys")
    ingest = Ingest(catalog, online, "refuse")
    originals = {}
    try:
        for path in study_files(tmp_path / "files", "migrate", 6, pixel_bytes=20000):
            assert ingest.import_file(path, "test").ok
            originals[_sop_uid(path)] = path.read_bytes()
        yield Archive(catalog, online, nearline, keys, originals)
    finally:
        ingest.close()
        catalog.close()


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_copy_to_nearline_writes_a_verified_pack(archive: Archive) -> None:
    outcome = archive.migrator().copy(STUDY, "nearline")

    assert outcome.ok, outcome.problem
    assert outcome.instances == 6
    assert archive.where() == {"online": 6, "nearline": 6}
    [pack] = copies.packs_of(archive.catalog, STUDY)
    path = archive.nearline.path_of(pack.location)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pack.sha256
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True)
    assert listing.returncode == 0
    assert "manifest" in listing.stdout and STUDY not in listing.stdout


def test_a_nearline_disk_gone_while_running_gets_no_pack_in_its_mount_point(
    archive: Archive,
) -> None:
    """Unmounted under a running service, the disk leaves its empty mount
    point: the copy fails with the reason, and nothing is made there."""
    root = archive.nearline.root
    root.rename(root.with_name("nearline-unmounted"))
    root.mkdir()

    outcome = archive.migrator().copy(STUDY, "nearline")

    assert not outcome.ok
    assert "is the nearline tier's disk still mounted" in outcome.problem
    assert list(root.iterdir()) == []
    assert archive.where() == {"online": 6}


def test_removing_a_pack_already_gone_with_its_folder_says_nothing(
    archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    """A pack made again after its disk was replaced: the old one is gone,
    and so is its folder."""
    location = archive.nearline.location_of("p-000000042")

    with caplog.at_level(logging.WARNING, logger="appliance.storage.nearline"):
        archive.nearline.remove(location)

    assert not caplog.records


def test_copy_twice_adds_nothing(archive: Archive) -> None:
    archive.migrator().copy(STUDY, "nearline")

    again = archive.migrator().copy(STUDY, "nearline")

    assert again.ok and again.instances == 0
    assert len(copies.packs_of(archive.catalog, STUDY)) == 1


def test_release_keeps_min_copies(archive: Archive) -> None:
    archive.migrator().copy(STUDY, "nearline")

    refused = archive.migrator(min_copies=2).release(STUDY, "online")

    assert not refused.ok
    assert archive.where() == {"online": 6, "nearline": 6}
    assert len(archive.online_bytes()) == 6


def test_release_without_a_copy_below_is_refused(archive: Archive) -> None:
    refused = archive.migrator(min_copies=0).release(STUDY, "online")

    assert not refused.ok
    assert len(archive.online_bytes()) == 6


def test_move_then_recall_gives_the_same_bytes(archive: Archive) -> None:
    outcomes = archive.migrator().move(STUDY, "online", "nearline")

    assert [o.ok for o in outcomes] == [True, True]
    assert archive.where() == {"nearline": 6}
    assert not any((archive.online.objects).rglob("*.dcm"))
    assert archive.recaller().needs_recall(STUDY)

    result = archive.recaller().recall(STUDY)

    assert result.ok and result.staged == 6
    assert archive.where() == {"online": 6, "nearline": 6}
    assert archive.online_bytes() == archive.originals
    assert not archive.recaller().needs_recall(STUDY)


@pytest.mark.parametrize("threads", [1, 4])
def test_recalled_files_are_flushed_before_the_catalog_counts_them(
    archive: Archive, threads: int
) -> None:
    archive.migrator().move(STUDY, "online", "nearline")
    flushed: list[Path] = []
    counted_after: list[int] = []
    real_add = copies.add_copies

    def add_copies(*args: object) -> object:
        counted_after.append(len(flushed))
        return real_add(*args)  # type: ignore[arg-type]

    with (
        mock.patch.object(extraction_module, "fsync_file", flushed.append),
        mock.patch.object(recall_module, "fsync_directory", flushed.append),
        mock.patch.object(recall_module.copies, "add_copies", add_copies),
    ):
        result = Recaller(archive.catalog, archive.tiers(), threads).recall(STUDY)

    assert result.ok and result.staged == 6
    files = {p for p in archive.online.objects.rglob("*.dcm")}
    assert len(files) == 6 and set(flushed) == files | {p.parent for p in files}
    assert counted_after == [len(flushed)]


def test_recalls_under_kept_threads_share_one_set_of_threads(
    archive: Archive,
) -> None:
    recaller = Recaller(archive.catalog, archive.tiers(), 3)
    workers: set[threading.Thread] = set()
    real_flush = extraction_module.fsync_file

    def flush(path: Path) -> None:
        workers.add(threading.current_thread())
        real_flush(path)

    with mock.patch.object(extraction_module, "fsync_file", flush):
        with recaller.kept_threads():
            for _ in range(3):
                archive.migrator().move(STUDY, "online", "nearline")
                assert recaller.recall(STUDY).staged == 6
        kept = set(workers)
        archive.migrator().move(STUDY, "online", "nearline")
        assert recaller.recall(STUDY).staged == 6

    assert 1 <= len(kept) <= 3
    assert all(not thread.is_alive() for thread in kept)
    # Outside the block a recall starts threads of its own again.
    assert workers - kept


def test_a_recall_whose_files_cannot_be_flushed_counts_none(
    archive: Archive,
) -> None:
    archive.migrator().move(STUDY, "online", "nearline")

    def broken(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with (
        mock.patch.object(extraction_module, "fsync_file", broken),
        pytest.raises(StorageError, match="cannot flush the recalled files"),
    ):
        archive.recaller().recall(STUDY)

    assert archive.where() == {"nearline": 6}


def test_recall_reports_progress(archive: Archive) -> None:
    archive.migrator().move(STUDY, "online", "nearline")
    seen: list[tuple[int, int]] = []

    archive.recaller().recall(STUDY, lambda done, total: seen.append((done, total)))

    assert seen[-1] == (6, 6)


def test_a_recall_puts_its_files_in_one_folder(archive: Archive) -> None:
    """One flush of that folder then makes all their names durable."""
    archive.migrator().move(STUDY, "online", "nearline")

    archive.recaller().recall(STUDY)

    files = list(archive.online.objects.rglob("*.dcm"))
    assert len(files) == 6 and len({path.parent for path in files}) == 1


@pytest.mark.parametrize("threads", [1, 4])
def test_tampered_pack_is_detected_on_recall(archive: Archive, threads: int) -> None:
    archive.migrator().move(STUDY, "online", "nearline")
    [pack] = copies.packs_of(archive.catalog, STUDY)
    path = archive.nearline.path_of(pack.location)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside an instance member
    path.write_bytes(bytes(data))

    result = Recaller(archive.catalog, archive.tiers(), threads).recall(STUDY)

    assert not result.ok
    assert result.problems
    assert 0 < len(result.missing) <= 6
    staged = archive.online_bytes()
    assert all(archive.originals[uid] == data for uid, data in staged.items())
    # The damaged copy no longer counts: no release may rely on it.
    assert archive.where().get("nearline") == 6 - len(result.missing)


class FaultyNearline(NearlineTier):
    """A disk that flips a bit in every pack after writing it."""

    def write(self, pack_id, items, study_uid, key, keys=None):
        def flip_a_bit(destination, *args, **kwargs):  # type: ignore[no-untyped-def]
            summary = write_pack_file(destination, *args, **kwargs)
            data = bytearray(destination.read_bytes())
            data[len(data) // 2] ^= 0x40
            destination.write_bytes(bytes(data))
            return summary

        with mock.patch("appliance.storage.nearline.write_pack_file", flip_a_bit):
            return super().write(pack_id, items, study_uid, key, keys)


def test_pack_failing_read_back_is_not_counted(archive: Archive) -> None:
    faulty = FaultyNearline(archive.nearline.root)
    tiers = Tiers(archive.online, {"nearline": faulty}, archive.keys)
    migrator = Migrator(archive.catalog, tiers, 1)

    outcomes = migrator.move(STUDY, "online", "nearline")

    assert [o.ok for o in outcomes] == [False]
    assert "read-back" in outcomes[0].problem
    assert archive.where() == {"online": 6}
    assert copies.packs_of(archive.catalog, STUDY) == []
    assert not list(archive.nearline.packs.rglob("*.pack"))


def test_sample_files_survive_a_round_trip(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    nearline = NearlineTier(tmp_path / "nearline")
    nearline.open()
    ingest = Ingest(catalog, online, "refuse")
    try:
        names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"]
        sources = [Path(get_testdata_file(name)) for name in names]
        for source in sources:
            assert ingest.import_file(source, "test").ok
        studies = {
            r.study_uid
            for uid in map(_sop_uid, sources)
            if (r := _record(catalog, uid)) is not None
        }
        tiers = Tiers(online, {"nearline": nearline}, None)
        migrator = Migrator(catalog, tiers, 1)
        recaller = Recaller(catalog, tiers)

        for study in studies:
            assert all(o.ok for o in migrator.move(study, "online", "nearline"))
            assert recaller.recall(study).ok

        for source in sources:
            record = _record(catalog, _sop_uid(source))
            assert record is not None
            copy = record.copy_on("online")
            assert copy is not None
            assert online.path_of(copy.location).read_bytes() == source.read_bytes()
    finally:
        ingest.close()
        catalog.close()


def _record(catalog: Catalog, sop_uid: str):  # type: ignore[no-untyped-def]
    with catalog.read() as txn:
        return catalog.instance(txn, sop_uid)


# -- the offline tier: packs on volumes --------------------------------------------


@dataclass
class Library:
    archive: Archive
    library: DirectoryLibrary
    offline: OfflineTier
    shelf: Path

    def tiers(self) -> Tiers:
        packs = {"nearline": self.archive.nearline, "offline": self.offline}
        return Tiers(self.archive.online, packs, self.archive.keys)

    def shelve(self, label: str) -> None:
        (self.library.path / label).rename(self.shelf / label)

    def load(self, label: str) -> None:
        (self.shelf / label).rename(self.library.path / label)


@pytest.fixture
def library(archive: Archive, tmp_path: Path) -> Library:
    directory = DirectoryLibrary(tmp_path / "volumes")
    offline = OfflineTier(directory, tmp_path / "spool")
    offline.open()
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    return Library(archive, directory, offline, shelf)


def test_study_on_a_volume_comes_back(library: Library) -> None:
    library.library.label("L00001", 50 * 2**20)
    migrator = Migrator(library.archive.catalog, library.tiers(), 1)

    outcomes = migrator.move(STUDY, "online", "offline")

    assert [o.ok for o in outcomes] == [True, True], outcomes
    assert library.archive.where() == {"offline": 6}
    [pack] = copies.packs_of(library.archive.catalog, STUDY)
    assert pack.location.startswith("L00001/")
    assert pack.key_id is not None  # removable media carry ciphertext only

    result = Recaller(library.archive.catalog, library.tiers()).recall(STUDY)

    assert result.ok
    assert library.archive.online_bytes() == library.archive.originals


def test_too_small_a_volume_is_passed_over(library: Library) -> None:
    library.library.label("L00001", 2_000)
    library.library.label("L00002", 50 * 2**20)
    migrator = Migrator(library.archive.catalog, library.tiers(), 1)

    outcome = migrator.copy(STUDY, "offline")

    assert outcome.ok, outcome.problem
    [pack] = copies.packs_of(library.archive.catalog, STUDY)
    assert pack.location.startswith("L00002/")


class Optimistic(DirectoryLibrary):
    """A library whose free space is an estimate, as on compressing tape:
    L00001 turns out full after the first chunk of a pack."""

    def free_bytes(self, volume: str) -> int:
        return 2**40

    def write_pack(self, volume, pack_id, chunks):  # type: ignore[no-untyped-def]
        if volume == "L00001":
            next(iter(chunks))
            raise VolumeFull("volume L00001 is full: end of medium")
        return super().write_pack(volume, pack_id, chunks)


def test_volume_full_mid_pack_sends_it_to_the_next(
    library: Library, tmp_path: Path
) -> None:
    optimistic = Optimistic(library.library.path)
    optimistic.label("L00001", 50 * 2**20)
    optimistic.label("L00002", 50 * 2**20)
    library.offline.library = optimistic
    migrator = Migrator(library.archive.catalog, library.tiers(), 1)

    outcome = migrator.copy(STUDY, "offline")

    assert outcome.ok, outcome.problem
    [pack] = copies.packs_of(library.archive.catalog, STUDY)
    assert pack.location.startswith("L00002/")
    assert optimistic.list_packs("L00001") == []


def test_no_volume_with_room_is_a_clear_failure(library: Library) -> None:
    migrator = Migrator(library.archive.catalog, library.tiers(), 1)

    outcome = migrator.copy(STUDY, "offline")

    assert not outcome.ok
    assert "load or label a volume" in outcome.problem
    assert library.archive.where() == {"online": 6}


def test_study_on_a_shelved_volume_asks_for_it(library: Library) -> None:
    library.library.label("L00001", 50 * 2**20)
    migrator = Migrator(library.archive.catalog, library.tiers(), 1)
    migrator.move(STUDY, "online", "offline")
    library.shelve("L00001")
    recaller = Recaller(library.archive.catalog, library.tiers())

    waiting = recaller.recall(STUDY)

    assert not waiting.ok and waiting.waiting_for == ["L00001"]
    [request] = requests.open_requests(library.archive.catalog)
    assert request.volume == "L00001" and request.studies == [STUDY]

    library.load("L00001")
    assert requests.volume_loaded(library.archive.catalog, "L00001") == [STUDY]
    assert recaller.recall(STUDY).ok
    assert requests.open_requests(library.archive.catalog) == []
    assert library.archive.online_bytes() == library.archive.originals


def test_nearline_is_preferred_to_a_volume(library: Library) -> None:
    library.library.label("L00001", 50 * 2**20)
    migrator = Migrator(library.archive.catalog, library.tiers(), 2)
    assert migrator.copy(STUDY, "offline").ok
    assert all(o.ok for o in migrator.move(STUDY, "online", "nearline"))
    library.shelve("L00001")

    result = Recaller(library.archive.catalog, library.tiers()).recall(STUDY)

    assert result.ok and result.waiting_for == []
    assert requests.open_requests(library.archive.catalog) == []


def test_recall_falls_back_to_a_volume_when_the_nearline_pack_is_damaged(
    library: Library,
) -> None:
    library.library.label("L00001", 50 * 2**20)
    migrator = Migrator(library.archive.catalog, library.tiers(), 2)
    assert migrator.copy(STUDY, "offline").ok
    assert all(o.ok for o in migrator.move(STUDY, "online", "nearline"))
    [pack] = [
        p
        for p in copies.packs_of(library.archive.catalog, STUDY)
        if p.tier == "nearline"
    ]
    path = library.archive.nearline.path_of(pack.location)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))

    result = Recaller(library.archive.catalog, library.tiers()).recall(STUDY)

    assert result.ok, result.problems
    assert result.problems  # the damaged nearline copy was noticed
    assert library.archive.online_bytes() == library.archive.originals


# -- any sequence of steps keeps a verified copy of every instance ------------

STEPS = st.lists(
    st.sampled_from(
        [
            ("copy", "nearline"),
            ("copy", "offline"),
            ("release", "online"),
            ("release", "nearline"),
            ("recall", ""),
            ("store", ""),
            ("shelve", ""),
            ("load", ""),
        ]
    ),
    max_size=10,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=STEPS, min_copies=st.integers(0, 2))
def test_no_sequence_of_steps_loses_an_instance(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, str]],
    min_copies: int,
) -> None:
    root = tmp_path_factory.mktemp("steps")
    catalog = Catalog(root / "catalog", map_size=2**26)
    online = OnlineTier(root / "online")
    online.open()
    nearline = NearlineTier(root / "nearline")
    nearline.open()
    volumes = DirectoryLibrary(root / "volumes")
    volumes.label("L00001", 2**30)
    offline = OfflineTier(volumes, root / "spool")
    offline.open(writer=True)
    tiers = Tiers(online, {"nearline": nearline, "offline": offline}, None)
    ingest = Ingest(catalog, online, "refuse")
    originals: dict[str, bytes] = {}
    try:
        for step, (action, tier) in enumerate(steps):
            if action == "store":
                label = f"steps-{step}"
                for path in study_files(root / label, "steps", step + 1):
                    assert ingest.import_file(path, "test").ok
                    originals[_sop_uid(path)] = path.read_bytes()
            elif action == "shelve" and volumes.is_reachable("L00001"):
                (root / "volumes" / "L00001").rename(root / "L00001")
            elif action == "load" and not volumes.is_reachable("L00001"):
                (root / "L00001").rename(root / "volumes" / "L00001")
            for study in {r.study_uid for r in _all_records(catalog)}:
                if action == "copy":
                    Migrator(catalog, tiers, min_copies).copy(study, tier)
                elif action == "release":
                    Migrator(catalog, tiers, min_copies).release(study, tier)
                elif action == "recall":
                    Recaller(catalog, tiers).recall(study)
            _assert_every_instance_readable(catalog, tiers, originals)
    finally:
        ingest.close()
        catalog.close()


def _all_records(catalog: Catalog) -> list:  # type: ignore[type-arg]
    with catalog.read() as txn:
        uids = [uid for uid, _record in catalog.all_records(txn, "instances")]
        return [catalog.instance(txn, uid) for uid in uids]


def _assert_every_instance_readable(
    catalog: Catalog, tiers: Tiers, originals: dict[str, bytes]
) -> None:
    """Each instance keeps a verified copy, and staging it online from what
    the catalog counts (where reachable) gives its original bytes."""
    records = _all_records(catalog)
    assert {r.sop_instance_uid for r in records} == set(originals)
    for record in records:
        assert [c for c in record.copies if c.verified], record.sop_instance_uid
        online = record.copy_on("online")
        if online is not None:
            data = tiers.online.path_of(online.location).read_bytes()
            assert data == originals[record.sop_instance_uid]
