"""The rebuilt catalog made from a copy of the work catalog.

The work catalog already holds what the rebuilt one needs, in the same
form: patients, series, merged patients' pointers and every index, written
by the catalog's own writer as the lost appliance (or the replay of its
journal, or of the packs' manifests) made them. Writing them all anew, one
LMDB write each, is what made a rebuild slow: some eleven writes per
one-instance study. Here the work catalog is copied whole (LMDB copies its
pages, compacted) and only what differs is rewritten:

- each instance's copies: the one in the newest pack that holds it (as
  :mod:`appliance.restore.export` chooses it);
- each study's record, counted again from its instances as the writer
  would have counted them, received order kept;
- instances that never reached the mirror (or the volumes): taken out, with
  their series, studies and patients when nothing is left of those, and
  the counts and index entries that name them;
- the ACKs remembered for HL7 messages: those of patient changes kept,
  those of appointments and orders dropped with them
  (:mod:`appliance.catalog.answers`);
- the packs of other tiers, the queue, the journal, the RIS's orders and
  everything else that belonged to the lost appliance's own state: dropped;
  ``meta`` keeps only the schema version and the patient reference key,
  and gets the totals.

The result is what :func:`appliance.restore.export.export` writes, database
by database (a test compares both on generated catalogs); if it fails its
check, the rebuild falls back to that export, which recounts everything.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from appliance.catalog import answers, codec
from appliance.catalog.patients import _REFERENCE_KEY
from appliance.catalog.records import InstanceRecord, NewInstance
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import (
    INDEXES,
    Catalog,
    _with_key,
    count_in_study,
    encode_key,
    name_index_keys,
    new_study,
    write_errors,
)
from appliance.errors import CatalogError
from appliance.restore.export import (
    Exported,
    StudyReader,
    collector_paused,
    copy_at,
    copy_places,
    tell_missing,
)
from appliance.restore.mirror import MirrorContents

logger = logging.getLogger(__name__)

# Called with the instances written so far, every _TELL_EVERY of them.
Written = Callable[[int], None]
_TELL_EVERY = 1000

# What the rebuilt catalog carries over from the work catalog as it is:
# the records and their indexes (a study's packs on volumes indexed again).
_KEPT = {
    "meta",
    "patients",
    "merged",
    "studies",
    "series",
    "instances",
    "packs",
    answers.DATABASE,
    *(index for index in INDEXES if index != "idx.pack.study"),
}
# The fields of records as this version's writer lays them out: a record
# in this form is kept as it is, bar what a rebuild changes in it.
_INSTANCE_FIELDS = [
    *_with_key(InstanceRecord("", "", "", "", "", 0, "", "", 0.0, {})),
]
_STUDY_FIELDS = [
    *new_study(
        NewInstance(InstanceRecord("", "", "", "", "", 0, "", "", 0.0, {}), {}, {}, {}),
        {},
    ),
    "calling_aes",
]
# Kept in ``meta``; the rest is written again.
_META_KEPT = (b"schema_version", _REFERENCE_KEY)


def adopt(
    work: Catalog,
    rebuilt: Path,
    map_size: int,
    contents: MirrorContents,
    written: Written | None = None,
) -> tuple[Catalog, Exported]:
    """Copy ``work`` to the empty folder ``rebuilt`` and make the copy the
    rebuilt catalog; the catalog, open, and what it holds. ``written`` is
    told how many instances are written, every so many."""
    places = copy_places(work, contents)
    rebuilt.mkdir(parents=True, exist_ok=True)
    try:
        # Into the page cache, where LMDB's own copy would write past it
        # and wait for the disk: the rebuilt catalog is flushed whole
        # before it is marked checked.
        with open(rebuilt / "data.mdb", "xb") as copy:
            work.env.copyfd(copy.fileno(), compact=True)
    except (OSError, lmdb.Error) as exc:
        raise CatalogError(f"cannot copy the work catalog: {exc}") from exc
    final = Catalog(rebuilt, map_size, durable=False)
    try:
        exported = _rewrite(work, final, contents, places, written)
    except BaseException:
        final.close()
        raise
    return final, exported


@dataclass
class _Dropped:
    """What instances taken out leave a patient with fewer of."""

    studies: int = 0
    series: int = 0
    instances: int = 0


@dataclass
class _Totals:
    tier_bytes: int | None = None  # None: no instance has a copy
    stored: int = 0
    patients: dict[str, _Dropped] = field(default_factory=dict)
    # Studies whose record cannot be kept with only its copies counted
    # again: one of their instances never reached the tier, or one was
    # recorded in another form than this version's writer gives.
    recount: set[str] = field(default_factory=set)
    # Instances of each study without a verified copy on the tier.
    unverified: Counter[str] = field(default_factory=Counter)


def _rewrite(
    work: Catalog,
    final: Catalog,
    contents: MirrorContents,
    places: Any,
    written: Written | None = None,
) -> Exported:
    result = Exported()
    totals = _Totals()
    tier = contents.tier
    with (
        write_errors("cannot write the rebuilt catalog"),
        collector_paused(),
        work.read() as source,
        final.env.begin(write=True) as txn,
    ):
        _drop_the_rest(final, txn)
        answers.drop_unrestored(final, txn)
        pack_bytes = _packs(work, source, final, txn, contents)
        passes = _Pass(work, source, final, txn, places, tier, result, totals, written)
        passes.instances()
        passes.studies()
        _patients_again(final, txn, totals)
        _meta(final, txn, tier, totals, pack_bytes)
    result.instances = totals.stored
    tell_missing(result, contents)
    return result


def _drop_the_rest(final: Catalog, txn: lmdb.Transaction) -> None:
    """Empty the databases the rebuilt catalog starts without, and delete
    those the catalog does not know (the restore's own scratch lists)."""
    for name, db in final.db.items():
        if name not in _KEPT:
            txn.drop(db, delete=False)
    known = {name.encode() for name in final.db}
    unknown = [bytes(key) for key, _ in txn.cursor() if bytes(key) not in known]
    for raw_name in unknown:
        txn.drop(final.env.open_db(raw_name, txn=txn, create=False), delete=True)


def _packs(
    work: Catalog,
    source: lmdb.Transaction,
    final: Catalog,
    txn: lmdb.Transaction,
    contents: MirrorContents,
) -> int | None:
    """Keep the packs on the tier restored from (their records as they are),
    drop the others; their bytes (None when there is none)."""
    packs = final.db["packs"]
    total = None
    for pack_id, data in work.all_records(source, "packs"):
        if data.get("tier") != contents.tier:
            txn.delete(encode_key(pack_id), db=packs)
            continue
        if contents.tier != OFFSITE:
            txn.put(
                encode_key(data["study_uid"]),
                encode_key(pack_id),
                db=final.db["idx.pack.study"],
                dupdata=True,
            )
        total = (total or 0) + data["size"]
    return total


@dataclass
class _Pass:
    """What the passes over the work catalog read from and write to."""

    work: Catalog
    source: lmdb.Transaction  # reads the work catalog
    final: Catalog
    txn: lmdb.Transaction  # writes the rebuilt catalog
    places: Any
    tier: str
    result: Exported
    totals: _Totals
    written: Written | None = None

    def instances(self) -> None:
        """Every instance that reached the tier with its copy there, in one
        pass in key order; those that did not are left for their study's
        recount, which takes them out."""
        totals = self.totals
        instances = self.final.db["instances"]
        for key, raw in self.source.cursor(db=self.work.db["instances"]):
            data = codec.loads(raw)
            study_uid = data["study"]
            if not any(copy["tier"] == self.tier for copy in data["copies"]):
                totals.recount.add(study_uid)
                continue
            if list(data) != _INSTANCE_FIELDS:
                # Written by another version: made again as this one writes it.
                data = _with_key(InstanceRecord.from_json(data["key"], data))
                totals.recount.add(study_uid)
            place = self.source.get(key, db=self.places)
            copy = None if place is None else copy_at(self.tier, place)
            data["copies"] = [] if copy is None else [copy.as_json()]
            self.txn.put(key, codec.dumps(data), db=instances)
            totals.stored += 1
            if self.written is not None and totals.stored % _TELL_EVERY == 0:
                self.written(totals.stored)
            if copy is None or not copy.verified:
                totals.unverified[study_uid] += 1
            if copy is None:
                continue
            totals.tier_bytes = (totals.tier_bytes or 0) + data["size"]
            if not copy.verified:
                pack_id = copy.location.partition("/")[0]
                self.result.missing.setdefault(pack_id, []).append(data["key"])

    def studies(self) -> None:
        """Every study's record: as it is with its copies counted again, or
        counted again from its instances where :meth:`instances` left it to
        be."""
        studies = self.final.db["studies"]
        reader = StudyReader(self.work, self.source, self.tier)
        for key, raw in self.source.cursor(db=self.work.db["studies"]):
            study = codec.loads(raw)
            uid = study["key"]
            if uid in self.totals.recount or list(study) != _STUDY_FIELDS:
                group = reader.group(bytes(key), study)
                if group:
                    self._study_again(group)
                continue
            verified = study["instances"] - self.totals.unverified[uid]
            study["copies"] = {self.tier: verified} if verified > 0 else {}
            # As the writer starts a study's record from its first instance.
            study["last_access"] = study["received"]
            self.txn.put(key, codec.dumps(study), db=studies)

    def _study_again(self, group: list[tuple[NewInstance, bool]]) -> None:
        """One study counted again from its instances (in the order
        received), with what never reached the tier taken out; its
        instances that did were written already."""
        survivors = []
        lost = []
        for item, has_copy in group:
            record = item.record
            uid = record.sop_instance_uid
            if not has_copy:
                self.result.lost.append(
                    {"sop_instance_uid": uid, "study": record.study_uid}
                )
                lost.append(item)
                continue
            place = self.source.get(encode_key(uid), db=self.places)
            if place is not None:
                record.copies = [copy_at(self.tier, place)]
            survivors.append(item)
        study_uid = group[0][0].record.study_uid
        if survivors:
            self.txn.put(
                encode_key(study_uid),
                codec.dumps(_counted(survivors)),
                db=self.final.db["studies"],
            )
        if lost:
            _take_out(self.final, self.txn, study_uid, survivors, lost, self.totals)


def _counted(survivors: list[NewInstance]) -> dict[str, object]:
    """The study's record as the writer makes it from these instances."""
    study = new_study(survivors[0], dict(survivors[0].study))
    seen: set[str] = set()
    for item in survivors:
        series_uid = item.record.series_uid
        count_in_study(study, item, series_uid not in seen)
        seen.add(series_uid)
    return study


def _take_out(
    final: Catalog,
    txn: lmdb.Transaction,
    study_uid: str,
    survivors: list[NewInstance],
    lost: list[NewInstance],
    totals: _Totals,
) -> None:
    """Remove the instances that never reached the tier, and the series,
    study and index entries left empty; note what the patient loses."""
    patient = lost[0].record.patient
    dropped = totals.patients.setdefault(patient, _Dropped())
    dropped.instances += len(lost)
    for item in lost:
        record = item.record
        txn.delete(encode_key(record.sop_instance_uid), db=final.db["instances"])
        txn.delete(
            encode_key(record.series_uid),
            encode_key(record.sop_instance_uid),
            db=final.db["idx.instance.series"],
        )
    left = Counter(item.record.series_uid for item in survivors)
    for series_uid in {item.record.series_uid for item in lost}:
        key = encode_key(series_uid)
        if left[series_uid]:
            series = _held(txn, key, final.db["series"])
            series["instances"] = left[series_uid]
            txn.put(key, codec.dumps(series), db=final.db["series"])
            continue
        dropped.series += 1
        txn.delete(key, db=final.db["series"])
        txn.delete(encode_key(study_uid), key, db=final.db["idx.series.study"])
    if survivors:
        return
    dropped.studies += 1
    first = lost[0]
    value = encode_key(study_uid)
    txn.delete(encode_key(study_uid), db=final.db["studies"])
    txn.delete(encode_key(patient), value, db=final.db["idx.study.patient"])
    accession = first.study.get("AccessionNumber")
    if accession:
        txn.delete(encode_key(accession), value, db=final.db["idx.study.accession"])
    study_date = first.study.get("StudyDate")
    if study_date:
        date = encode_key(study_date.replace(".", "")[:8])
        txn.delete(date, value, db=final.db["idx.study.date"])
    for group in name_index_keys(first.patient.get("PatientName")):
        txn.delete(encode_key(group), value, db=final.db["idx.study.name"])


def _patients_again(final: Catalog, txn: lmdb.Transaction, totals: _Totals) -> None:
    """Patients that lost instances: counted down, or taken out with their
    name index entries when nothing of theirs is left."""
    for key, dropped in totals.patients.items():
        raw_key = encode_key(key)
        patient = _held(txn, raw_key, final.db["patients"])
        patient["studies"] -= dropped.studies
        patient["series"] -= dropped.series
        patient["instances"] -= dropped.instances
        if patient["instances"] > 0:
            txn.put(raw_key, codec.dumps(patient), db=final.db["patients"])
            continue
        txn.delete(raw_key, db=final.db["patients"])
        for group in name_index_keys(patient["attrs"].get("PatientName")):
            txn.delete(encode_key(group), raw_key, db=final.db["idx.patient.name"])


def _meta(
    final: Catalog,
    txn: lmdb.Transaction,
    tier: str,
    totals: _Totals,
    pack_bytes: int | None,
) -> None:
    """``meta`` as a bulk load leaves it: the schema version, the patient
    reference key, and the totals."""
    meta = final.db["meta"]
    kept = {key: txn.get(key, db=meta) for key in _META_KEPT}
    txn.drop(meta, delete=False)
    for key, value in kept.items():
        if value is not None:
            txn.put(key, bytes(value), db=meta)
    written = {
        f"bytes.{tier}": totals.tier_bytes,
        f"packbytes.{tier}": pack_bytes,
        "replication.next": totals.stored + 1 if totals.stored else None,
    }
    for name, number in written.items():
        if number is not None:
            txn.put(name.encode(), str(number).encode(), db=meta)


def _held(txn: lmdb.Transaction, key: bytes, db: Any) -> dict[str, Any]:
    """A record the copied catalog must hold."""
    raw = txn.get(key, db=db)
    if raw is None:
        raise CatalogError(f"the work catalog lacks the record {key!r}")
    record: dict[str, Any] = codec.loads(raw)
    return record
