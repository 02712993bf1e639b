"""Loading an empty catalog in bulk: what the catalog's writer and the
copy recording would write, in one transaction, without a journal entry
or a queue entry per instance.

A rebuilt catalog is written this way (``restore/export.py``): it starts
empty, nobody else writes to it, it is thrown away unless it passes its
check, and its journal and queue would be dropped afterwards anyway.
Everything it ends with (records, counts, indexes, copies, the ``meta``
totals and counters) is what :meth:`Catalog.record` followed by
:func:`~appliance.catalog.replication.mark_replicated` (packs on the
mirror) or :func:`~appliance.catalog.copies.record_pack` (packs on
volumes) and :func:`~appliance.catalog.copies.mark_unverified` would have
left, a test compares the two. Rules that only matter in a catalog that
holds something (merged patients, the RIS's orders) are refused at the
start rather than followed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb

from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord, NewInstance
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import (
    _MAX_KEY,
    Catalog,
    Outcome,
    _loads,
    _with_key,
    count_copies,
    encode_key,
    name_index_keys,
)
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

# One encoder for every value: the catalog's compact JSON, as Catalog._put
# writes it, without building an encoder per value.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# Databases that must be empty for a bulk load to give what the writer would.
_EMPTY = (
    "patients",
    "studies",
    "series",
    "instances",
    "packs",
    "merged",
    "appointments",
)


class BulkLoad:
    """Instances, then packs, written as they come in one write transaction
    that :meth:`commit` ends.

    What is kept in memory is what a study, series or patient needs: their
    records and index keys, written at the commit in key order. Instance
    and pack records go straight into the transaction, where the copies
    found later are read back from; LMDB writes the pages of a large
    transaction out to the file as it goes, so the memory a load takes
    grows with the number of studies, not with the number of instances.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        _refuse_unless_empty(catalog)
        self.patients: dict[str, dict[str, Any]] = {}
        self.studies: dict[str, dict[str, Any]] = {}
        self.series: dict[str, dict[str, Any]] = {}
        self.indexes: dict[str, set[tuple[bytes, bytes]]] = {}
        self.totals: dict[str, int] = {}
        # How many times the writer would have queued an instance.
        self.queued = 0
        self.packs = 0
        # The members of the pack last looked at, read once for the calls
        # that follow on the same pack.
        self._recent: dict[str, InstanceRecord | None] = {}
        self._txn: lmdb.Transaction | None = catalog.env.begin(write=True)

    # -- instances -------------------------------------------------------

    def add(self, item: NewInstance) -> Outcome:
        """Record one instance as ``Catalog.record(..., "keep_first")`` would."""
        record = item.record
        existing = self._instance(record.sop_instance_uid)
        if existing is not None:
            if existing.content_sha256 == record.content_sha256:
                return Outcome.IDENTICAL
            return Outcome.KEPT_FIRST
        if self._conflicts(record):
            return Outcome.INCONSISTENT

        self._add_patient(item)
        self._add_study(item)
        self._add_series(item)
        copies = [Copy(c.tier, c.location, c.verified) for c in record.copies]
        self._put_instance(_copy_of(record, copies))
        # One entry per instance: written now rather than kept.
        self._put(
            "idx.instance.series",
            _key(record.series_uid),
            _key(record.sop_instance_uid),
        )
        for copy in copies:
            self._add_total(f"bytes.{copy.tier}", record.size)
        self.queued += 1
        return Outcome.STORED

    def _conflicts(self, record: InstanceRecord) -> bool:
        """The writer's hierarchy check: a series under another study, or a
        study under another patient."""
        series = self.series.get(record.series_uid)
        if series is not None and series["study"] != record.study_uid:
            return True
        study = self.studies.get(record.study_uid)
        return study is not None and study["patient"] != record.patient

    def _add_patient(self, item: NewInstance) -> None:
        record = item.record
        patient = self.patients.get(record.patient)
        if patient is None:
            patient = {"key": record.patient, "attrs": dict(item.patient)}
            patient.update(studies=0, series=0, instances=0)
            for name in name_index_keys(item.patient.get("PatientName")):
                self._index("idx.patient.name", name, record.patient)
            self.patients[record.patient] = patient
        patient["studies"] += record.study_uid not in self.studies
        patient["series"] += record.series_uid not in self.series
        patient["instances"] += 1

    def _add_study(self, item: NewInstance) -> None:
        record = item.record
        study = self.studies.get(record.study_uid)
        if study is None:
            study = self.studies[record.study_uid] = self._new_study(item)
        study["series"] += record.series_uid not in self.series
        study["instances"] += 1
        study["bytes"] += record.size
        count_copies(study, record, +1)
        modality = item.series.get("Modality")
        if modality and modality not in study["modalities"]:
            study["modalities"].append(modality)
        sop_class = record.attributes.get("SOPClassUID")
        if sop_class and sop_class not in study["sop_classes"]:
            study["sop_classes"].append(sop_class)
        senders = study.setdefault("calling_aes", [])
        if item.calling_ae and item.calling_ae not in senders:
            senders.append(item.calling_ae)

    def _new_study(self, item: NewInstance) -> dict[str, Any]:
        record = item.record
        uid = record.study_uid
        self._index("idx.study.patient", record.patient, uid)
        accession = item.study.get("AccessionNumber")
        if accession:
            self._index("idx.study.accession", accession, uid)
        study_date = item.study.get("StudyDate")
        if study_date:
            self._index("idx.study.date", study_date.replace(".", "")[:8], uid)
        # The name the patient record holds: that of its first instance.
        name = self.patients[record.patient]["attrs"].get("PatientName")
        for group in name_index_keys(name):
            self._index("idx.study.name", group, uid)
        return {
            "key": uid,
            "attrs": dict(item.study),
            "patient": record.patient,
            "series": 0,
            "instances": 0,
            "bytes": 0,
            "modalities": [],
            "sop_classes": [],
            "received": record.received,
            "last_access": record.received,
            "copies": {},
        }

    def _add_series(self, item: NewInstance) -> None:
        record = item.record
        series = self.series.get(record.series_uid)
        if series is None:
            series = {"key": record.series_uid, "attrs": dict(item.series)}
            series.update(study=record.study_uid, instances=0)
            self._index("idx.series.study", record.study_uid, record.series_uid)
            self.series[record.series_uid] = series
        series["instances"] += 1

    # -- packs and copies --------------------------------------------------

    def missing_copies(self, pack: PackRecord) -> dict[str, str]:
        """SHA-256 by SOP Instance UID of the pack's members recorded here
        that have no verified copy on the pack's tier yet."""
        self._recent = {uid: self._instance(uid) for uid in pack.members}
        return {
            uid: record.sha256
            for uid, record in self._recent.items()
            if record is not None and record.copy_on(pack.tier) is None
        }

    def add_pack(self, pack: PackRecord, checksums: dict[str, str]) -> int:
        """Record a pack and a copy in it for each member whose SHA-256
        (``checksums``) matches and that has no verified copy on the tier,
        as ``mark_replicated`` (the mirror) or ``record_pack`` (volumes)
        would; the copies added."""
        raw_id = _key(pack.pack_id)
        txn = self._writing()
        known = txn.get(raw_id, db=self.catalog.db["packs"]) is not None
        self._put("packs", raw_id, _encode(pack.as_json()).encode())
        if not known:
            self.packs += 1
        if pack.tier != OFFSITE:
            self._index("idx.pack.study", pack.study_uid, pack.pack_id)
        added = 0
        for uid, member in pack.members.items():
            location = f"{pack.pack_id}/{member}"
            added += self._add_copy(uid, checksums.get(uid), pack.tier, location)
        # The mirror's side counts a pack recorded again once; volumes' twice.
        if pack.tier != OFFSITE or not known:
            self._add_total(f"packbytes.{pack.tier}", pack.size)
        return added

    def _add_copy(self, uid: str, sha256: str | None, tier: str, where: str) -> bool:
        record = self._instance(uid)
        if record is None or record.sha256 != sha256:
            return False
        if record.copy_on(tier) is not None:
            return False
        study = self.studies[record.study_uid]
        count_copies(study, record, -1)
        record.copies.append(Copy(tier, where, verified=True))
        count_copies(study, record, +1)
        self._put_instance(record)
        self._add_total(f"bytes.{tier}", record.size)
        return True

    def copies_in(self, pack: PackRecord, uids: Iterable[str]) -> list[str]:
        """Those of ``uids`` that have a copy (verified or not) in ``pack``."""
        prefix = pack.pack_id + "/"
        return [
            uid
            for uid in uids
            if (record := self._instance(uid)) is not None
            and any(
                c.tier == pack.tier and c.location.startswith(prefix)
                for c in record.copies
            )
        ]

    def mark_unverified(self, pack_id: str, uids: list[str]) -> int:
        """As ``copies.mark_unverified``: the copies ``pack_id`` holds for
        ``uids`` stay listed but are not counted; how many changed."""
        changed = 0
        for uid in uids:
            record = self._instance(uid)
            if record is None:
                continue
            damaged = [
                c
                for c in record.copies
                if c.verified and c.location.startswith(pack_id + "/")
            ]
            if not damaged:
                continue
            study = self.studies[record.study_uid]
            count_copies(study, record, -1)
            for copy in damaged:
                copy.verified = False
            count_copies(study, record, +1)
            self._put_instance(record)
            changed += len(damaged)
        return changed

    # -- writing -----------------------------------------------------------

    def commit(self) -> None:
        """Write the patients, studies, series and indexes, each database in
        key order, and the totals; then end the transaction."""
        txn = self._writing()
        try:
            self._put_all(txn, "patients", _values(self.patients))
            self._put_all(txn, "studies", _values(self.studies))
            self._put_all(txn, "series", _values(self.series))
            for index, pairs in self.indexes.items():
                self._put_all(txn, index, sorted(pairs))
            self._put_meta(txn)
            txn.commit()
        except lmdb.MapFullError as exc:
            raise CatalogError(
                "the catalog is full; raise storage.catalog_max_size"
            ) from exc
        except lmdb.Error as exc:
            raise CatalogError(f"cannot write the catalog: {exc}") from exc
        finally:
            self.abort()
        logger.info(
            "catalog %s loaded: %d instances in %d studies, %d packs",
            self.catalog.path,
            self.queued,
            len(self.studies),
            self.packs,
        )

    def abort(self) -> None:
        """Drop what was written (nothing, once committed)."""
        txn, self._txn = self._txn, None
        self._recent = {}
        if txn is not None:
            txn.abort()

    def _writing(self) -> lmdb.Transaction:
        if self._txn is None:
            raise CatalogError(f"the bulk load of {self.catalog.path} has ended")
        return self._txn

    def _instance(self, uid: str) -> InstanceRecord | None:
        if uid in self._recent:
            return self._recent[uid]
        raw = self._writing().get(_key(uid), db=self.catalog.db["instances"])
        return None if raw is None else InstanceRecord.from_json(uid, _loads(raw))

    def _put_instance(self, record: InstanceRecord) -> None:
        uid = record.sop_instance_uid
        self._put("instances", _key(uid), _encode(_with_key(record)).encode())
        if uid in self._recent:
            self._recent[uid] = record

    def _put(self, db: str, key: bytes, value: bytes) -> None:
        """One pair, wherever it goes: instances come in no key order."""
        try:
            self._writing().put(key, value, db=self.catalog.db[db])
        except lmdb.MapFullError as exc:
            self.abort()
            raise CatalogError(
                "the catalog is full; raise storage.catalog_max_size"
            ) from exc
        except lmdb.Error as exc:
            self.abort()
            raise CatalogError(f"cannot write the catalog: {exc}") from exc

    def _put_all(
        self, txn: lmdb.Transaction, db: str, pairs: Iterable[tuple[bytes, bytes]]
    ) -> None:
        cursor = txn.cursor(db=self.catalog.db[db])
        # In key order, so that LMDB appends instead of searching; a pair
        # out of order is refused, not written elsewhere.
        consumed, added = cursor.putmulti(pairs, append=True)
        if consumed != added:
            raise CatalogError(f"{db}: {consumed - added} record(s) not written")

    def _put_meta(self, txn: lmdb.Transaction) -> None:
        meta = self.catalog.db["meta"]
        totals = dict(self.totals)
        if self.queued:
            # The writer numbers each queue entry; the queue itself is
            # dropped once the catalog is rebuilt, its counter stays.
            totals["replication.next"] = self.queued + 1
        for key, value in totals.items():
            txn.put(key.encode(), str(value).encode(), db=meta)

    def _index(self, index: str, key: str, value: str) -> None:
        self.indexes.setdefault(index, set()).add((_key(key), _key(value)))

    def _add_total(self, key: str, amount: int) -> None:
        self.totals[key] = self.totals.get(key, 0) + amount


def _refuse_unless_empty(catalog: Catalog) -> None:
    with catalog.read() as txn:
        held = [db for db in _EMPTY if txn.stat(catalog.db[db])["entries"]]
    if held:
        raise CatalogError(
            f"the catalog at {catalog.path} is not empty ({', '.join(held)}): "
            "a bulk load writes an empty catalog only"
        )


def _key(text: str) -> bytes:
    """As ``encode_key``, the common case without a further call."""
    raw = text.encode("utf-8", "surrogateescape")
    return raw if len(raw) <= _MAX_KEY else encode_key(text)


def _values(records: dict[str, Any]) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of records by key, in the order LMDB keeps them."""
    keyed = sorted((_key(key), key) for key in records)
    for raw, key in keyed:
        yield raw, _encode(records[key]).encode()


def _copy_of(record: InstanceRecord, copies: list[Copy]) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=record.sop_instance_uid,
        series_uid=record.series_uid,
        study_uid=record.study_uid,
        patient=record.patient,
        transfer_syntax=record.transfer_syntax,
        size=record.size,
        sha256=record.sha256,
        content_sha256=record.content_sha256,
        received=record.received,
        attributes=dict(record.attributes),
        copies=copies,
    )
