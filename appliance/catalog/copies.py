"""Copies of studies on the tiers below online: packs, releases, staging.

Every change here is one write transaction, so that a crash leaves the
catalog either before or after it. A copy is recorded only after it was
read back and verified (the caller's duty); a release removes copies from
the catalog first and returns what the caller may then delete, so that a
crash between the two leaves an orphan file, never a record without data.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from appliance.catalog.records import Copy, InstanceRecord
from appliance.catalog.store import Catalog, _with_key, count_copies, encode_key
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)


@dataclass
class PackRecord:
    """A verified pack on a tier: where it is and which instances it holds."""

    pack_id: str
    study_uid: str
    tier: str
    location: str
    size: int
    sha256: str
    # SOP Instance UID -> the instance's member name in the pack
    members: dict[str, str]
    created: float = field(default_factory=time.time)
    verified: float = field(default_factory=time.time)
    key_id: str | None = None
    # Members found damaged on the mirror, whose instances were queued
    # again (by SOP Instance UID): an audit does not report them twice.
    lost: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = self.pack_id
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackRecord:
        data = dict(data)
        data.pop("key", None)
        return cls(**data)


@dataclass
class StudyCopies:
    """Where a study is: its size and, per tier, how many instances have a
    verified copy there."""

    study_uid: str
    instances: int
    size: int
    copies: dict[str, int]
    received: float
    last_access: float
    attributes: dict[str, str]
    modalities: list[str]
    calling_aes: list[str] = field(default_factory=list)

    def complete_on(self, tier: str) -> bool:
        """Every instance of the study has a verified copy on ``tier``."""
        return self.instances > 0 and self.copies.get(tier, 0) >= self.instances


@dataclass
class Release:
    """What a release did: the copies and packs to delete now that the
    catalog no longer counts them, or why nothing was released."""

    removed: list[tuple[str, str]]
    packs: list[PackRecord] = field(default_factory=list)
    refused: str = ""


def next_pack_id(catalog: Catalog) -> str:
    """A new pack ID: ``p-`` and a number never used before, no patient data."""
    with catalog.env.begin(write=True, db=catalog.db["meta"]) as txn:
        number = int(txn.get(b"next_pack", b"1"))
        txn.put(b"next_pack", str(number + 1).encode())
    return f"p-{number:09d}"


def record_pack(catalog: Catalog, pack: PackRecord, sha256: dict[str, str]) -> int:
    """Record a verified pack and add a copy on its tier to every instance it
    holds whose checksum (``sha256`` by SOP Instance UID) still matches the
    catalog; returns the number of copies added."""
    try:
        with catalog.env.begin(write=True) as txn:
            catalog._put(txn, "packs", pack.pack_id, pack.as_json())
            txn.put(
                encode_key(pack.study_uid),
                encode_key(pack.pack_id),
                db=catalog.db["idx.pack.study"],
                dupdata=True,
            )
            adder = CopyAdder(catalog, txn)
            added = 0
            for uid, member in pack.members.items():
                location = f"{pack.pack_id}/{member}"
                added += adder.add(uid, sha256.get(uid), pack.tier, location)
            adder.finish()
            _add_meta(catalog, txn, f"packbytes.{pack.tier}", pack.size)
            return added
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record pack {pack.pack_id}: {exc}") from exc


def add_copies(
    catalog: Catalog, tier: str, copies: dict[str, tuple[str, str]]
) -> list[tuple[str, str]]:
    """Add a verified copy on ``tier`` to instances (SOP Instance UID ->
    (location, sha256)); returns the (tier, location) of copies not added
    (the instance is gone, changed, or already has one there), for the
    caller to delete."""
    unused: list[tuple[str, str]] = []
    try:
        with catalog.env.begin(write=True) as txn:
            adder = CopyAdder(catalog, txn)
            for uid, (location, sha256) in copies.items():
                if not adder.add(uid, sha256, tier, location):
                    unused.append((tier, location))
            adder.finish()
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record copies on {tier}: {exc}") from exc
    return unused


def release(catalog: Catalog, study_uid: str, tier: str, min_copies: int) -> Release:
    """Remove the study's copies on ``tier`` from the catalog, if every
    instance with a copy there keeps at least ``min_copies`` (and never
    fewer than one) other verified copies; all or nothing."""
    keep = max(1, min_copies)
    try:
        with catalog.env.begin(write=True) as txn:
            records = list(_instances_of(catalog, txn, study_uid))
            for record in records:
                if not any(c.tier == tier for c in record.copies):
                    continue  # loses nothing here, however few copies it has
                others = [c for c in record.copies if c.tier != tier and c.verified]
                if len(others) < keep:
                    return Release(
                        [],
                        refused=f"instance {record.sop_instance_uid} would keep "
                        f"{len(others)} verified copies; {keep} required",
                    )
            removed = _remove_copies(catalog, txn, records, tier)
            return Release(removed, _remove_packs(catalog, txn, study_uid, tier))
    except lmdb.Error as exc:
        raise CatalogError(f"cannot release study {study_uid}: {exc}") from exc


def study_copies(
    catalog: Catalog, txn: lmdb.Transaction, uid: str
) -> StudyCopies | None:
    """Where one study is, from its record; None when it is not in the catalog."""
    study = catalog.get(txn, "studies", uid)
    if study is None:
        return None
    return StudyCopies(
        study_uid=uid,
        instances=study["instances"],
        size=study["bytes"],
        copies=dict(study.get("copies", {})),
        received=study["received"],
        last_access=study["last_access"],
        attributes=study["attrs"],
        modalities=list(study["modalities"]),
        calling_aes=list(study.get("calling_aes", [])),
    )


def all_study_copies(catalog: Catalog) -> Iterator[StudyCopies]:
    """Where every study is, in one read snapshot."""
    with catalog.read() as txn:
        for uid, _record in catalog.all_records(txn, "studies"):
            found = study_copies(catalog, txn, uid)
            if found is not None:
                yield found


def instances_of(catalog: Catalog, study_uid: str) -> list[InstanceRecord]:
    """Every instance record of a study."""
    with catalog.read() as txn:
        return list(_instances_of(catalog, txn, study_uid))


def packs_of(catalog: Catalog, study_uid: str) -> list[PackRecord]:
    """Every pack recorded for a study, on any tier."""
    with catalog.read() as txn:
        cursor = txn.cursor(db=catalog.db["idx.pack.study"])
        found = []
        if cursor.set_key(encode_key(study_uid)):
            for raw in cursor.iternext_dup():
                data = catalog.get(txn, "packs", bytes(raw).decode())
                if data is not None:
                    found.append(PackRecord.from_json(data))
        return found


def pack_counts(catalog: Catalog) -> dict[str, int]:
    """How many packs the catalog records on each tier (the mirror's too).

    The catalog keeps no count per tier, only the packs of all tiers
    together: this reads every pack record.
    """
    counted: Counter[str] = Counter()
    with catalog.read() as txn:
        for _key, data in catalog.all_records(txn, "packs"):
            counted[data["tier"]] += 1
    return dict(counted)


def _instances_of(
    catalog: Catalog, txn: lmdb.Transaction, study_uid: str
) -> Iterator[InstanceRecord]:
    for series_uid in catalog.index_values(txn, "idx.series.study", study_uid):
        for uid in catalog.index_values(txn, "idx.instance.series", series_uid):
            record = catalog.instance(txn, uid)
            if record is not None:
                yield record


class CopyAdder:
    """Verified copies added in one transaction. A study's record and the
    tier's byte total are read once and written once at :meth:`finish`,
    however many instances gain a copy: a pack of a study's 200 instances
    decoded and wrote its study record 200 times."""

    def __init__(self, catalog: Catalog, txn: lmdb.Transaction) -> None:
        self.catalog = catalog
        self.txn = txn
        self._studies: dict[str, dict[str, Any] | None] = {}
        self._bytes: dict[str, int] = {}

    def add(self, uid: str, sha256: str | None, tier: str, location: str) -> bool:
        """Whether the instance gained the copy (not if it was removed or
        replaced since the copy was made, or has one on ``tier``)."""
        record = self.catalog.instance(self.txn, uid)
        if record is None or record.sha256 != sha256:
            # Removed or replaced since the copy was made: it copies nothing.
            return False
        if record.copy_on(tier) is not None:
            return False

        study = self._study(record.study_uid)
        if study is not None:
            count_copies(study, record, -1)
        record.copies.append(Copy(tier, location, verified=True))
        if study is not None:
            count_copies(study, record, +1)
        self.catalog._put(self.txn, "instances", uid, _with_key(record))
        key = f"bytes.{tier}"
        self._bytes[key] = self._bytes.get(key, 0) + record.size
        return True

    def finish(self) -> None:
        """Write the studies and totals the copies changed."""
        for study_uid, study in self._studies.items():
            if study is not None:
                self.catalog._put(self.txn, "studies", study_uid, study)
        for key, amount in self._bytes.items():
            _add_meta(self.catalog, self.txn, key, amount)
        self._studies.clear()
        self._bytes.clear()

    def _study(self, study_uid: str) -> dict[str, Any] | None:
        if study_uid not in self._studies:
            self._studies[study_uid] = self.catalog.get(self.txn, "studies", study_uid)
        return self._studies[study_uid]


def _remove_copies(
    catalog: Catalog,
    txn: lmdb.Transaction,
    records: list[InstanceRecord],
    tier: str,
) -> list[tuple[str, str]]:
    removed: list[tuple[str, str]] = []
    for record in records:
        mine = [c for c in record.copies if c.tier == tier]
        if not mine:
            continue
        study = catalog.get(txn, "studies", record.study_uid)
        if study is not None:
            count_copies(study, record, -1)
        record.copies = [c for c in record.copies if c.tier != tier]
        if study is not None:
            count_copies(study, record, +1)
            catalog._put(txn, "studies", record.study_uid, study)
        catalog._put(txn, "instances", record.sop_instance_uid, _with_key(record))
        _add_meta(catalog, txn, f"bytes.{tier}", -record.size * len(mine))
        removed += [(copy.tier, copy.location) for copy in mine]
    return removed


def _remove_packs(
    catalog: Catalog, txn: lmdb.Transaction, study_uid: str, tier: str
) -> list[PackRecord]:
    """Forget the study's packs on ``tier``: no instance counts them now."""
    index = catalog.db["idx.pack.study"]
    removed = []
    for pack_id in list(catalog.index_values(txn, "idx.pack.study", study_uid)):
        data = catalog.get(txn, "packs", pack_id)
        if data is None or data["tier"] != tier:
            continue
        removed.append(PackRecord.from_json(data))
        txn.delete(encode_key(pack_id), db=catalog.db["packs"])
        txn.delete(encode_key(study_uid), encode_key(pack_id), db=index)
        _add_meta(catalog, txn, f"packbytes.{tier}", -int(data["size"]))
    return removed


def _add_meta(catalog: Catalog, txn: lmdb.Transaction, key: str, amount: int) -> None:
    meta = catalog.db["meta"]
    current = int(txn.get(key.encode(), b"0", db=meta))
    txn.put(key.encode(), str(current + amount).encode(), db=meta)


def mark_unverified(catalog: Catalog, pack_id: str, uids: list[str]) -> int:
    """Stop counting the copies that ``pack_id`` holds for ``uids`` (found
    damaged or missing): they stay listed, for the scrub to repair, but no
    release relies on them any more. Returns how many copies changed."""
    changed = 0
    try:
        with catalog.env.begin(write=True) as txn:
            for uid in uids:
                record = catalog.instance(txn, uid)
                if record is None:
                    continue
                damaged = [
                    c
                    for c in record.copies
                    if c.verified and c.location.startswith(pack_id + "/")
                ]
                if not damaged:
                    continue
                _set_verified(catalog, txn, record, damaged, False)
                changed += len(damaged)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot mark copies in {pack_id}: {exc}") from exc
    return changed


def _set_verified(
    catalog: Catalog,
    txn: lmdb.Transaction,
    record: InstanceRecord,
    chosen: list[Copy],
    verified: bool,
) -> None:
    """Mark ``chosen`` copies of ``record`` in ``txn``, keeping the study's
    per-tier counts in step."""
    study = catalog.get(txn, "studies", record.study_uid)
    if study is not None:
        count_copies(study, record, -1)
    for copy in chosen:
        copy.verified = verified
    if study is not None:
        count_copies(study, record, +1)
        catalog._put(txn, "studies", record.study_uid, study)
    catalog._put(txn, "instances", record.sop_instance_uid, _with_key(record))


def set_copy_verified(
    catalog: Catalog, uid: str, tier: str, location: str, verified: bool
) -> bool:
    """Count (or stop counting) one copy of an instance as verified: the
    scrub marks a damaged copy at once and again once it is repaired.
    Whether the copy is still in the catalog."""
    try:
        with catalog.env.begin(write=True) as txn:
            record = catalog.instance(txn, uid)
            if record is None:
                return False
            mine = [
                c for c in record.copies if (c.tier, c.location) == (tier, location)
            ]
            if not mine:
                return False
            _set_verified(catalog, txn, record, mine, verified)
            return True
    except lmdb.Error as exc:
        raise CatalogError(f"cannot mark the {tier} copy of {uid}: {exc}") from exc


def drop_replaced(catalog: Catalog, pack_id: str) -> PackRecord | None:
    """Forget the unverified copies ``pack_id`` holds of instances that
    have another verified copy on the pack's tier (a new pack replaced
    them); once the pack holds no copy at all, forget the pack too and
    return it, for the caller to delete."""
    try:
        with catalog.env.begin(write=True) as txn:
            data = catalog.get(txn, "packs", pack_id)
            if data is None:
                return None
            pack = PackRecord.from_json(data)
            holds = 0
            for uid in pack.members:
                holds += _drop_replaced_copy(catalog, txn, uid, pack)
            if holds:
                return None
            txn.delete(encode_key(pack_id), db=catalog.db["packs"])
            txn.delete(
                encode_key(pack.study_uid),
                encode_key(pack_id),
                db=catalog.db["idx.pack.study"],
            )
            _add_meta(catalog, txn, f"packbytes.{pack.tier}", -pack.size)
            return pack
    except lmdb.Error as exc:
        raise CatalogError(f"cannot forget pack {pack_id}: {exc}") from exc


def _drop_replaced_copy(
    catalog: Catalog, txn: lmdb.Transaction, uid: str, pack: PackRecord
) -> int:
    """Drop the instance's unverified copy in ``pack`` if another verified
    copy on the tier replaces it; how many copies the pack still holds (0
    or 1)."""
    record = catalog.instance(txn, uid)
    if record is None:
        return 0
    inside = [c for c in record.copies if c.location.startswith(pack.pack_id + "/")]
    if not inside:
        return 0
    if any(c.verified for c in inside) or record.copy_on(pack.tier) is None:
        return 1
    record.copies = [c for c in record.copies if c not in inside]
    catalog._put(txn, "instances", uid, _with_key(record))
    _add_meta(catalog, txn, f"bytes.{pack.tier}", -record.size * len(inside))
    return 0
