"""The replicator against a directory mirror: every queued instance reaches
the mirror in encrypted packs, comes back byte for byte, and leaves the
queue only once its pack is verified there; the journal and catalog
snapshots follow."""

from __future__ import annotations

import io
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import lmdb
import pydicom
import pytest

from appliance.catalog import copies, replication
from appliance.catalog.store import Catalog
from appliance.errors import (
    ApplianceError,
    ForeignMirrorError,
    HostKeyError,
    LimiterClosed,
    TransportError,
)
from appliance.hsm.migrator import Migrator
from appliance.hsm.tiers import Tiers
from appliance.ingest import Ingest
from appliance.replication.audit import audit
from appliance.replication.health import read_trouble
from appliance.replication.identity import vet_mirror
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports import open_transport
from appliance.replication.transports.directory import DirectoryTransport
from appliance.storage import sealed
from appliance.storage.keys import KeyStore
from appliance.storage.nearline import NearlineTier
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader
from tests.datasets import study_files, uid
from tests.sshd import Sshd
from tests.test_transports import sftp_settings


@dataclass
class Site:
    catalog: Catalog
    tiers: Tiers
    mirror: Path
    spool: Path
    originals: dict[str, bytes]
    ingest: Ingest

    def replicator(self, **settings: object) -> Replicator:
        chosen = Settings(batch_seconds=0, **settings)  # type: ignore[arg-type]
        return Replicator(
            self.catalog,
            self.tiers,
            DirectoryTransport(self.mirror),
            self.spool,
            chosen,
        )

    def store(self, label: str, count: int, noise: bool = False) -> None:
        for path in study_files(self.mirror.parent / label, label, count):
            if noise:
                # Pixel data that does not compress: packs as large as images'.
                dataset = pydicom.dcmread(path)
                dataset.PixelData = os.urandom(len(dataset.PixelData))
                dataset.save_as(path)
            assert self.ingest.import_file(path, "test").ok
            uid_ = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            self.originals[uid_] = path.read_bytes()

    def remote_files(self) -> list[Path]:
        return sorted(p for p in self.mirror.rglob("*") if p.is_file())


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from built_site(tmp_path)


def built_site(tmp_path: Path) -> Iterator[Site]:
    """An archive with a directory mirror in ``tmp_path``, closed after."""
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    nearline = NearlineTier(tmp_path / "nearline")
    nearline.open()
    keys = KeyStore.create_if_missing(tmp_path / "keys" / "master.keys")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    ingest = Ingest(catalog, online, "refuse")
    tiers = Tiers(online, {"nearline": nearline}, keys)
    built = Site(catalog, tiers, mirror, tmp_path / "spool", {}, ingest)
    try:
        yield built
    finally:
        ingest.close()
        catalog.close()


def _offsite_bytes(site: Site) -> dict[str, bytes]:
    """Every instance as read back from the mirror's packs."""
    found: dict[str, bytes] = {}
    for path in site.mirror.glob("packs/*/*.pack"):
        with PackReader.open(path, site.tiers.keys) as reader:
            for entry in reader.manifest().instances:
                out = io.BytesIO()
                reader.extract(entry, out)
                found[entry.sop_instance_uid] = out.getvalue()
    return found


def test_every_stored_instance_is_queued(site: Site) -> None:
    site.store("queued", 5)

    state = replication.queue_state(site.catalog)

    assert state.instances == 5
    assert state.bytes == sum(len(b) for b in site.originals.values())
    assert state.recovery_point_age >= 0


def test_queue_reaches_the_mirror_byte_for_byte(site: Site) -> None:
    site.store("mirror-a", 4)
    site.store("mirror-b", 3)
    replicator = site.replicator()

    batch = replicator.send(replicator.ready())

    assert batch is not None and batch.instances == 7
    assert replication.queue_state(site.catalog).instances == 0
    assert _offsite_bytes(site) == site.originals
    for record in copies.instances_of(site.catalog, uid("study", "mirror-a")):
        offsite = record.copy_on("offsite")
        assert offsite is not None and offsite.location.startswith(batch.pack_id)


def test_the_mirror_holds_no_uids_or_names(site: Site) -> None:
    site.store("private", 3)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    replicator.send_snapshot()

    for path in site.remote_files():
        relative = path.relative_to(site.mirror).as_posix()
        assert "1.2.826" not in relative
        data = path.read_bytes()
        assert b"1.2.826" not in data and b"Doe^Jane" not in data, relative


def test_batches_wait_for_size_or_age(site: Site) -> None:
    site.store("batching", 3)
    clock = [time.time()]
    replicator = Replicator(
        site.catalog,
        site.tiers,
        DirectoryTransport(site.mirror),
        site.spool,
        Settings(batch_bytes=10**9, batch_seconds=30),
        clock=lambda: clock[0],
    )

    assert replicator.ready() == []
    clock[0] += 31
    assert len(replicator.ready()) == 3


def test_a_full_batch_waits_while_instances_keep_arriving(site: Site) -> None:
    site.store("arriving", 3)
    newest = replication.newest_arrival(site.catalog)
    assert newest is not None
    clock = [newest + 0.5]

    def replicator(batch_seconds: float) -> Replicator:
        return Replicator(
            site.catalog,
            site.tiers,
            DirectoryTransport(site.mirror),
            site.spool,
            Settings(batch_bytes=1, batch_seconds=batch_seconds),
            clock=lambda: clock[0],
        )

    # Full, but an instance came half a second ago: it waits for its age.
    assert replicator(batch_seconds=30).ready() == []
    assert len(replicator(batch_seconds=0.1).ready()) == 1
    # The stores have ended: a full batch goes at once.
    clock[0] = newest + 5
    assert len(replicator(batch_seconds=30).ready()) == 1


