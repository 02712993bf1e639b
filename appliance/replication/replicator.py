"""The replicator: stream the queue, in arrival order, into packs on the
mirror, and the catalog's journal and snapshots after them.

For each batch (up to ``replication.batch_bytes``, or whatever waited
``replication.batch_seconds``; while instances keep arriving, only the
latter, see :meth:`Replicator.ready`)::

    1. write an encrypted pack of the queued instances to the spool
    2. upload it under a temporary remote name, check its size, rename it
       (the transport does this, and resumes an upload cut short)
    3. read it back from the mirror and check every instance
    4. in one catalog transaction: record the pack, give every instance an
       off-site copy, take them off the queue, journal it
    5. upload the journal entries written since the last upload (in a run
       of packs, after the last one, or once a minute)

While one pack goes through 2 to 5, the next batch's pack is written in a
thread of its own (zstd, SHA-256 and AES-GCM release the GIL); given a
second connection to the mirror (``verifier``), step 3 of a pack runs in
another thread while step 2 of the next one runs. At most
``prepare_ahead`` packs wait in the spool written and not yet uploaded
(:mod:`.spool`). Packs are recorded one at a time, in the order of their
numbers.

A crash anywhere before 4 leaves the instances queued: the next run sends
the packs left whole in the spool first, in order (each checked against
its note at the start), or else packs the instances again, and an earlier
remote file never recorded is an orphan that counts for nothing. Remote
names are pack ids and numbers, never UIDs or patient data; the mirror
holds ciphertext only.
"""

from __future__ import annotations

import functools
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
from typing import Any, BinaryIO, Protocol, cast

from appliance.catalog import copies, replication
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.replication import OFFSITE, Queued
from appliance.catalog.store import Catalog
from appliance.errors import (
    ApplianceError,
    LimiterClosed,
    LocalSourceError,
    StorageError,
)
from appliance.hsm.packing import LevelAttributes, instance_meta
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import ONLINE, Tiers
from appliance.metrics import events
from appliance.replication.audit import audit
from appliance.replication.background import Background
from appliance.replication.health import Health
from appliance.replication.identity import check_mirror
from appliance.replication.names import pack_name
from appliance.replication.spool import Spool, SpooledPack
from appliance.replication.transports import LocalBytes
from appliance.storage import sealed
from appliance.storage.packs import PackReader, PackWriter
from appliance.storage.packs.manifest import InstanceMeta
from appliance.storage.packs.writer import DEFAULT_LEVEL
from appliance.storage.streams import reader_over

logger = logging.getLogger(__name__)

# Seconds between two shares of the rolling audit of the mirror.
_AUDIT_EVERY = 3600.0
# The longest wait before a failed round is tried again, in seconds.
_BACKOFF_MAX = 300.0
# Seconds the journal may wait on the mirror while packs follow each other.
_JOURNAL_EVERY = 60.0
# Queue entries read for a batch beyond those already packed (more are read
# when the batch is not full with them), and the most ever read at once.
_LOOK_AHEAD = 256
_QUEUE_LIMIT = 100_000
# A pack up to this size is kept in memory from its writing to its upload,
# which then sends those bytes, hashed as they were written, rather than
# read the spooled file and hash it again.
_KEEP_MAX = 256 << 20
# Seconds since the newest instance was received within which the archive
# counts as receiving: a full batch then waits for its age.
_RECEIVING = 2.0


class Transport(Protocol):
    """What the replicator needs of a mirror transport."""

    def put(
        self,
        name: str,
        source: LocalBytes,
        size: int,
        sha256: str,
        progress: Callable[[int], None] | None = None,
        throttle: Callable[[int], None] | None = None,
    ) -> None: ...

    def get(self, name: str) -> Any: ...

    def size(self, name: str) -> int | None: ...

    def connect(self) -> None: ...


