"""The replicator: stream the queue, in arrival order, into packs on the
mirror, and the catalog's journal and snapshots after them.

For each batch (up to ``replication.batch_bytes``, or whatever waited
``replication.batch_seconds``)::

    1. write an encrypted pack of the queued instances to the spool
    2. upload it under a temporary remote name, check its size, rename it
       (the transport does this, and resumes an upload cut short)
    3. read it back from the mirror and check every instance
    4. in one catalog transaction: record the pack, give every instance an
       off-site copy, take them off the queue, journal it
    5. upload the journal entries written since the last upload

A crash anywhere before 4 leaves the instances queued: the next run sends
them again in a new pack, and the earlier remote file, never recorded, is
an orphan that counts for nothing. Remote names are pack ids and numbers,
never UIDs or patient data; the mirror holds ciphertext only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from appliance.catalog import copies, replication
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.replication import OFFSITE, Queued
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, StorageError
from appliance.hsm.packing import LevelAttributes, instance_meta
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import ONLINE, Tiers
from appliance.replication.audit import audit
from appliance.storage import durable, sealed
from appliance.storage.packs import PackReader, PackWriter
from appliance.storage.packs.manifest import InstanceMeta
from appliance.storage.streams import reader_over

logger = logging.getLogger(__name__)

# Seconds between two shares of the rolling audit of the mirror.
_AUDIT_EVERY = 3600.0


class Transport(Protocol):
    """What the replicator needs of a mirror transport."""

    def put(
        self,
        name: str,
        source: Path,
        size: int,
        sha256: str,
        progress: Callable[[int], None] | None = None,
        throttle: Callable[[int], None] | None = None,
    ) -> None: ...

    def get(self, name: str) -> Any: ...


@dataclass
class Settings:
    """How the replicator batches and what it uploads besides packs."""

    batch_bytes: int = 64_000_000
    batch_seconds: float = 30.0
    snapshot_seconds: float = 86_400.0
    verify_after_upload: bool = True
    # The whole mirror is read back once in this many days (0: never).
    audit_days: float = 90.0


@dataclass
class Batch:
    """What one upload sent."""

    pack_id: str
    instances: int
    bytes: int
    seconds: float


@dataclass
class _Pending:
    """A pack in the spool waiting to reach the mirror, and what it holds."""

    path: Path
    pack_id: str
    size: int
    sha256: str
    members: dict[str, str]  # SOP Instance UID -> member name
    checksums: dict[str, str]  # SOP Instance UID -> SHA-256 of its bytes
    numbers: dict[str, list[int]]  # SOP Instance UID -> its queue entries
    key_id: str | None = None  # the master key that wraps the pack's data key

    def save(self) -> None:
        note = {
            "pack_id": self.pack_id,
            "size": self.size,
            "sha256": self.sha256,
            "members": self.members,
            "checksums": self.checksums,
            "numbers": self.numbers,
            "key_id": self.key_id,
        }
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(note))
        durable.move_into_place(
            temporary, self.path.with_suffix(".json"), self.path.parent
        )

    @classmethod
    def load(cls, note: Path) -> _Pending | None:
        path = note.with_suffix(".pack")
        try:
            data = json.loads(note.read_text())
            if path.stat().st_size != data["size"]:
                raise ValueError("the spooled pack is cut short")
            return cls(path=path, **data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("dropping the unfinished upload %s: %s", note.name, exc)
            note.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            return None

    def discard(self) -> None:
        self.path.with_suffix(".json").unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


class Replicator:
    """Sends queued instances to the mirror, oldest first."""

    def __init__(
        self,
        catalog: Catalog,
        tiers: Tiers,
        transport: Transport,
        spool: Path,
        settings: Settings | None = None,
        throttle: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if tiers.keys is None:
            raise StorageError(
                "the mirror holds ciphertext only: a key store is needed"
            )
        self.catalog = catalog
        self.tiers = tiers
        self.transport = transport
        self.spool = spool
        self.settings = settings or Settings()
        self.throttle = throttle
        self.clock = clock
        self.recaller = Recaller(catalog, tiers)
        spool.mkdir(parents=True, exist_ok=True)

    # -- one step at a time -------------------------------------------------------

    def ready(self) -> list[Queued]:
        """The next batch, if it is due: full, or its oldest entry has waited
        long enough; else nothing."""
        batch: list[Queued] = []
        total = 0
        for entry in replication.queued(self.catalog, limit=100_000):
            batch.append(entry)
            total += entry.size
            if total >= self.settings.batch_bytes:
                return batch
        if batch and self.clock() - batch[0].time >= self.settings.batch_seconds:
            return batch
        return []

    def send(self, batch: list[Queued]) -> Batch | None:
        """Pack, upload, verify and record one batch; None when it held
        nothing left to send.

        A pack whose upload failed stays in the spool with what it holds
        (``pending/``), and is sent again before any new batch: the
        transport resumes it from the part the mirror already has.
        """
        started = time.monotonic()
        pending = self._pending()
        if pending is None:
            pending = self._prepare(batch)
            if pending is None:
                return None

        remote = f"packs/{pending.pack_id[-3:]}/{pending.pack_id}.pack"
        self.transport.put(
            remote, pending.path, pending.size, pending.sha256, throttle=self.throttle
        )
        if self.settings.verify_after_upload:
            self._verify_remote(remote, pending.pack_id)
        self._record(pending, remote)
        pending.discard()
        self.send_journal()

        elapsed = time.monotonic() - started
        logger.info(
            "pack %s on the mirror: %d instances, %d bytes in %.1f s",
            pending.pack_id,
            len(pending.members),
            pending.size,
            elapsed,
        )
        return Batch(pending.pack_id, len(pending.members), pending.size, elapsed)

    def _prepare(self, batch: list[Queued]) -> _Pending | None:
        """Write the pack of a batch into the spool, with a note of what it
        holds; None when nothing of the batch is left to send."""
        records, gone = self._records(batch)
        if gone:
            replication.drop_from_queue(self.catalog, gone)
        if not records:
            return None
        pack_id = copies.next_pack_id(self.catalog)
        folder = self.spool / "pending"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{pack_id}.pack"
        with tempfile.TemporaryDirectory(dir=self.spool) as staging:
            summary, sources, key_id = self._write_pack(
                path, pack_id, records, Path(staging)
            )
        pending = _Pending(
            path=path,
            pack_id=pack_id,
            size=summary.bytes_written,
            sha256=summary.sha256,
            members={e.sop_instance_uid: e.member for e in summary.manifest.instances},
            checksums={
                r.sop_instance_uid: r.sha256
                for r in records
                if r.sop_instance_uid in sources
            },
            numbers=_numbers(batch),
            key_id=key_id,
        )
        pending.save()
        return pending

    def _pending(self) -> _Pending | None:
        """A pack whose upload an earlier attempt did not finish."""
        folder = self.spool / "pending"
        for pack in folder.glob("*.pack"):
            if not pack.with_suffix(".json").exists():
                pack.unlink()  # written by a process that died before its note
        for note in sorted(folder.glob("*.json")):
            found = _Pending.load(note)
            if found is not None:
                return found
        return None

    def _record(self, pending: _Pending, remote: str) -> None:
        pack = PackRecord(
            pack_id=pending.pack_id,
            study_uid="",
            tier=OFFSITE,
            location=remote,
            size=pending.size,
            sha256=pending.sha256,
            members=pending.members,
            key_id=pending.key_id,
        )
        sent = [
            Queued(number, uid, 0, 0.0)
            for uid in pending.members
            for number in pending.numbers.get(uid, [])
        ]
        replication.mark_replicated(self.catalog, pack, sent, pending.checksums)

    def send_journal(self) -> int:
        """Upload the journal entries written since the last upload, as one
        sealed segment; the entries sent."""
        first = replication.mirror_mark(self.catalog, "journal_sent")
        entries = list(replication.journal_after(self.catalog, first))
        if not entries:
            return 0
        last = entries[-1]["seq"]
        name = f"journal/{first + 1:012d}-{last:012d}"
        data = "\n".join(_json(entry) for entry in entries).encode()
        self._upload_sealed(name, io.BytesIO(data))
        replication.set_mirror_mark(self.catalog, "journal_sent", last)
        return len(entries)

    def send_snapshot(self) -> str:
        """Upload a compacted copy of the whole catalog, named by the last
        journal entry it contains; its remote name."""
        number = replication.last_journal_number(self.catalog)
        # The time makes each attempt's name new: a snapshot sent again
        # after a crash is sealed with another key, so its bytes differ.
        name = f"catalog/snapshot-{number:012d}-{int(self.clock()):010d}"
        with tempfile.TemporaryDirectory(dir=self.spool) as folder:
            self.catalog.env.copy(folder, compact=True)
            with open(Path(folder) / "data.mdb", "rb") as copy:
                self._upload_sealed(name, copy)
        replication.set_mirror_mark(self.catalog, "snapshot_time", int(self.clock()))
        replication.set_mirror_mark(self.catalog, "snapshot_seq", number)
        # Entries both in the snapshot and sent as segments live on the
        # mirror twice over; the catalog need not keep them.
        sent = replication.mirror_mark(self.catalog, "journal_sent")
        dropped = replication.prune_journal(self.catalog, min(number, sent))
        logger.info(
            "catalog snapshot on the mirror: %s; %d journal entries pruned",
            name,
            dropped,
        )
        return name

    def snapshot_due(self) -> bool:
        last = replication.mirror_mark(self.catalog, "snapshot_time")
        return self.clock() - last >= self.settings.snapshot_seconds

    def audit_due(self) -> bool:
        """An hourly share of the rolling audit is due (when it is on)."""
        if not self.settings.audit_days:
            return False
        last = replication.mirror_mark(self.catalog, "audit_time")
        return self.clock() - last >= _AUDIT_EVERY

    def audit_some(self) -> None:
        """Read back the share of the mirror's packs that keeps the whole
        mirror checked every ``audit_days``: the packs checked longest ago."""
        packs = len(replication.offsite_packs(self.catalog))
        share = math.ceil(packs * _AUDIT_EVERY / (self.settings.audit_days * 86400))
        if share:
            report = audit(self.catalog, self.transport, self.tiers.keys, share)
            logger.info(
                "mirror audit: %d pack(s) read back, %d damaged or missing",
                report.checked,
                report.damaged,
            )
        replication.set_mirror_mark(self.catalog, "audit_time", int(self.clock()))

    def run(self, stop: threading.Event, idle: float = 1.0) -> None:
        """Replicate until ``stop`` is set; errors are logged and retried."""
        backoff = idle
        while not stop.is_set():
            try:
                if self.snapshot_due():
                    self.send_snapshot()
                batch = self.ready()
                if batch:
                    self.send(batch)
                    if backoff > idle:
                        replication.set_mirror_mark(self.catalog, "last_error", "")
                    backoff = idle
                    continue
                if self.audit_due():
                    self.audit_some()
            except (ApplianceError, OSError) as exc:
                logger.error("replication: %s; retrying in %.0f s", exc, backoff)
                replication.set_mirror_mark(
                    self.catalog, "last_error", f"{time.time():.0f} {exc}"
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            stop.wait(idle)

    # -- the steps --------------------------------------------------------------

    def _records(
        self, batch: list[Queued]
    ) -> tuple[list[InstanceRecord], list[Queued]]:
        """The catalog records of a batch, and the entries whose instance
        is no longer in the catalog."""
        records, gone = [], []
        seen: set[str] = set()
        with self.catalog.read() as txn:
            for entry in batch:
                if entry.sop_instance_uid in seen:
                    continue  # queued twice (replaced): its current bytes go once
                record = self.catalog.instance(txn, entry.sop_instance_uid)
                if record is None:
                    gone.append(entry)
                else:
                    records.append(record)
                    seen.add(entry.sop_instance_uid)
        return records, gone

    def _write_pack(
        self, path: Path, pack_id: str, records: list[InstanceRecord], folder: Path
    ) -> tuple[Any, set[str], str]:
        """Write the pack of the records whose bytes can be read now; what
        was written, the instances in it, and the master key id."""
        assert self.tiers.keys is not None
        levels = LevelAttributes(self.catalog)
        items: list[tuple[InstanceMeta, Path]] = []
        for record in records:
            source = self._source(record, folder)
            if source is None:
                logger.warning(
                    "instance %s cannot be read now; it stays queued",
                    record.sop_instance_uid,
                )
                continue
            items.append((instance_meta(record, levels), source))
        if not items:
            raise StorageError("no queued instance can be read now")
        key = self.tiers.keys.new_data_key()
        with open(path, "wb") as out:
            writer = PackWriter(out, pack_id, None, key)
            writer.add_all(items)
            summary = writer.close()
        return (
            summary,
            {meta.sop_instance_uid for meta, _path in items},
            (key.master_key_id),
        )

    def _source(self, record: InstanceRecord, folder: Path) -> Path | None:
        """The instance's stored bytes: its online file, or a copy taken out
        of the nearest readable pack."""
        online = record.copy_on(ONLINE)
        if online is not None:
            path = self.tiers.online.path_of(online.location)
            if _sha256_of(path) == record.sha256:
                return path
            logger.error(
                "the online copy of %s is missing or damaged; reading another copy",
                record.sop_instance_uid,
            )
        staged = folder / f"{len(list(folder.iterdir()))}.dcm"
        return staged if self.recaller.copy_out(record, staged) else None

    def _verify_remote(self, remote: str, pack_id: str) -> None:
        """Read the pack back from the mirror and check every instance."""
        stream = reader_over(iter(self.transport.get(remote)))
        try:
            report = PackReader(stream, self.tiers.keys).read_all()
        finally:
            stream.close()
        if not report.ok:
            raise StorageError(
                f"pack {pack_id} failed its read-back from the mirror: "
                f"{report.describe()}"
            )

    def _upload_sealed(self, name: str, source: BinaryIO) -> None:
        assert self.tiers.keys is not None
        with tempfile.TemporaryDirectory(dir=self.spool) as folder:
            path = Path(folder) / "sealed"
            with open(path, "wb") as out:
                digest = sealed.seal(source, out, name, self.tiers.keys)
            self.transport.put(
                name, path, path.stat().st_size, digest, throttle=self.throttle
            )


def _numbers(batch: list[Queued]) -> dict[str, list[int]]:
    """Queue entries by SOP Instance UID (one instance may be queued twice)."""
    found: dict[str, list[int]] = {}
    for entry in batch:
        found.setdefault(entry.sop_instance_uid, []).append(entry.number)
    return found


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _json(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