def test_failed_record_leaves_everything_queued(site: Site) -> None:
    site.store("crash", 3)
    replicator = site.replicator()
    batch = replicator.ready()

    with (
        mock.patch.object(replication, "mark_replicated", side_effect=OSError("power")),
        pytest.raises(OSError),
    ):
        replicator.send(batch)

    assert replication.queue_state(site.catalog).instances == 3
    again = replicator.send(replicator.ready())
    assert again is not None and again.instances == 3
    records = copies.instances_of(site.catalog, uid("study", "crash"))
    assert all(r.copy_on("offsite") for r in records)
    assert replication.queue_state(site.catalog).instances == 0


def test_tampered_upload_is_not_counted(site: Site) -> None:
    site.store("tamper", 3)
    replicator = site.replicator()
    real_put = replicator.transport.put

    def put_then_damage(name, source, size, sha256, **kwargs):
        real_put(name, source, size, sha256, **kwargs)
        if name.startswith("packs/"):
            path = site.mirror / name
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))

    replicator.transport.put = put_then_damage  # type: ignore[method-assign]
    with pytest.raises(ApplianceError, match="read-back"):
        replicator.send(replicator.ready())

    assert replication.queue_state(site.catalog).instances == 3


def test_instance_released_from_online_is_sent_from_its_pack(site: Site) -> None:
    site.store("released", 3)
    study = uid("study", "released")
    migrator = Migrator(site.catalog, site.tiers, min_copies=1)
    assert all(o.ok for o in migrator.move(study, "online", "nearline"))
    replicator = site.replicator()

    replicator.send(replicator.ready())

    assert _offsite_bytes(site) == site.originals


def test_journal_and_snapshot_rebuild_the_catalog(site: Site, tmp_path: Path) -> None:
    site.store("journal", 4)
    replicator = site.replicator()
    name = replicator.send_snapshot()
    replicator.send(replicator.ready())

    segments = sorted(site.mirror.glob("journal/*"))
    assert segments, "the journal follows each pack"
    entries = []
    for segment in segments:
        out = io.BytesIO()
        remote = segment.relative_to(site.mirror).as_posix()
        with open(segment, "rb") as source:
            sealed.open_sealed(source, remote, site.tiers.keys, out)
        entries += out.getvalue().decode().splitlines()
    assert sum('"op":"store"' in e for e in entries) == 4
    assert sum('"op":"replicated"' in e for e in entries) == 1

    restored = tmp_path / "restored"
    restored.mkdir()
    with (
        open(site.mirror / name, "rb") as source,
        open(restored / "data.mdb", "wb") as out,
    ):
        sealed.open_sealed(source, name, site.tiers.keys, out)  # type: ignore[arg-type]
    env = lmdb.open(str(restored), readonly=True, max_dbs=32, lock=False)
    try:
        instances = env.open_db(b"instances", create=False)
        with env.begin() as txn:
            assert txn.stat(instances)["entries"] == 4
    finally:
        env.close()
    assert os.path.getsize(restored / "data.mdb") > 0


# -- over SFTP, against a real OpenSSH server ----------------------------------


def _sftp_replicator(site: Site, server: Sshd, **overrides: object) -> Replicator:
    settings = sftp_settings(server, site.mirror, **overrides)
    return Replicator(
        site.catalog,
        site.tiers,
        open_transport("sftp", settings),
        site.spool,
        Settings(batch_seconds=0),
    )


def test_over_sftp_every_instance_arrives_byte_for_byte(
    site: Site, tmp_path: Path
) -> None:
    site.store("sftp-a", 5)
    with Sshd(tmp_path / "sshd") as server:
        replicator = _sftp_replicator(site, server)
        batch = replicator.send(replicator.ready())
        replicator.transport.close()

    assert batch is not None and batch.instances == 5
    assert _offsite_bytes(site) == site.originals
    assert replication.queue_state(site.catalog).instances == 0


def test_mirror_killed_mid_upload_then_back(site: Site, tmp_path: Path) -> None:
    for number in range(4):
        site.store(f"sftp-kill-{number}", 6, noise=True)
    server = Sshd(tmp_path / "sshd").start()
    try:
        replicator = _sftp_replicator(site, server, retries=0, block_size=32768)
        sent = [0]

        def kill_after_some(count: int) -> None:
            sent[0] += count
            if sent[0] > 100_000 and server.process is not None:
                server.kill()

        replicator.throttle = kill_after_some
        with pytest.raises(ApplianceError):
            replicator.send(replicator.ready())
        assert replication.queue_state(site.catalog).instances == 24

        server.start()
        replicator.throttle = None
        batch = replicator.send(replicator.ready())
        replicator.transport.close()
    finally:
        server.stop()

    assert batch is not None and batch.instances == 24
    assert replication.queue_state(site.catalog).instances == 0
    assert _offsite_bytes(site) == site.originals
    assert not list(site.mirror.rglob("*.partial"))


def test_changed_host_key_stops_replication_and_keeps_the_queue(
    site: Site, tmp_path: Path
) -> None:
    site.store("sftp-key", 3)
    server = Sshd(tmp_path / "sshd")
    server.replace_host_key()  # known_hosts still pins the first key
    with server:
        replicator = _sftp_replicator(site, server)
        with pytest.raises(HostKeyError, match="host key"):
            replicator.send(replicator.ready())
        replicator.transport.close()

    assert replication.queue_state(site.catalog).instances == 3
    assert not list(site.mirror.rglob("*.pack"))