@dataclass
class Settings:
    """How the replicator batches and what it uploads besides packs."""

    batch_bytes: int = 64_000_000
    batch_seconds: float = 30.0
    snapshot_seconds: float = 86_400.0
    verify_after_upload: bool = True
    # The whole mirror is read back once in this many days (0: never).
    audit_days: float = 90.0
    # Packs written ahead into the spool while another one uploads (0: none).
    # Two keep the CPU busy while a read-back is the slower step: a tenth
    # faster than one with read-backs on (bench/README.md), the same off.
    prepare_ahead: int = 2
    # zstd level of the mirror's packs: 1 costs less CPU, 3 fewer bytes.
    compression_level: int = DEFAULT_LEVEL
    # Seconds between two checks that the mirror is this archive's (a disk
    # may be swapped while the service runs), also while nothing is sent.
    identity_seconds: float = 300.0


@dataclass
class Batch:
    """What one upload sent."""

    pack_id: str
    instances: int
    bytes: int
    seconds: float


class _Stopped(Exception):
    """The replicator was closed while it wrote a pack (not a failure)."""


class _Preparation(Background):
    """A pack being written ahead, and the queue entries it takes."""

    def __init__(self, batch: list[Queued], work: Callable[[list[Queued]], object]):
        self.numbers = {entry.number for entry in batch}
        super().__init__(functools.partial(work, batch), "replication-pack")


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
        verifier: Transport | None = None,
        paused: Callable[[], bool] | None = None,
        health: Health | None = None,
    ) -> None:
        if tiers.keys is None:
            raise StorageError(
                "the mirror holds ciphertext only: a key store is needed"
            )
        self.catalog = catalog
        self.tiers = tiers
        self.transport = transport
        # A second connection to the mirror for read-backs, which then run
        # beside the next upload; without it they run before it.
        self.verifier = verifier
        self.spool = spool
        self.settings = settings or Settings()
        self.throttle = throttle
        # Whether the bandwidth in force is "pause": then :meth:`run` does
        # not even connect to the mirror.
        self.paused = paused
        self.clock = clock
        # Failures logged once per cause, and the cause kept for the status.
        self.health = health or Health(catalog, clock)
        self.recaller = Recaller(catalog, tiers)
        spool.mkdir(parents=True, exist_ok=True)
        self._pending = Spool(spool / "pending")
        self._pending.clean()
        self._ahead: _Preparation | None = None
        self._uploaded: set[str] = set()  # packs put on the mirror, unrecorded
        # The bytes of packs written by this process and not yet uploaded.
        self._kept: dict[str, bytearray] = {}
        self._identity_due = -math.inf
        self._journal_sent = time.monotonic()
        self._stopping = threading.Event()

    # -- one step at a time -------------------------------------------------------

    def ready(self) -> list[Queued]:
        """The next batch, if it is due: full, or its oldest entry has waited
        long enough; else nothing. Entries already in a pack in the spool
        (or being written into one) are not part of it.

        While instances keep arriving, a full batch waits too, until its
        oldest entry has waited ``batch_seconds``: the mirror's packs then
        take the CPU and the disk after the modalities' stores rather than
        between them, and a long run of stores is sent that much behind.
        """
        held = self._held()
        wanted = len(held) + _LOOK_AHEAD
        while True:
            entries = replication.queued(self.catalog, limit=wanted)
            batch, full = self._batch_of(entries, held)
            if full or len(entries) < wanted or wanted >= _QUEUE_LIMIT:
                break
            # The batch needs more of the queue than was read: read more.
            wanted = min(wanted * 4, _QUEUE_LIMIT)
        if not batch:
            return []
        if full and not self._receiving():
            return batch
        if self.clock() - batch[0].time >= self.settings.batch_seconds:
            return batch
        return []

    def _receiving(self) -> bool:
        """Whether an instance was received a moment ago."""
        newest = replication.newest_arrival(self.catalog)
        return newest is not None and self.clock() - newest < _RECEIVING

    def _batch_of(
        self, entries: list[Queued], held: set[int]
    ) -> tuple[list[Queued], bool]:
        """The entries of a batch, oldest first, and whether it is full."""
        batch: list[Queued] = []
        total = 0
        for entry in entries:
            if entry.number in held:
                continue
            batch.append(entry)
            total += entry.size
            if total >= self.settings.batch_bytes:
                return batch, True
        return batch, False

    def waiting(self) -> bool:
        """Whether packs are written (or being written) for the mirror."""
        return self._ahead is not None or not self._pending.empty()

    def send(self, batch: list[Queued]) -> Batch | None:
        """Upload, verify and record one pack: the oldest in the spool, or
        else the pack of ``batch``; None when there was nothing to send.

        Meanwhile, in other threads, the next due batch is packed into the
        spool, and (with a verifier) this pack is read back while the next
        one uploads. A pack whose upload failed stays in the spool with
        what it holds (``pending/``) and is sent again before any other:
        the transport resumes it from the part the mirror already has. A
        pack that fails its read-back is dropped from the spool; its
        instances stay queued and go in a new pack.
        """
        started = time.monotonic()
        pack = self._next_pack(batch)
        if pack is None:
            return None
        self._prepare_ahead()
        self.check_mirror()

        remote = pack_name(pack.pack_id)
        self._upload(pack)
        if self.settings.verify_after_upload:
            self._verify(pack, remote)
        self._record(pack, remote)
        pack.discard()
        self._uploaded.discard(pack.pack_id)
        if not self.waiting() or self._journal_due():
            # In a run of packs, the journal goes after the last one (or
            # every minute): each upload of it is a pause for the link.
            self.send_journal()

        elapsed = time.monotonic() - started
        logger.info(
            "pack %s on the mirror: %d instances, %d bytes in %.1f s",
            pack.pack_id,
            len(pack.members),
            pack.size,
            elapsed,
        )
        return Batch(pack.pack_id, len(pack.members), pack.size, elapsed)

    def close(self) -> None:
        """Stop writing ahead: wait for the pack being written (it ends at
        the next instance), which stays in the spool if it was finished."""
        self._stopping.set()
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None:
                ahead.finish()
        except Exception as exc:
            logger.info("the pack being written ahead was left: %s", exc)
        finally:
            self._kept.clear()

    def _next_pack(self, batch: list[Queued]) -> SpooledPack | None:
        """The oldest pack in the spool; else the one being written ahead;
        else the pack of ``batch``, written while the mirror's connections
        open."""
        if self._ahead is not None and self._ahead.done():
            self._collect()
        found = self._spooled_after("")
        if found is not None:
            return found
        if self._ahead is None:
            if not batch:
                return None
            self._ahead = _Preparation(batch, self._prepare)
            self._connect()
        self._collect()
        return self._spooled_after("")

    def _connect(self) -> None:
        self.transport.connect()
        if self.verifier is not None and self.settings.verify_after_upload:
            self.verifier.connect()

    def _spooled_after(self, pack_id: str) -> SpooledPack | None:
        """The oldest pack in the spool numbered after ``pack_id``."""
        for pack in self._pending.packs():
            if pack.pack_id <= pack_id:
                continue
            if not replication.pack_is_recorded(self.catalog, pack.pack_id):
                return pack
            # A crash came between recording it and removing it.
            pack.discard()
        return None

    def _collect(self) -> None:
        """Wait for the pack being written ahead; raise what stopped it."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.finish()

    def _prepare_ahead(self) -> None:
        """Start writing the next due batch's pack, unless one is being
        written or ``prepare_ahead`` packs wait in the spool unsent (the
        one uploading now counts among them)."""
        if self._ahead is not None:
            if not self._ahead.done():
                return
            self._collect()
        unsent = [p for p in self._pending.packs() if p.pack_id not in self._uploaded]
        if len(unsent) > self.settings.prepare_ahead:
            return
        batch = self.ready()
        if batch:
            self._ahead = _Preparation(batch, self._prepare)

    def _upload(self, pack: SpooledPack) -> None:
        if pack.pack_id in self._uploaded:
            return  # while the pack before it was read back
        kept = self._kept.pop(pack.pack_id, None)
        try:
            self.transport.put(
                pack_name(pack.pack_id),
                pack.path if kept is None else kept,
                pack.size,
                pack.sha256,
                throttle=self.throttle,
            )
        except LocalSourceError:
            # The spooled bytes are no longer those written: they can never
            # be recorded, so the pack goes and its instances are packed again.
            pack.discard()
            raise
        events.uploaded("pack", pack.size)
        self._uploaded.add(pack.pack_id)

    def _verify(self, pack: SpooledPack, remote: str) -> None:
        """Read the pack back and check it; with a verifier, in a thread of
        its own while the next pack in the spool uploads. A pack the mirror
        does not give back whole is dropped from the spool."""
        try:
            if self.verifier is None:
                self._verify_remote(self.transport, remote, pack.pack_id)
                return
            check = functools.partial(
                self._verify_remote, self.verifier, remote, pack.pack_id
            )
            reading = Background(check, "replication-check")
            self._upload_next(pack)
            reading.finish()
        except BaseException as exc:
            # Put again next time (a put finds the file if it is whole), or
            # dropped when the mirror gave back something else than was sent.
            self._uploaded.discard(pack.pack_id)
            if isinstance(exc, StorageError):
                pack.discard()
            raise

    def _upload_next(self, current: SpooledPack) -> None:
        """Upload the pack after ``current`` (waiting while it is written);
        a failure is left for the ``send`` of that pack to meet again."""
        try:
            following = self._spooled_after(current.pack_id)
            if following is None and self._ahead is not None:
                self._collect()
                following = self._spooled_after(current.pack_id)
            if following is not None:
                # The pack after it is written while it uploads: writing is
                # the slowest step, and it waits for nothing else.
                self._prepare_ahead()
                self._upload(following)
        except LimiterClosed:
            # The service is stopping: the pack goes at the next start.
            logger.debug("the pack after %s waits for the next start", current.pack_id)
        except (ApplianceError, OSError) as exc:
            logger.warning("the pack after %s waits: %s", current.pack_id, exc)

    def _held(self) -> set[int]:
        """Queue entries in a pack in the spool or being written."""
        held: set[int] = set()
        for pack in self._pending.packs():
            held |= pack.queue_numbers()
        if self._ahead is not None:
            held |= self._ahead.numbers
        return held

    def _prepare(self, batch: list[Queued]) -> SpooledPack | None:
        """Write the pack of a batch into the spool, with a note of what it
        holds; None when nothing of the batch is left to send. Runs in the
        replicator's thread or in the one writing ahead."""
        records, gone = self._records(batch)
        if gone:
            replication.drop_from_queue(self.catalog, gone)
        if not records:
            return None
        pack_id = copies.next_pack_id(self.catalog)
        written = self._pending.writing_path(pack_id)
        try:
            with tempfile.TemporaryDirectory(dir=self.spool) as staging:
                summary, sources, key_id, kept = self._write_pack(
                    written, pack_id, records, Path(staging)
                )
            pack = SpooledPack(
                path=self._pending.folder / f"{pack_id}.pack",
                pack_id=pack_id,
                size=summary.bytes_written,
                sha256=summary.sha256,
                members={
                    e.sop_instance_uid: e.member for e in summary.manifest.instances
                },
                checksums={
                    r.sop_instance_uid: r.sha256
                    for r in records
                    if r.sop_instance_uid in sources
                },
                numbers=_numbers(batch),
                key_id=key_id,
            )
            # Kept before the pack shows in the spool, where the uploading
            # thread may find it at once.
            if kept is not None:
                self._kept[pack_id] = kept
            self._pending.add(written, pack)
        except BaseException:
            self._kept.pop(pack_id, None)
            raise
        finally:
            written.unlink(missing_ok=True)
        return pack

    def _record(self, pending: SpooledPack, remote: str) -> None:
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
        self.check_mirror()
        last = entries[-1]["seq"]
        name = f"journal/{first + 1:012d}-{last:012d}"
        data = "\n".join(_json(entry) for entry in entries).encode()
        self._upload_sealed(name, io.BytesIO(data), "journal")
        replication.set_mirror_mark(self.catalog, "journal_sent", last)
        self._journal_sent = time.monotonic()
        return len(entries)

    def _journal_due(self) -> bool:
        return time.monotonic() - self._journal_sent >= _JOURNAL_EVERY

    def send_snapshot(self) -> str:
        """Upload a compacted copy of the whole catalog, named by the last
        journal entry it contains; its remote name."""
        self.check_mirror()
        number = replication.last_journal_number(self.catalog)
        # The time makes each attempt's name new: a snapshot sent again
        # after a crash is sealed with another key, so its bytes differ.
        name = f"catalog/snapshot-{number:012d}-{int(self.clock()):010d}"
        with tempfile.TemporaryDirectory(dir=self.spool) as folder:
            self.catalog.env.copy(folder, compact=True)
            with open(Path(folder) / "data.mdb", "rb") as copy:
                self._upload_sealed(name, copy, "snapshot")
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
        # A swapped mirror would seem to have lost every pack.
        self.check_mirror()
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

    def check_mirror(self) -> None:
        """Raise ForeignMirrorError unless the mirror is this archive's
        (:mod:`.identity`); looked at again every ``identity_seconds``."""
        now = time.monotonic()
        if now < self._identity_due:
            return
        assert self.tiers.keys is not None
        check_mirror(self.catalog, self.transport, self.tiers.keys, self.spool)
        self._identity_due = now + self.settings.identity_seconds

    def run(self, stop: threading.Event, idle: float = 1.0) -> None:
        """Replicate until ``stop`` is set; a failed round is tried again
        with backoff, its cause logged once (:mod:`.health`)."""
        try:
            self._run(stop, idle)
        finally:
            self.close()

    def _run(self, stop: threading.Event, idle: float) -> None:
        backoff = idle
        while not stop.is_set():
            if self.paused is not None and self.paused():
                stop.wait(idle)
                continue
            try:
                more = self._round()
                self._recovered()
            except (ApplianceError, OSError) as exc:
                if stop.is_set():
                    # Stopping ends a wait for bandwidth (LimiterClosed) or
                    # cuts a transfer: nothing failed, and nothing counted.
                    logger.info("replication stopped: %s", exc)
                    return
                self.health.failed(exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = idle
            if not more:
                stop.wait(idle)

    def _round(self) -> bool:
        """The snapshot if due, then a pack, or else the check of the
        mirror (when due), the journal and the audit's share; whether packs
        wait (the next round starts at once)."""
        if self.snapshot_due():
            self.send_snapshot()
        batch = self.ready()
        if batch or self.waiting():
            self.send(batch)
            return True
        # Nothing to send: the mirror is still looked at (its connection,
        # host key, login and identity), so that one that refuses us is
        # shown as stopped and not as up to date while the queue is empty.
        self.check_mirror()
        if not replication.queued(self.catalog, limit=1):
            # A change without instances (a patient merged, say) goes to
            # the mirror on its own; the others go after the pack of their
            # instances.
            self.send_journal()
        if self.audit_due():
            self.audit_some()
        return False

    def _recovered(self) -> None:
        """After a round without failure, if failures were recorded: make
        sure the mirror answers and is ours (a round may have had nothing
        to send), then say that replication works again."""
        if self.health.trouble is None:
            return
        self._identity_due = -math.inf
        self.check_mirror()
        self.health.worked()

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
    ) -> tuple[Any, set[str], str, bytearray | None]:
        """Write the pack of the records whose bytes can be read now; what
        was written, the instances in it, the master key id, and the pack's
        bytes when it is small enough to keep in memory until its upload.

        The pack writer checks every instance's SHA-256 as it reads it, so
        online copies are not hashed beforehand. When one of them fails that
        check (or cannot be read), the pack is written again, each online
        copy checked first and another copy recalled in place of a bad one.
        """
        try:
            return self._pack_records(path, pack_id, records, folder, check=False)
        except StorageError as exc:  # a SourceMismatchError among others
            logger.warning(
                "pack %s: %s; writing it again, checking every online copy first",
                pack_id,
                exc,
            )
        return self._pack_records(path, pack_id, records, folder, check=True)

    def _pack_records(
        self,
        path: Path,
        pack_id: str,
        records: list[InstanceRecord],
        folder: Path,
        check: bool,
    ) -> tuple[Any, set[str], str, bytearray | None]:
        assert self.tiers.keys is not None
        items = self._items(records, folder, check)
        if not items:
            raise StorageError("no queued instance can be read now")
        key = self.tiers.keys.new_data_key()
        with open(path, "wb") as out:
            kept = _KeptCopy(out, _KEEP_MAX)
            level = self.settings.compression_level
            writer = PackWriter(cast(BinaryIO, kept), pack_id, None, key, level=level)
            writer.add_all(items)
            summary = writer.close()
        packed = {meta.sop_instance_uid for meta, _ in items}
        return summary, packed, key.master_key_id, kept.copy

    def _items(
        self, records: list[InstanceRecord], folder: Path, check: bool
    ) -> list[tuple[InstanceMeta, Path]]:
        """What the pack is written from: each record's meta and bytes."""
        levels = LevelAttributes(self.catalog)
        items: list[tuple[InstanceMeta, Path]] = []
        for record in records:
            if self._stopping.is_set():
                raise _Stopped("replication is stopping; the pack was left")
            source = self._source(record, folder, check)
            if source is None:
                logger.warning(
                    "instance %s cannot be read now; it stays queued",
                    record.sop_instance_uid,
                )
                continue
            items.append((instance_meta(record, levels), source))
        return items

    def _source(self, record: InstanceRecord, folder: Path, check: bool) -> Path | None:
        """The instance's stored bytes: its online file (hashed first if
        ``check``), or a copy taken out of the nearest readable pack."""
        online = record.copy_on(ONLINE)
        if online is not None:
            path = self.tiers.online.path_of(online.location)
            if check and _sha256_of(path) == record.sha256:
                return path
            if not check and path.is_file():
                return path
            logger.error(
                "the online copy of %s is missing or damaged; reading another copy",
                record.sop_instance_uid,
            )
        staged = folder / f"{len(list(folder.iterdir()))}.dcm"
        return staged if self.recaller.copy_out(record, staged) else None

    def _verify_remote(self, transport: Transport, remote: str, pack_id: str) -> None:
        """Read the pack back from the mirror and check every instance."""
        stream = reader_over(iter(transport.get(remote)))
        try:
            report = PackReader(stream, self.tiers.keys).read_all()
        finally:
            stream.close()
        if not report.ok:
            raise StorageError(
                f"pack {pack_id} failed its read-back from the mirror: "
                f"{report.describe()}"
            )

    def _upload_sealed(self, name: str, source: BinaryIO, kind: str) -> None:
        assert self.tiers.keys is not None
        with tempfile.TemporaryDirectory(dir=self.spool) as folder:
            path = Path(folder) / "sealed"
            with open(path, "wb") as out:
                digest = sealed.seal(source, out, name, self.tiers.keys)
            size = path.stat().st_size
            self.transport.put(name, path, size, digest, throttle=self.throttle)
        events.uploaded(kind, size)


class _KeptCopy:
    """A file being written, and a copy in memory of every byte written to
    it, up to ``limit`` bytes (beyond, no copy: ``copy`` is None). The pack
    writer hashes what it writes, so the copy holds exactly the bytes of
    that hash."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self._file = file
        self._limit = limit
        self.copy: bytearray | None = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        if self.copy is not None:
            if len(self.copy) + len(data) <= self._limit:
                self.copy += data
            else:
                self.copy = None
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        # The pack writer writes a regular file in larger pieces than a tape.
        return self._file.fileno()


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
