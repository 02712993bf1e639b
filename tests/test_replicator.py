"""The replicator against a directory mirror: every queued instance reaches
the mirror in encrypted packs, comes back byte for byte, and leaves the
queue only once its pack is verified there; the journal and catalog
snapshots follow."""

from __future__ import annotations

import io
import os
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
from appliance.errors import ApplianceError, HostKeyError
from appliance.hsm.migrator import Migrator
from appliance.hsm.tiers import Tiers
from appliance.ingest import Ingest
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
