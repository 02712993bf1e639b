"""The mirror's side of the catalog: the replication queue, the change
journal, and the off-site copies.

Instances enter the queue in the transaction that records them
(``store.py``); they leave it in the transaction that records their
off-site copy, so that every instance answered with Success is, at every
instant, either queued or on the mirror.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from appliance.catalog import codec
from appliance.catalog.copies import CopyAdder, PackRecord, _add_meta
from appliance.catalog.store import (
    Catalog,
    _with_key,
    append_journal,
    count_copies,
    encode_key,
    next_number,
    sequence_key,
)
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

OFFSITE = "offsite"


@dataclass(frozen=True)
class Queued:
    """One instance waiting for the mirror."""

    number: int
    sop_instance_uid: str
    size: int
    time: float


@dataclass(frozen=True)
class QueueState:
    """How far behind the mirror is."""

    instances: int
    bytes: int
    oldest: float | None  # when the oldest queued instance was received

    @property
    def recovery_point_age(self) -> float:
        """Seconds of receipts the mirror lacks (0 when nothing waits)."""
        return 0.0 if self.oldest is None else max(0.0, time.time() - self.oldest)


def queued(catalog: Catalog, limit: int | None = None) -> list[Queued]:
    """The oldest entries of the queue, in arrival order."""
    found = []
    with catalog.read() as txn:
        for key, raw in txn.cursor(db=catalog.db["replication"]):
            data = codec.loads(raw)
            found.append(
                Queued(
                    int.from_bytes(key, "big"), data["uid"], data["size"], data["time"]
                )
            )
            if limit is not None and len(found) >= limit:
                break
    return found


def newest_arrival(catalog: Catalog) -> float | None:
    """When the newest entry of the queue was received (None when empty)."""
    with catalog.read() as txn:
        cursor = txn.cursor(db=catalog.db["replication"])
        if not cursor.last():
            return None
        return float(codec.loads(cursor.value())["time"])


def queue_state(catalog: Catalog) -> QueueState:
    """Entries, bytes and the oldest receipt time in the queue."""
    count, size, oldest = 0, 0, None
    with catalog.read() as txn:
        for _key, raw in txn.cursor(db=catalog.db["replication"]):
            data = codec.loads(raw)
            count += 1
            size += data["size"]
            oldest = data["time"] if oldest is None else min(oldest, data["time"])
    return QueueState(count, size, oldest)


def mark_replicated(
    catalog: Catalog, pack: PackRecord, sent: list[Queued], sha256: dict[str, str]
) -> int:
    """Record a pack verified on the mirror: its instances get an off-site
    copy and leave the queue, in one transaction; the copies added."""
    try:
        with catalog.env.begin(write=True) as txn:
            # Recorded already (a crash after the commit): count it once.
            known = catalog.get(txn, "packs", pack.pack_id) is not None
            catalog._put(txn, "packs", pack.pack_id, pack.as_json())
            adder = CopyAdder(catalog, txn)
            added = 0
            for entry in sent:
                uid = entry.sop_instance_uid
                member = pack.members.get(uid)
                if member is not None:
                    location = f"{pack.pack_id}/{member}"
                    added += adder.add(uid, sha256.get(uid), OFFSITE, location)
                txn.delete(sequence_key(entry.number), db=catalog.db["replication"])
            adder.finish()
            if not known:
                _add_meta(catalog, txn, f"packbytes.{OFFSITE}", pack.size)
                # With the bytes each instance has in the pack: one replaced
                # while its pack was on the way has no copy there to restore.
                sent_sha256 = {
                    uid: sha256[uid] for uid in pack.members if uid in sha256
                }
                append_journal(
                    catalog,
                    txn,
                    {"op": "replicated", "pack": pack.as_json(), "sha256": sent_sha256},
                )
            return added
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record pack {pack.pack_id}: {exc}") from exc


def drop_from_queue(catalog: Catalog, entries: list[Queued]) -> None:
    """Take entries whose instance is gone (replaced, removed) off the queue."""
    with catalog.env.begin(write=True) as txn:
        for entry in entries:
            txn.delete(sequence_key(entry.number), db=catalog.db["replication"])


def journal_after(catalog: Catalog, number: int) -> Iterator[dict[str, Any]]:
    """Journal entries numbered above ``number``, in order."""
    with catalog.read() as txn:
        cursor = txn.cursor(db=catalog.db["journal"])
        if not cursor.set_range(sequence_key(number + 1)):
            return
        for _key, raw in cursor:
            yield codec.loads(raw)


def mirror_mark(catalog: Catalog, name: str) -> int:
    """A number kept in ``meta`` about the mirror (0 when unset), such as
    the last journal entry sent."""
    with catalog.read() as txn:
        return int(txn.get(f"mirror.{name}".encode(), b"0", db=catalog.db["meta"]))


def set_mirror_mark(catalog: Catalog, name: str, value: int | str) -> None:
    with catalog.env.begin(write=True, db=catalog.db["meta"]) as txn:
        txn.put(f"mirror.{name}".encode(), str(value).encode())


def mirror_note(catalog: Catalog, name: str) -> str:
    """A text kept in ``meta`` about the mirror (the last error, ...)."""
    with catalog.read() as txn:
        raw = txn.get(f"mirror.{name}".encode(), db=catalog.db["meta"])
    return bytes(raw).decode() if raw is not None else ""


def last_journal_number(catalog: Catalog) -> int:
    """The number of the last journal entry ever written (entries already
    pruned included); 0 before the first."""
    with catalog.read() as txn:
        following = txn.get(b"journal.next", b"1", db=catalog.db["meta"])
    return int(following) - 1


def pack_is_recorded(catalog: Catalog, pack_id: str) -> bool:
    with catalog.read() as txn:
        return txn.get(encode_key(pack_id), db=catalog.db["packs"]) is not None


def offsite_packs(catalog: Catalog) -> list[PackRecord]:
    """Every pack on the mirror, the one checked longest ago first."""
    with catalog.read() as txn:
        found = [
            PackRecord.from_json(data)
            for _key, data in catalog.all_records(txn, "packs")
            if data.get("tier") == OFFSITE
        ]
    return sorted(found, key=lambda pack: (pack.verified, pack.pack_id))


def set_pack_verified(catalog: Catalog, pack_id: str, when: float) -> None:
    """Note when a pack on the mirror was last read back and found good."""
    with catalog.env.begin(write=True) as txn:
        data = catalog.get(txn, "packs", pack_id)
        if data is not None:
            data["verified"] = when
            catalog._put(txn, "packs", pack_id, data)


def requeue(catalog: Catalog, pack: PackRecord, uids: list[str]) -> int:
    """Forget the off-site copies that ``pack`` was to hold for ``uids``
    (damaged or missing on the mirror) and queue those instances again;
    how many were queued."""
    queued_again = 0
    try:
        with catalog.env.begin(write=True) as txn:
            for uid in uids:
                record = catalog.instance(txn, uid)
                if record is None:
                    continue
                mine = [
                    c
                    for c in record.copies
                    if c.tier == OFFSITE and c.location.startswith(pack.pack_id + "/")
                ]
                if not mine:
                    continue
                _remove_copy(catalog, txn, record, mine)
                number = next_number(catalog, txn, "replication.next")
                entry = {"uid": uid, "size": record.size, "time": record.received}
                txn.put(
                    sequence_key(number),
                    codec.dumps(entry),
                    db=catalog.db["replication"],
                )
                queued_again += 1
            _note_lost(catalog, txn, pack, uids)
            append_journal(
                catalog, txn, {"op": "offsite-lost", "pack": pack.pack_id, "uids": uids}
            )
    except lmdb.Error as exc:
        raise CatalogError(f"cannot queue again from {pack.pack_id}: {exc}") from exc
    return queued_again


def _note_lost(
    catalog: Catalog, txn: lmdb.Transaction, pack: PackRecord, uids: list[str]
) -> None:
    """Note in the pack's record which of its members were lost; forget
    the pack once none is left, so that later audits do not report it
    again. A partly lost pack counts as just checked: the audit goes on to
    the others before it reads this one again."""
    data = catalog.get(txn, "packs", pack.pack_id)
    if data is None:
        return
    lost = set(data.get("lost", [])) | set(uids)
    if lost >= set(pack.members):
        txn.delete(encode_key(pack.pack_id), db=catalog.db["packs"])
        _add_meta(catalog, txn, f"packbytes.{OFFSITE}", -pack.size)
        return
    data["lost"] = sorted(lost)
    data["verified"] = time.time()
    catalog._put(txn, "packs", pack.pack_id, data)


def _remove_copy(
    catalog: Catalog, txn: lmdb.Transaction, record: Any, lost: list[Any]
) -> None:
    study = catalog.get(txn, "studies", record.study_uid)
    if study is not None:
        count_copies(study, record, -1)
    record.copies = [c for c in record.copies if c not in lost]
    if study is not None:
        count_copies(study, record, +1)
        catalog._put(txn, "studies", record.study_uid, study)
    catalog._put(txn, "instances", record.sop_instance_uid, _with_key(record))
    _add_meta(catalog, txn, f"bytes.{OFFSITE}", -record.size * len(lost))


def prune_journal(catalog: Catalog, upto: int) -> int:
    """Drop journal entries numbered up to ``upto``: on the mirror already,
    and inside a catalog snapshot there. Returns how many were dropped."""
    dropped = 0
    try:
        with catalog.env.begin(write=True, db=catalog.db["journal"]) as txn:
            cursor = txn.cursor()
            while cursor.first() and int.from_bytes(cursor.key(), "big") <= upto:
                cursor.delete()
                dropped += 1
    except lmdb.Error as exc:
        raise CatalogError(f"cannot prune the journal: {exc}") from exc
    return dropped