def test_wrong_master_key_on_the_mirror_is_a_clear_error(
    site: Site, tmp_path: Path
) -> None:
    site.store("wrong-key", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    stranger = KeyStore.create_if_missing(tmp_path / "stranger" / "master.keys")
    [pack] = list(site.mirror.glob("packs/*/*.pack"))

    with pytest.raises(ApplianceError, match="master key"):
        PackReader.open(pack, stranger)


def test_the_rolling_audit_reads_its_share_and_requeues_what_is_lost(
    site: Site,
) -> None:
    site.store("audit-a", 2)
    replicator = site.replicator(audit_days=1 / 24)  # everything each hour
    replicator.send(replicator.ready())
    site.store("audit-b", 2)
    replicator.send(replicator.ready())
    damaged = sorted(site.mirror.glob("packs/*/*.pack"))[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))

    assert replicator.audit_due()
    replicator.audit_some()

    assert not replicator.audit_due()
    assert replication.queue_state(site.catalog).instances == 2
    replicator.send(replicator.ready())
    assert replication.queue_state(site.catalog).instances == 0


def test_a_snapshot_prunes_the_journal_already_on_the_mirror(site: Site) -> None:
    site.store("prune", 3)
    replicator = site.replicator()
    replicator.send(replicator.ready())  # sends the journal after the pack
    sent = replication.mirror_mark(site.catalog, "journal_sent")
    assert sent > 0

    replicator.send_snapshot()

    assert list(replication.journal_after(site.catalog, 0)) == []
    site.store("prune-later", 1)
    later = list(replication.journal_after(site.catalog, 0))
    assert later and later[0]["seq"] > sent


# -- what a fresh review found -----------------------------------------------------


def test_an_instance_queued_twice_goes_once_with_its_newest_bytes(
    site: Site, tmp_path: Path
) -> None:
    site.ingest.close()
    site.ingest = Ingest(site.catalog, site.tiers.online, "replace")
    site.store("twice", 1)
    [path] = list((site.mirror.parent / "twice").glob("*.dcm"))
    dataset = pydicom.dcmread(path)
    dataset.PatientName = "Corrected^Name"
    corrected = tmp_path / "corrected.dcm"
    dataset.save_as(corrected)
    assert site.ingest.import_file(corrected, "test").ok
    assert replication.queue_state(site.catalog).instances == 2
    replicator = site.replicator()

    batch = replicator.send(replicator.ready())

    assert batch is not None and batch.instances == 1
    assert replication.queue_state(site.catalog).instances == 0
    [sent] = _offsite_bytes(site).values()
    assert sent == corrected.read_bytes()


def test_a_damaged_online_file_does_not_hold_up_the_others(site: Site) -> None:
    site.store("damaged-online", 3)
    records = copies.instances_of(site.catalog, uid("study", "damaged-online"))
    victim = records[0]
    path = site.tiers.online.path_of(victim.copy_on("online").location)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    replicator = site.replicator()

    batch = replicator.send(replicator.ready())

    assert batch is not None and batch.instances == 2
    state = replication.queue_state(site.catalog)
    assert state.instances == 1
    assert victim.sop_instance_uid not in _offsite_bytes(site)


