"""Loading an empty catalog in bulk: what the catalog's writer and the
copy recording would write, in one transaction, without a journal entry
or a queue entry per instance.

A rebuilt catalog is written this way (``restore/export.py``): it starts
empty, nobody else writes to it, it is thrown away unless it passes its
check, and its journal and queue would be dropped afterwards anyway.
Instances come with their copies (the export chooses each one's pack
first), packs after them. Everything it ends with (records, counts,
indexes, copies, the ``meta`` totals and counters) is what
:meth:`Catalog.record` of the same instances followed by
:func:`~appliance.catalog.replication.mark_replicated` (packs on the
mirror) or :func:`~appliance.catalog.copies.record_pack` (packs on
volumes), with no copy to add, would have left; a test compares the two.
Rules that only matter in a catalog that holds something (merged
patients, the RIS's orders) are refused at the start rather than followed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import lmdb

from appliance.catalog import codec
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord, NewInstance
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import (
    _MAX_KEY,
    Catalog,
    Outcome,
    _with_key,
    count_in_study,
    encode_key,
    name_index_keys,
    new_study,
    write_errors,
)
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

# Patients, studies and series a load holds in memory at most: about
# 1 KB each with the test's made-up attributes, some 40 MB, whatever the
# size of the archive.
HELD = 40_000


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

    Instance and pack records and index entries go straight into the
    transaction; the copies packs give are read back from it. Patients,
    studies and series change with every instance and copy: the ``held``
    most recently used stay in memory, the others wait in the transaction
    until needed again. LMDB writes the pages of a large transaction out to
    the file as it goes, so that a load takes the same memory whatever the
    size of the archive.
    """

    def __init__(self, catalog: Catalog, held: int = HELD) -> None:
        if held < 4:
            # One instance touches three at once: they must stay held.
            raise ValueError(f"held must be 4 or more, not {held}")
        self.catalog = catalog
        _refuse_unless_empty(catalog)
        self.held = held
        # (database, key) -> record, least recently used first.
        self._levels: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self.totals: dict[str, int] = {}
        # How many times the writer would have queued an instance.
        self.queued = 0
        self.studies = 0
        self.packs = 0
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
        series = self._level("series", record.series_uid)
        if series is not None and series["study"] != record.study_uid:
            return Outcome.INCONSISTENT
        study = self._level("studies", record.study_uid)
        if study is not None and study["patient"] != record.patient:
            return Outcome.INCONSISTENT

        patient = self._add_patient(item, study is None, series is None)
        if study is None:
            study = self._new_study(item, patient)
        count_in_study(study, item, series is None)
        if series is None:
            series = self._new_series(item)
        series["instances"] += 1
        copies = [Copy(c.tier, c.location, c.verified) for c in record.copies]
        self._put_instance(
            replace(record, attributes=dict(record.attributes), copies=copies)
        )
        self._index("idx.instance.series", record.series_uid, record.sop_instance_uid)
        for copy in copies:
            self._add_total(f"bytes.{copy.tier}", record.size)
        self.queued += 1
        return Outcome.STORED

    def _add_patient(
        self, item: NewInstance, new_study: bool, new_series: bool
    ) -> dict[str, Any]:
        record = item.record
        patient = self._level("patients", record.patient)
        if patient is None:
            patient = {"key": record.patient, "attrs": dict(item.patient)}
            patient.update(studies=0, series=0, instances=0)
            for name in name_index_keys(item.patient.get("PatientName")):
                self._index("idx.patient.name", name, record.patient)
            self._hold("patients", record.patient, patient)
        patient["studies"] += new_study
        patient["series"] += new_series
        patient["instances"] += 1
        return patient

    def _new_study(self, item: NewInstance, patient: dict[str, Any]) -> dict[str, Any]:
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
        for group in name_index_keys(patient["attrs"].get("PatientName")):
            self._index("idx.study.name", group, uid)
        study = new_study(item, dict(item.study))
        self.studies += 1
        self._hold("studies", uid, study)
        return study

    def _new_series(self, item: NewInstance) -> dict[str, Any]:
        record = item.record
        series: dict[str, Any] = {"key": record.series_uid}
        series.update(attrs=dict(item.series), study=record.study_uid, instances=0)
        self._index("idx.series.study", record.study_uid, record.series_uid)
        self._hold("series", record.series_uid, series)
        return series

    # -- packs and copies --------------------------------------------------

    def add_pack(self, pack: PackRecord) -> None:
        """Record a pack, as ``mark_replicated`` (the mirror) or
        ``record_pack`` (volumes) would with no copy to add: the copies it
        holds came with their instances."""
        raw_id = _key(pack.pack_id)
        txn = self._writing()
        known = txn.get(raw_id, db=self.catalog.db["packs"]) is not None
        self._put("packs", raw_id, codec.dumps(pack.as_json()))
        if not known:
            self.packs += 1
        if pack.tier != OFFSITE:
            self._index("idx.pack.study", pack.study_uid, pack.pack_id)
        # The mirror's side counts a pack recorded again once; volumes' twice.
        if pack.tier != OFFSITE or not known:
            self._add_total(f"packbytes.{pack.tier}", pack.size)

    # -- writing -----------------------------------------------------------

    def commit(self) -> None:
        """Write the patients, studies and series still held and the totals;
        then end the transaction."""
        txn = self._writing()
        try:
            with write_errors("cannot write the catalog"):
                while self._levels:
                    self._let_go()
                self._put_meta(txn)
                txn.commit()
        finally:
            self.abort()
        logger.info(
            "catalog %s loaded: %d instances in %d studies, %d packs",
            self.catalog.path,
            self.queued,
            self.studies,
            self.packs,
        )

    def abort(self) -> None:
        """Drop what was written (nothing, once committed)."""
        txn, self._txn = self._txn, None
        self._levels.clear()
        if txn is not None:
            txn.abort()

    def _writing(self) -> lmdb.Transaction:
        if self._txn is None:
            raise CatalogError(f"the bulk load of {self.catalog.path} has ended")
        return self._txn

    def _instance(self, uid: str) -> InstanceRecord | None:
        raw = self._writing().get(_key(uid), db=self.catalog.db["instances"])
        return None if raw is None else InstanceRecord.from_json(uid, codec.loads(raw))

    def _put_instance(self, record: InstanceRecord) -> None:
        uid = record.sop_instance_uid
        self._put("instances", _key(uid), codec.dumps(_with_key(record)))

    def _put(self, db: str, key: bytes, value: bytes) -> None:
        """One pair, wherever it goes: instances come in no key order."""
        try:
            with write_errors("cannot write the catalog"):
                self._writing().put(key, value, db=self.catalog.db[db])
        except CatalogError:
            self.abort()
            raise

    def _level(self, db: str, key: str) -> dict[str, Any] | None:
        """The patient, study or series record ``key``, held from now on."""
        record = self._levels.get((db, key))
        if record is not None:
            self._levels.move_to_end((db, key))
            return record
        raw = self._writing().get(_key(key), db=self.catalog.db[db])
        if raw is None:
            return None
        record = codec.loads(raw)
        self._hold(db, key, record)
        return record

    def _hold(self, db: str, key: str, record: dict[str, Any]) -> None:
        self._levels[(db, key)] = record
        # The least recently used goes: never one of the three an instance
        # has just touched, which come last.
        while len(self._levels) > self.held:
            self._let_go()

    def _let_go(self) -> None:
        (db, key), record = self._levels.popitem(last=False)
        self._put(db, _key(key), codec.dumps(record))

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
        # Indexes allow duplicates: the same pair again adds nothing.
        self._put(index, _key(key), _key(value))

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
