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

import io
import json
import logging
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
from appliance.storage import sealed
from appliance.storage.packs import PackReader, PackWriter
from appliance.storage.packs.manifest import InstanceMeta
from appliance.storage.streams import reader_over

logger = logging.getLogger(__name__)


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


@dataclass
class Batch:
    """What one upload sent."""

    pack_id: str
    instances: int
    bytes: int
    seconds: float


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
        nothing left to send."""
        started = time.monotonic()
        records, gone = self._records(batch)
        if gone:
            replication.drop_from_queue(self.catalog, gone)
        if not records:
            return None

        pack_id = copies.next_pack_id(self.catalog)
        remote = f"packs/{pack_id[-3:]}/{pack_id}.pack"
        with tempfile.TemporaryDirectory(dir=self.spool) as folder:
            path = Path(folder) / f"{pack_id}.pack"
            summary, sources = self._write_pack(path, pack_id, records, Path(folder))
            self.transport.put(
                remote,
                path,
                summary.bytes_written,
                summary.sha256,
                throttle=self.throttle,
            )
        if self.settings.verify_after_upload:
            self._verify_remote(remote, pack_id)

        members = {e.sop_instance_uid: e.member for e in summary.manifest.instances}
        pack = PackRecord(
            pack_id=pack_id,
            study_uid="",
            tier=OFFSITE,
            location=remote,
            size=summary.bytes_written,
            sha256=summary.sha256,
            members=members,
            key_id=self.tiers.keys.current.key_id if self.tiers.keys else None,
        )
        sent = [entry for entry in batch if entry.sop_instance_uid in sources]
        checksums = {r.sop_instance_uid: r.sha256 for r in records}
        replication.mark_replicated(self.catalog, pack, sent, checksums)
        self.send_journal()
        elapsed = time.monotonic() - started
        logger.info(
            "pack %s on the mirror: %d instances, %d bytes in %.1f s",
            pack_id,
            len(sources),
            summary.bytes_written,
            elapsed,
        )
        return Batch(pack_id, len(sources), summary.bytes_written, elapsed)

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
        name = f"catalog/snapshot-{number:012d}"
        with tempfile.TemporaryDirectory(dir=self.spool) as folder:
            self.catalog.env.copy(folder, compact=True)
            with open(Path(folder) / "data.mdb", "rb") as copy:
                self._upload_sealed(name, copy)
        replication.set_mirror_mark(self.catalog, "snapshot_time", int(self.clock()))
        replication.set_mirror_mark(self.catalog, "snapshot_seq", number)
        logger.info("catalog snapshot on the mirror: %s", name)
        return name

    def snapshot_due(self) -> bool:
        last = replication.mirror_mark(self.catalog, "snapshot_time")
        return self.clock() - last >= self.settings.snapshot_seconds

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
                    backoff = idle
                    continue
            except ApplianceError as exc:
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
        with self.catalog.read() as txn:
            for entry in batch:
                record = self.catalog.instance(txn, entry.sop_instance_uid)
                if record is None:
                    gone.append(entry)
                else:
                    records.append(record)
        return records, gone

    def _write_pack(
        self, path: Path, pack_id: str, records: list[InstanceRecord], folder: Path
    ) -> tuple[Any, set[str]]:
        """Write the pack of the records whose bytes can be read now."""
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
        with open(path, "wb") as out:
            writer = PackWriter(out, pack_id, None, self.tiers.keys.new_data_key())
            writer.add_all(items)
            summary = writer.close()
        return summary, {meta.sop_instance_uid for meta, _path in items}

    def _source(self, record: InstanceRecord, folder: Path) -> Path | None:
        """The instance's stored bytes: its online file, or a copy taken out
        of the nearest readable pack."""
        online = record.copy_on(ONLINE)
        if online is not None:
            path = self.tiers.online.path_of(online.location)
            if path.exists():
                return path
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


def _json(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