def test_a_pack_recorded_twice_is_counted_once(site: Site) -> None:
    site.store("recorded-twice", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    [pack] = replication.offsite_packs(site.catalog)
    before = site.catalog.counts()["packbytes.offsite"]

    replication.mark_replicated(site.catalog, pack, [], {})

    assert site.catalog.counts()["packbytes.offsite"] == before


def test_the_audit_finds_a_pack_swapped_for_another(site: Site) -> None:
    from appliance.replication.audit import audit

    site.store("swap-a", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    site.store("swap-b", 2)
    replicator.send(replicator.ready())
    first, second = sorted(site.mirror.glob("packs/*/*.pack"))
    second.write_bytes(first.read_bytes())

    report = audit(site.catalog, replicator.transport, site.tiers.keys, None)

    assert report.damaged == 1
    assert report.queued_again == 2


def test_an_unreachable_mirror_is_not_a_lost_mirror(site: Site, tmp_path: Path) -> None:
    from appliance.errors import TransportError
    from appliance.replication.audit import audit

    site.store("outage", 2)
    server = Sshd(tmp_path / "sshd").start()
    try:
        replicator = _sftp_replicator(site, server, retries=0)
        replicator.send(replicator.ready())
    finally:
        server.stop()

    with pytest.raises(TransportError):
        audit(site.catalog, replicator.transport, site.tiers.keys, None)
    replicator.transport.close()

    assert replication.queue_state(site.catalog).instances == 0
    assert len(replication.offsite_packs(site.catalog)) == 1


# -- packing ahead, the spool, and read-backs beside uploads ----------------------


class FlakyMirror(DirectoryTransport):
    """A directory mirror whose pack uploads fail while ``down`` is set, and
    which notes every pack it is asked to put or give back."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = False
        self.puts: list[str] = []
        self.gets: list[str] = []

    def put(self, name, source, size, sha256, progress=None, throttle=None):
        if name.startswith("packs/"):
            if self.down:
                raise TransportError("the mirror is down")
            self.puts.append(name)
        super().put(name, source, size, sha256, progress, throttle)

    def get(self, name):
        self.gets.append(name)
        return super().get(name)


def _one_per_pack(
    site: Site,
    transport: DirectoryTransport,
    verifier: DirectoryTransport | None = None,
    **settings: object,
) -> Replicator:
    """A replicator that puts each queued instance in a pack of its own."""
    chosen = Settings(batch_bytes=1, batch_seconds=0, **settings)  # type: ignore
    return Replicator(
        site.catalog, site.tiers, transport, site.spool, chosen, verifier=verifier
    )


def _send_everything(replicator: Replicator) -> list[str]:
    """``send`` until nothing waits, as the replication process does; the
    pack ids sent, in order."""
    sent = []
    while (batch := replicator.ready()) or replicator.waiting():
        done = replicator.send(batch)
        if done is not None:
            sent.append(done.pack_id)
    replicator.close()
    return sent


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _recorded_in_journal(site: Site) -> list[str]:
    return [
        entry["pack"]["pack_id"]
        for entry in replication.journal_after(site.catalog, 0)
        if entry["op"] == "replicated"
    ]


def _spooled(site: Site) -> list[str]:
    return sorted(p.name for p in (site.spool / "pending").iterdir())


def _assert_each_instance_offsite_once(site: Site) -> None:
    assert replication.queue_state(site.catalog).instances == 0
    with site.catalog.read() as txn:
        for uid_ in site.originals:
            record = site.catalog.instance(txn, uid_)
            offsite = [c for c in record.copies if c.tier == "offsite"]
            assert len(offsite) == 1, (uid_, record.copies)
    assert _offsite_bytes(site) == site.originals


def test_the_next_pack_is_written_while_one_uploads(site: Site) -> None:
    site.store("ahead", 4)
    mirror = FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror)
    spooled_while_uploading: list[list[str]] = []
    real_put = mirror.put

    def put_and_look(name, *args, **kwargs):
        if name.startswith("packs/"):
            time.sleep(0.3)  # long enough for the next pack to be written
            spooled_while_uploading.append(_spooled(site))
        real_put(name, *args, **kwargs)

    mirror.put = put_and_look  # type: ignore[method-assign]
    sent = _send_everything(replicator)

    assert sent == [f"p-{n:09d}" for n in range(1, 5)]
    assert _recorded_in_journal(site) == sent
    # While pack n uploaded, pack n + 1 was in the spool already, whole.
    for number, listing in enumerate(spooled_while_uploading[:-1], 1):
        assert f"p-{number + 1:09d}.pack" in listing, listing
        assert f"p-{number + 1:09d}.json" in listing, listing
    assert _spooled(site) == []
    _assert_each_instance_offsite_once(site)


def test_at_most_prepare_ahead_packs_wait_unsent(site: Site) -> None:
    site.store("bounded", 6)
    mirror = FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror, prepare_ahead=1)
    most = [0]
    real_put = mirror.put

    def put_and_count(name, *args, **kwargs):
        if name.startswith("packs/"):
            time.sleep(0.2)
            notes = [n for n in _spooled(site) if n.endswith(".json")]
            most[0] = max(most[0], len(notes))
        real_put(name, *args, **kwargs)

    mirror.put = put_and_count  # type: ignore[method-assign]
    _send_everything(replicator)

    assert most[0] == 2  # the pack uploading and the one after it
    _assert_each_instance_offsite_once(site)


def _spool_two_packs_unsent(site: Site) -> FlakyMirror:
    """Two packs written into the spool while the mirror is down, then the
    replicator closed as if the process died."""
    mirror = FlakyMirror(site.mirror)
    mirror.down = True
    first = _one_per_pack(site, mirror)
    with pytest.raises(TransportError, match="down"):
        first.send(first.ready())
    _wait_for(lambda: "p-000000002.json" in _spooled(site))
    first.close()
    mirror.down = False
    return mirror


def test_a_crash_with_two_packs_in_the_spool_resumes_both_in_order(
    site: Site,
) -> None:
    site.store("two-spooled", 5)
    mirror = _spool_two_packs_unsent(site)
    assert _spooled(site) == [
        "p-000000001.json",
        "p-000000001.pack",
        "p-000000002.json",
        "p-000000002.pack",
    ]
    assert replication.queue_state(site.catalog).instances == 5

    # The process starts again: both spooled packs go first, in order, and
    # their instances are not packed a second time.
    again = _one_per_pack(site, mirror)
    assert len(again.ready()) == 1  # neither of the two spooled instances
    sent = _send_everything(again)

    assert sent[:2] == ["p-000000001", "p-000000002"]
    assert len(sent) == 5
    assert _recorded_in_journal(site) == sent
    assert mirror.puts == [f"packs/{p[-3:]}/{p}.pack" for p in sent]
    _assert_each_instance_offsite_once(site)


def test_what_a_crash_leaves_half_written_is_removed_at_start(site: Site) -> None:
    site.store("torn", 2)
    pending = site.spool / "pending"
    pending.mkdir(parents=True)
    (pending / "p-000000007.pack.tmp").write_bytes(b"half a pack")
    (pending / "p-000000008.pack").write_bytes(b"a pack whose note never came")
    (pending / "p-000000009.json.tmp").write_text("{")

    replicator = site.replicator()

    assert _spooled(site) == []
    _send_everything(replicator)
    _assert_each_instance_offsite_once(site)


def _flip_a_byte(path: Path, offset: int) -> None:
    """Other bytes of the same size: what a power cut may leave of a file
    whose bytes had not reached the disk."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_spooled_pack_damaged_by_a_power_cut_is_packed_again(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.store("power-cut", 3)
    mirror = _spool_two_packs_unsent(site)
    pending = site.spool / "pending"
    _flip_a_byte(pending / "p-000000001.pack", 4000)

    with caplog.at_level(logging.WARNING, logger="appliance.replication.spool"):
        again = _one_per_pack(site, mirror)

    # Found at the start, before anything was sent: the damaged pack and its
    # note are gone, the whole one waits, and the lost instance is queued.
    assert _spooled(site) == ["p-000000002.json", "p-000000002.pack"]
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(dropped) == 1 and "p-000000001.pack" in dropped[0], dropped
    sent = _send_everything(again)

    assert sent[0] == "p-000000002"
    _assert_packed_again_without(site, sent, "p-000000001")


def test_a_pack_written_by_this_process_goes_up_from_memory(site: Site) -> None:
    site.store("kept", 2)
    mirror = FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror)
    real_put = mirror.put
    sources = []

    def put(name, source, *args, **kwargs):
        if name.startswith("packs/"):
            sources.append(source)
            # What is sent are the bytes hashed as the pack was written,
            # not the spooled file read again: damaging it changes nothing.
            _flip_a_byte(site.spool / "pending" / f"{_pack_of(name)}.pack", 4000)
        real_put(name, source, *args, **kwargs)

    mirror.put = put  # type: ignore[method-assign]
    sent = _send_everything(replicator)

    assert len(sent) == 2
    assert not [source for source in sources if isinstance(source, Path)]
    _assert_each_instance_offsite_once(site)


def test_a_spooled_pack_that_changes_after_the_start_is_never_recorded(
    site: Site,
) -> None:
    site.store("changed", 3)
    mirror = _spool_two_packs_unsent(site)
    again = _one_per_pack(site, mirror)
    _flip_a_byte(site.spool / "pending" / "p-000000001.pack", 4000)

    # The upload finds the bytes it sends are not those of the note: the
    # pack is dropped rather than tried again for ever.
    with pytest.raises(TransportError, match="SHA-256"):
        again.send(again.ready())
    assert "p-000000001.pack" not in _spooled(site)
    assert mirror.list("packs/") == []
    _assert_packed_again_without(site, _send_everything(again), "p-000000001")


def _assert_packed_again_without(site: Site, sent: list[str], dropped: str) -> None:
    """The three instances went in packs sent after ``dropped``'s loss."""
    assert dropped not in sent
    assert len(sent) == 3
    _assert_each_instance_offsite_once(site)


def test_a_pack_written_ahead_that_fails_leaves_its_instances_queued(
    site: Site,
) -> None:
    site.store("ahead-fails", 3)
    mirror = FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror)
    real_write = replicator._write_pack
    calls = [0]

    def fail_the_second(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("the spool disk failed")
        return real_write(*args)

    replicator._write_pack = fail_the_second  # type: ignore[method-assign]
    replicator.send(replicator.ready())  # the first pack; the second fails
    with pytest.raises(OSError, match="spool disk"):
        replicator.send(replicator.ready())
    assert not any(name.endswith(".tmp") for name in _spooled(site))

    _send_everything(replicator)
    _assert_each_instance_offsite_once(site)


def test_a_pack_recorded_before_a_crash_is_not_recorded_again(site: Site) -> None:
    site.store("recorded-then-crash", 2)
    replicator = site.replicator()
    with (
        mock.patch(
            "appliance.replication.spool.SpooledPack.discard",
            side_effect=OSError("power cut"),
        ),
        pytest.raises(OSError, match="power cut"),
    ):
        replicator.send(replicator.ready())
    replicator.close()
    assert _recorded_in_journal(site) == ["p-000000001"]
    assert "p-000000001.json" in _spooled(site)

    again = site.replicator()
    assert again.waiting()
    assert again.send([]) is None  # the recorded pack is only removed
    _send_everything(again)

    assert _recorded_in_journal(site) == ["p-000000001"]
    assert _spooled(site) == []
    _assert_each_instance_offsite_once(site)


def test_with_a_verifier_each_pack_is_read_back_while_the_next_uploads(
    site: Site,
) -> None:
    site.store("beside", 4)
    mirror, reader = FlakyMirror(site.mirror), FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror, verifier=reader)
    events: list[str] = []
    real_put, real_get = mirror.put, reader.get

    most = [0]

    def put(name, *args, **kwargs):
        if name.startswith("packs/"):
            events.append(f"put {_pack_of(name)}")
        real_put(name, *args, **kwargs)

    def get(name):
        time.sleep(0.3)  # a slow read-back: the next upload goes meanwhile
        events.append(f"read back {_pack_of(name)}")
        notes = [n for n in _spooled(site) if n.endswith(".json")]
        most[0] = max(most[0], len(notes))
        return real_get(name)

    mirror.put = put  # type: ignore[method-assign]
    reader.get = get  # type: ignore[method-assign]
    sent = _send_everything(replicator)

    assert sent == [f"p-{n:09d}" for n in range(1, 5)]
    assert _recorded_in_journal(site) == sent
    assert mirror.gets == []  # every read-back went over the second connection
    assert sorted(reader.gets) == sorted(mirror.puts)
    for earlier, later in itertools.pairwise(sent):
        assert events.index(f"put {later}") < events.index(f"read back {earlier}")
    # Read back, uploading, and the next one written ahead.
    assert most[0] == 3
    _assert_each_instance_offsite_once(site)


def test_with_a_verifier_the_pack_after_the_next_is_written_while_it_uploads(
    site: Site,
) -> None:
    site.store("ahead-beside", 5)
    mirror, reader = FlakyMirror(site.mirror), FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror, verifier=reader)
    spooled_while_uploading: dict[str, list[str]] = {}
    real_put = mirror.put

    def put_and_look(name, *args, **kwargs):
        if name.startswith("packs/"):
            time.sleep(0.3)  # long enough for the pack after it to be written
            spooled_while_uploading[_pack_of(name)] = _spooled(site)
        real_put(name, *args, **kwargs)

    mirror.put = put_and_look  # type: ignore[method-assign]
    sent = _send_everything(replicator)

    assert sent == [f"p-{n:09d}" for n in range(1, 6)]
    # Pack n uploaded (beside the read-back of n - 1) while n + 1 was
    # written, not after.
    for number in range(1, 5):
        listing = spooled_while_uploading[f"p-{number:09d}"]
        assert f"p-{number + 1:09d}.json" in listing, (number, listing)
    _assert_each_instance_offsite_once(site)


def _pack_of(name: str) -> str:
    return name.rsplit("/", 1)[1].removesuffix(".pack")


def test_stopping_while_the_next_pack_uploads_beside_a_read_back_leaves_it_spooled(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.store("stop-beside", 2)
    mirror, reader = FlakyMirror(site.mirror), FlakyMirror(site.mirror)
    uploading: list[str] = []
    real_put = mirror.put

    def put(name, *args, **kwargs):
        uploading.append(name)
        real_put(name, *args, **kwargs)

    def throttle(n_bytes: int) -> None:
        # The service stops while the second pack waits for bandwidth.
        if uploading[-1].endswith("p-000000002.pack"):
            raise LimiterClosed("the bandwidth limiter is closed")

    mirror.put = put  # type: ignore[method-assign]
    chosen = Settings(batch_bytes=1, batch_seconds=0)
    replicator = Replicator(
        site.catalog,
        site.tiers,
        mirror,
        site.spool,
        chosen,
        throttle=throttle,
        verifier=reader,
    )
    with caplog.at_level(logging.DEBUG, logger="appliance.replication"):
        first = replicator.send(replicator.ready())
    replicator.close()

    assert first is not None and first.pack_id == "p-000000001"
    assert _recorded_in_journal(site) == ["p-000000001"]
    assert not (site.mirror / "packs/002/p-000000002.pack").exists()
    assert "p-000000002.json" in _spooled(site)
    assert any("waits for the next start" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # The next start sends it, once.
    again = FlakyMirror(site.mirror)
    sent = _send_everything(_one_per_pack(site, again))
    assert sent == ["p-000000002"]
    _assert_each_instance_offsite_once(site)


def test_a_damaged_read_back_drops_the_pack_and_packs_its_instances_again(
    site: Site,
) -> None:
    site.store("damaged-beside", 2)
    mirror, reader = FlakyMirror(site.mirror), FlakyMirror(site.mirror)
    replicator = _one_per_pack(site, mirror, verifier=reader)
    real_put = mirror.put
    damaged = []

    def put_then_damage(name, source, size, sha256, **kwargs):
        real_put(name, source, size, sha256, **kwargs)
        if name.startswith("packs/") and not damaged:
            damaged.append(name)
            path = site.mirror / name
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))

    mirror.put = put_then_damage  # type: ignore[method-assign]
    with pytest.raises(ApplianceError, match="read-back"):
        replicator.send(replicator.ready())
    assert "p-000000001.json" not in _spooled(site)
    assert replication.queue_state(site.catalog).instances == 2

    sent = _send_everything(replicator)

    assert "p-000000001" not in sent
    assert len(sent) == 2
    assert _recorded_in_journal(site) == sent
    # The damaged file stays on the mirror, recorded nowhere.
    assert not replication.pack_is_recorded(site.catalog, "p-000000001")
    assert (site.mirror / damaged[0]).exists()
    _assert_each_instance_offsite_once(site)


def test_a_batch_reads_as_much_of_the_queue_as_it_needs(site: Site) -> None:
    site.store("long-queue", 7)
    sizes = [entry.size for entry in replication.queued(site.catalog)]
    replicator = Replicator(
        site.catalog,
        site.tiers,
        DirectoryTransport(site.mirror),
        site.spool,
        Settings(batch_bytes=sum(sizes[:6]), batch_seconds=3600),
        clock=lambda: time.time() + 60,  # the stores ended a while ago
    )
    with mock.patch("appliance.replication.replicator._LOOK_AHEAD", 2):
        batch = replicator.ready()
        assert [entry.size for entry in batch] == sizes[:6]  # full at the sixth
        replicator.settings.batch_bytes = sum(sizes) + 1
        assert replicator.ready() == []  # not full, and young
        replicator.clock = lambda: time.time() + 3601
        assert len(replicator.ready()) == 7


# -- pause and stop ---------------------------------------------------------------


class CountingMirror(FlakyMirror):
    """A directory mirror that counts the connections asked of it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


def test_while_paused_the_replicator_does_not_touch_the_mirror(site: Site) -> None:
    site.store("paused", 3)
    mirror = CountingMirror(site.mirror)
    stop = threading.Event()
    looks = itertools.count(1)

    def paused() -> bool:
        if next(looks) >= 5:
            stop.set()
        return True

    replicator = Replicator(
        site.catalog,
        site.tiers,
        mirror,
        site.spool,
        Settings(batch_seconds=0, audit_days=1 / 24),
        paused=paused,
    )
    replicator.run(stop, idle=0.001)

    assert mirror.connects == 0
    assert mirror.puts == [] and mirror.gets == []
    assert site.remote_files() == []
    assert replication.queue_state(site.catalog).instances == 3


def test_the_replicator_sends_once_the_pause_ends(site: Site) -> None:
    site.store("resumed", 2)
    mirror = CountingMirror(site.mirror)
    stop = threading.Event()
    looks = itertools.count(1)

    def paused() -> bool:
        look = next(looks)
        if replication.queue_state(site.catalog).instances == 0:
            stop.set()
        return look <= 3

    replicator = Replicator(
        site.catalog,
        site.tiers,
        mirror,
        site.spool,
        Settings(batch_seconds=0),
        paused=paused,
    )
    replicator.run(stop, idle=0.001)

    assert mirror.connects >= 1
    assert len(mirror.puts) == 1
    assert replication.queue_state(site.catalog).instances == 0


def test_a_stop_during_a_wait_for_bandwidth_logs_no_error(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.store("stopping", 2)
    stop = threading.Event()

    def throttle(n_bytes: int) -> None:
        # What the replication process does on SIGTERM: stop, then close
        # the limiter, which ends the upload's wait for bandwidth.
        stop.set()
        raise LimiterClosed("the bandwidth limiter is closed")

    replicator = Replicator(
        site.catalog,
        site.tiers,
        DirectoryTransport(site.mirror),
        site.spool,
        Settings(batch_seconds=0),
        throttle=throttle,
    )
    with caplog.at_level(logging.INFO, logger="appliance.replication"):
        replicator.run(stop, idle=0.001)

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("replication stopped" in r.getMessage() for r in caplog.records)
    assert replication.queue_state(site.catalog).instances == 2
    assert read_trouble(site.catalog) is None


def _damage_one_member(pack: Path, keys: KeyStore) -> str:
    """Flip a byte inside the second instance's member; its UID."""
    with PackReader.open(pack, keys) as reader:
        entry = reader.manifest().instances[1]
    data = bytearray(pack.read_bytes())
    data[entry.data_offset + entry.member_size // 2] ^= 0x01
    pack.write_bytes(bytes(data))
    return entry.sop_instance_uid


def test_a_partly_damaged_pack_is_reported_and_queued_again_once(site: Site) -> None:
    from appliance.replication.audit import audit

    site.store("partly", 3)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    [pack] = site.mirror.glob("packs/*/*.pack")
    damaged = _damage_one_member(pack, site.tiers.keys)

    first = audit(site.catalog, replicator.transport, site.tiers.keys, None)
    second = audit(site.catalog, replicator.transport, site.tiers.keys, None)

    assert (first.damaged, first.queued_again) == (1, 1)
    assert damaged in "\n".join(first.bad)
    assert (second.checked, second.damaged, second.queued_again) == (1, 0, 0)
    assert [e.sop_instance_uid for e in replication.queued(site.catalog)] == [damaged]
    [record] = replication.offsite_packs(site.catalog)
    assert record.lost == [damaged]

    # The lost instance goes in a new pack; the two others keep their copy.
    replicator.send(replicator.ready())
    assert replication.queue_state(site.catalog).instances == 0
    with site.catalog.read() as txn:
        for uid_ in site.originals:
            record = site.catalog.instance(txn, uid_)
            [offsite] = [c for c in record.copies if c.tier == "offsite"]
            assert offsite.location.startswith(
                "p-000000002/" if uid_ == damaged else "p-000000001/"
            )
    third = audit(site.catalog, replicator.transport, site.tiers.keys, None)
    assert (third.checked, third.damaged) == (2, 0)


def test_new_damage_in_a_partly_lost_pack_is_reported(site: Site) -> None:
    from appliance.replication.audit import audit

    site.store("again", 3)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    [pack] = site.mirror.glob("packs/*/*.pack")
    _damage_one_member(pack, site.tiers.keys)
    audit(site.catalog, replicator.transport, site.tiers.keys, None)
    with PackReader.open(pack, site.tiers.keys) as reader:
        entry = reader.manifest().instances[2]
    data = bytearray(pack.read_bytes())
    data[entry.data_offset + 40] ^= 0x01
    pack.write_bytes(bytes(data))

    report = audit(site.catalog, replicator.transport, site.tiers.keys, None)

    assert (report.damaged, report.queued_again) == (1, 1)
    assert entry.sop_instance_uid in "\n".join(report.bad)
    assert replication.queue_state(site.catalog).instances == 2


# -- the mirror's identity ---------------------------------------------------------


def _other_site(tmp_path: Path, keys: KeyStore | None = None) -> Site:
    """A second archive (its own catalog, and keys unless given) whose
    mirror folder is ``tmp_path / "mirror"``, as the first site's is."""
    root = tmp_path / "other"
    catalog = Catalog(root / "catalog", map_size=2**26)
    online = OnlineTier(root / "online")
    online.open()
    keys = keys or KeyStore.create_if_missing(root / "keys" / "master.keys")
    ingest = Ingest(catalog, online, "refuse")
    tiers = Tiers(online, {}, keys)
    return Site(catalog, tiers, tmp_path / "mirror", root / "spool", {}, ingest)


def _close(other: Site) -> None:
    other.ingest.close()
    other.catalog.close()


def mirror_of_another_archive(tmp_path: Path, keys: KeyStore | None = None) -> None:
    """Another archive (its own master key, unless ``keys`` are given: an
    escrow imported) replicates into the mirror folder ``tmp_path /
    "mirror"`` first, and marks it with its own id."""
    other = _other_site(tmp_path, keys=keys)
    try:
        other.store("theirs", 2)
        theirs = other.replicator()
        theirs.send(theirs.ready())
    finally:
        _close(other)


def test_the_first_replication_marks_the_mirror_and_later_ones_agree(
    site: Site,
) -> None:
    site.store("marked", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    site.store("marked-more", 2)
    again = site.replicator()  # a restarted replication process

    again.send(again.ready())

    assert (site.mirror / "mirror" / "identity").is_file()
    assert replication.mirror_note(site.catalog, "archive_id")
    assert replication.queue_state(site.catalog).instances == 0


def test_a_mirror_written_with_another_master_key_is_refused(
    site: Site, tmp_path: Path
) -> None:
    mirror_of_another_archive(tmp_path)
    before = site.remote_files()
    site.store("mine", 2)
    replicator = site.replicator()

    with pytest.raises(ForeignMirrorError, match="another master key"):
        replicator.send(replicator.ready())

    assert site.remote_files() == before
    assert replication.queue_state(site.catalog).instances == 2


def test_a_mirror_of_another_archive_with_the_same_keys_is_refused(
    site: Site, tmp_path: Path
) -> None:
    site.store("mine", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    other = _other_site(tmp_path, keys=site.tiers.keys)
    try:
        other.store("theirs", 2)
        # The other archive's own id, as if it had replicated elsewhere.
        replication.set_mirror_mark(other.catalog, "archive_id", "another-archive")
        theirs = other.replicator()
        with pytest.raises(ForeignMirrorError, match="another archive"):
            theirs.send(theirs.ready())
        assert replication.queue_state(other.catalog).instances == 2
    finally:
        _close(other)


def test_a_swapped_empty_mirror_is_refused(site: Site, tmp_path: Path) -> None:
    site.store("swapped", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    site.store("later", 2)
    fresh = tmp_path / "fresh-disk"
    fresh.mkdir()
    swapped = Replicator(
        site.catalog,
        site.tiers,
        DirectoryTransport(fresh),
        site.spool,
        Settings(batch_seconds=0),
    )

    with pytest.raises(ForeignMirrorError, match="not the mirror replicated to"):
        swapped.send(swapped.ready())

    assert not any(p.is_file() for p in fresh.rglob("*"))
    assert replication.queue_state(site.catalog).instances == 2


def test_a_new_mirror_gets_a_catalog_snapshot_at_once(
    site: Site, tmp_path: Path
) -> None:
    site.store("moved", 2)
    old = site.replicator()
    old.send_snapshot()
    old.send(old.ready())
    fresh = tmp_path / "new-mirror"
    fresh.mkdir()
    new_mirror = DirectoryTransport(fresh)
    # The documented move: 'replication verify --all --new-mirror' takes
    # the new mirror without a marker, finds every pack missing there and
    # queues its instances again.
    assert vet_mirror(site.catalog, new_mirror, site.tiers.keys, new_mirror=True) == ""
    assert audit(site.catalog, new_mirror, site.tiers.keys, None).queued_again == 2
    stop = threading.Event()
    deadline = time.monotonic() + 20

    def paused() -> bool:
        snapshots = list(fresh.glob("catalog/snapshot-*"))
        queued = replication.queued(site.catalog, limit=1)
        if (snapshots and not queued) or time.monotonic() > deadline:
            stop.set()
        return False

    replicator = Replicator(
        site.catalog,
        site.tiers,
        new_mirror,
        site.spool,
        Settings(batch_seconds=0),
        paused=paused,
    )
    replicator.run(stop, idle=0.001)

    # Sent at once, although the last one (to the old mirror) is recent.
    (snapshot,) = fresh.glob("catalog/snapshot-*")
    name = snapshot.relative_to(fresh).as_posix()
    restored = tmp_path / "restored"
    restored.mkdir()
    with open(snapshot, "rb") as source, open(restored / "data.mdb", "wb") as out:
        sealed.open_sealed(source, name, site.tiers.keys, out)  # type: ignore[arg-type]
    env = lmdb.open(str(restored), readonly=True, max_dbs=32, lock=False)
    try:
        with env.begin() as txn:
            instances = env.open_db(b"instances", txn=txn, create=False)
            assert txn.stat(instances)["entries"] == 2
    finally:
        env.close()
    assert replication.queue_state(site.catalog).instances == 0


def test_a_mirror_replicated_to_before_the_marker_existed_gets_one(
    site: Site,
) -> None:
    site.store("older", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    (site.mirror / "mirror" / "identity").unlink()
    site.store("newer", 2)
    again = site.replicator()

    again.send(again.ready())

    assert (site.mirror / "mirror" / "identity").is_file()
    assert replication.queue_state(site.catalog).instances == 0


def test_a_rebuilt_catalog_takes_the_id_of_its_mirror(
    site: Site, tmp_path: Path
) -> None:
    site.store("rebuilt", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    # A catalog rebuilt from the mirror's journal: the same packs recorded,
    # no archive id.
    rebuilt_path = tmp_path / "rebuilt-catalog"
    rebuilt_path.mkdir()
    site.catalog.env.copy(str(rebuilt_path))
    rebuilt = Catalog(rebuilt_path, map_size=2**26)
    try:
        with rebuilt.env.begin(write=True, db=rebuilt.db["meta"]) as txn:
            txn.delete(b"mirror.archive_id")
        again = Replicator(
            rebuilt,
            site.tiers,
            DirectoryTransport(site.mirror),
            tmp_path / "rebuilt-spool",
            Settings(batch_seconds=0),
        )

        again.check_mirror()

        assert replication.mirror_note(rebuilt, "archive_id") == (
            replication.mirror_note(site.catalog, "archive_id")
        )
    finally:
        rebuilt.close()


def test_a_new_appliance_with_the_escrowed_keys_does_not_join_the_mirror(
    site: Site, tmp_path: Path
) -> None:
    site.store("theirs", 2)
    replicator = site.replicator()
    replicator.send(replicator.ready())
    before = site.remote_files()
    other = _other_site(tmp_path, keys=site.tiers.keys)  # keys from the escrow
    try:
        other.store("new", 2)
        theirs = other.replicator()

        with pytest.raises(ForeignMirrorError, match="restore --from mirror"):
            theirs.send(theirs.ready())

        assert not replication.mirror_note(other.catalog, "archive_id")
        assert replication.queue_state(other.catalog).instances == 2
    finally:
        _close(other)
    assert site.remote_files() == before


def test_the_mirror_packs_use_the_configured_zstd_level(site: Site) -> None:
    site.store("level", 2)
    replicator = site.replicator(compression_level=1)

    replicator.send(replicator.ready())

    [pack] = site.mirror.glob("packs/*/*.pack")
    with PackReader.open(pack, site.tiers.keys) as reader:
        assert reader.manifest().compression_level == 1
    assert _offsite_bytes(site) == site.originals
