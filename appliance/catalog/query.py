"""C-FIND against the catalog: pick candidates from an index, then match.

The matching rules themselves live in :mod:`appliance.catalog.matching`;
this module chooses which records to look at, so that the common study
queries (by PatientID, AccessionNumber, StudyDate range, PatientName prefix,
StudyInstanceUID) read an index instead of the whole catalog, and joins each
record with its parents so that a key of any level can be matched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb
from pydicom.datadict import dictionary_VR

from appliance.catalog import matching
from appliance.catalog.records import (
    COMPUTED_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
)
from appliance.catalog.store import Catalog, fold_name

logger = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_DATE_TIME_PAIRS = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("ContentDate", "ContentTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("PatientBirthDate", "PatientBirthTime"),
)

Row = dict[str, str | None]


@dataclass
class Query:
    """A C-FIND request reduced to text: its level and its keys' values."""

    level: str
    keys: dict[str, str | None]
    combined_datetime: bool = False
    matchers: dict[str, matching.KeyMatcher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(
                f"QueryRetrieveLevel {self.level!r} is not one of {LEVELS}"
            )
        for keyword, value in self.keys.items():
            vr = _vr(keyword)
            self.matchers[keyword] = matching.parse_key(keyword, vr, value)

    def value(self, keyword: str) -> str:
        """The query's value for ``keyword`` with padding trimmed ('' if none)."""
        raw = self.keys.get(keyword)
        return matching.normalize(_vr(keyword), raw) if raw else ""

    def is_universal(self, keyword: str) -> bool:
        matcher = self.matchers.get(keyword)
        return matcher is None or matcher.kind == "universal"


def _vr(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "LO"


def find(
    catalog: Catalog, query: Query, cancelled: Callable[[], bool]
) -> Iterator[Row]:
    """Yield one joined row per record at the query's level that matches.

    ``cancelled`` is polled between candidates so that a C-CANCEL stops the
    search promptly.
    """
    with catalog.read() as txn:
        rows = _ROWS[query.level](catalog, txn, query)
        for row in rows:
            if cancelled():
                return
            if _matches(query, row):
                yield row


def _matches(query: Query, row: Row) -> bool:
    paired: set[str] = set()
    if query.combined_datetime:
        for date_key, time_key in _DATE_TIME_PAIRS:
            if query.is_universal(date_key) or query.is_universal(time_key):
                continue
            paired |= {date_key, time_key}
            if not matching.match_datetime_pair(
                query.matchers[date_key],
                query.matchers[time_key],
                row.get(date_key),
                row.get(time_key),
            ):
                return False

    for keyword, matcher in query.matchers.items():
        if keyword in paired or matcher.kind == "universal":
            continue
        if keyword not in row:
            # The catalog does not keep this attribute: it cannot narrow the
            # search (PS3.4 C.2.2.1.3 lets an SCP ignore keys it lacks).
            continue
        if not matcher.matches(row[keyword]):
            return False
    return True


# -- candidates per level ----------------------------------------------------


def _patient_rows(
    catalog: Catalog, txn: lmdb.Transaction, query: Query
) -> Iterator[Row]:
    for key in _patient_candidates(catalog, txn, query):
        patient = catalog.get(txn, "patients", key)
        if patient is not None:
            yield _patient_row(patient)


def _patient_candidates(
    catalog: Catalog, txn: lmdb.Transaction, query: Query
) -> Iterable[str]:
    if _kind(query, "PatientID") == "single":
        return _patients_with_id(catalog, txn, query.value("PatientID"))
    prefix = _name_prefix(query)
    if prefix:
        return _unique(catalog.index_prefix(txn, "idx.patient.name", prefix))
    return (key for key, _record in catalog.all_records(txn, "patients"))


def _study_rows(catalog: Catalog, txn: lmdb.Transaction, query: Query) -> Iterator[Row]:
    for uid in _study_candidates(catalog, txn, query):
        study = catalog.get(txn, "studies", uid)
        if study is None:
            continue
        patient = catalog.get(txn, "patients", study["patient"]) or {}
        yield {**_patient_row(patient), **_study_row(study)}


def _study_candidates(
    catalog: Catalog, txn: lmdb.Transaction, query: Query
) -> Iterable[str]:
    kind = _kind(query, "StudyInstanceUID")
    if kind in ("single", "list"):
        return query.value("StudyInstanceUID").split("\\")
    if _kind(query, "PatientID") == "single":
        patients = _patients_with_id(catalog, txn, query.value("PatientID"))
        return (
            uid
            for key in list(patients)
            for uid in catalog.index_values(txn, "idx.study.patient", key)
        )
    if _kind(query, "AccessionNumber") == "single":
        accession = query.value("AccessionNumber")
        return catalog.index_values(txn, "idx.study.accession", accession)
    if _kind(query, "StudyDate") in ("single", "range"):
        low, high = _date_bounds(query.value("StudyDate"))
        return catalog.index_range(txn, "idx.study.date", low, high)
    prefix = _name_prefix(query)
    if prefix:
        return _unique(catalog.index_prefix(txn, "idx.study.name", prefix))
    return (key for key, _record in catalog.all_records(txn, "studies"))


def _series_rows(
    catalog: Catalog, txn: lmdb.Transaction, query: Query
) -> Iterator[Row]:
    parents: dict[str, Row] = {}
    for uid in _series_candidates(catalog, txn, query):
        series = catalog.get(txn, "series", uid)
        if series is None:
            continue
        parent = _parent_row(catalog, txn, series["study"], parents)
        yield {**parent, **_series_row(series)}


def _series_candidates(
    catalog: Catalog, txn: lmdb.Transaction, query: Query
) -> Iterable[str]:
    if _kind(query, "SeriesInstanceUID") in ("single", "list"):
        return query.value("SeriesInstanceUID").split("\\")
    if _kind(query, "StudyInstanceUID") in ("single", "list"):
        return (
            series_uid
            for study_uid in query.value("StudyInstanceUID").split("\\")
            for series_uid in catalog.index_values(txn, "idx.series.study", study_uid)
        )
    return (key for key, _record in catalog.all_records(txn, "series"))


def _image_rows(catalog: Catalog, txn: lmdb.Transaction, query: Query) -> Iterator[Row]:
    parents: dict[str, Row] = {}
    series_rows: dict[str, Row] = {}
    for uid in _image_candidates(catalog, txn, query):
        instance = catalog.instance(txn, uid)
        if instance is None:
            continue
        if instance.series_uid not in series_rows:
            series = catalog.get(txn, "series", instance.series_uid) or {}
            parent = _parent_row(catalog, txn, instance.study_uid, parents)
            series_rows[instance.series_uid] = {**parent, **_series_row(series)}
        row: Row = dict(series_rows[instance.series_uid])
        row.update(instance.attributes)
        row["SOPInstanceUID"] = instance.sop_instance_uid
        row["AvailableTransferSyntaxUID"] = instance.transfer_syntax
        yield row


def _image_candidates(
    catalog: Catalog, txn: lmdb.Transaction, query: Query
) -> Iterable[str]:
    if _kind(query, "SOPInstanceUID") in ("single", "list"):
        return query.value("SOPInstanceUID").split("\\")
    if _kind(query, "SeriesInstanceUID") in ("single", "list"):
        series_uids: Iterable[str] = query.value("SeriesInstanceUID").split("\\")
    elif _kind(query, "StudyInstanceUID") in ("single", "list"):
        series_uids = [
            series_uid
            for study_uid in query.value("StudyInstanceUID").split("\\")
            for series_uid in catalog.index_values(txn, "idx.series.study", study_uid)
        ]
    else:
        return (key for key, _record in catalog.all_records(txn, "instances"))
    return (
        uid
        for series_uid in series_uids
        for uid in catalog.index_values(txn, "idx.instance.series", series_uid)
    )


_ROWS: dict[str, Callable[[Catalog, lmdb.Transaction, Query], Iterator[Row]]] = {
    "PATIENT": _patient_rows,
    "STUDY": _study_rows,
    "SERIES": _series_rows,
    "IMAGE": _image_rows,
}


# -- rows ----------------------------------------------------------------------


def _patient_row(patient: dict[str, Any]) -> Row:
    row: Row = {keyword: None for keyword in _PATIENT_DEFAULTS}
    row.update(patient.get("attrs", {}))
    if "studies" in patient:
        row["NumberOfPatientRelatedStudies"] = str(patient["studies"])
        row["NumberOfPatientRelatedSeries"] = str(patient["series"])
        row["NumberOfPatientRelatedInstances"] = str(patient["instances"])
    return row


def _study_row(study: dict[str, Any]) -> Row:
    row: Row = {keyword: None for keyword in _STUDY_DEFAULTS}
    row.update(study["attrs"])
    row["ModalitiesInStudy"] = "\\".join(study["modalities"]) or None
    row["SOPClassesInStudy"] = "\\".join(study["sop_classes"]) or None
    row["NumberOfStudyRelatedSeries"] = str(study["series"])
    row["NumberOfStudyRelatedInstances"] = str(study["instances"])
    return row


def _series_row(series: dict[str, Any]) -> Row:
    row: Row = {keyword: None for keyword in _SERIES_DEFAULTS}
    row.update(series.get("attrs", {}))
    if "instances" in series:
        row["NumberOfSeriesRelatedInstances"] = str(series["instances"])
    return row


def _parent_row(
    catalog: Catalog, txn: lmdb.Transaction, study_uid: str, cache: dict[str, Row]
) -> Row:
    if study_uid not in cache:
        study = catalog.get(txn, "studies", study_uid)
        if study is None:
            cache[study_uid] = {"StudyInstanceUID": study_uid}
        else:
            patient = catalog.get(txn, "patients", study["patient"]) or {}
            cache[study_uid] = {**_patient_row(patient), **_study_row(study)}
    return cache[study_uid]


def _keys_of(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(keyword for group in groups for keyword in group)


# Keywords present in every row of a level (None when the instance lacked
# them), so that a non-universal query on them excludes unknown values.
_PATIENT_DEFAULTS = _keys_of(PATIENT_KEYWORDS, COMPUTED_KEYWORDS["PATIENT"])
_STUDY_DEFAULTS = _keys_of(STUDY_KEYWORDS, COMPUTED_KEYWORDS["STUDY"])
_SERIES_DEFAULTS = _keys_of(SERIES_KEYWORDS, COMPUTED_KEYWORDS["SERIES"])


# -- helpers ---------------------------------------------------------------------


def _kind(query: Query, keyword: str) -> str:
    matcher = query.matchers.get(keyword)
    return "universal" if matcher is None else matcher.kind


def _patients_with_id(
    catalog: Catalog, txn: lmdb.Transaction, patient_id: str
) -> Iterator[str]:
    prefix = patient_id + "\x00"
    for key, _record in _records_with_prefix(catalog, txn, "patients", prefix):
        yield key


def _records_with_prefix(
    catalog: Catalog, txn: lmdb.Transaction, db: str, prefix: str
) -> Iterator[tuple[str, bytes]]:
    start = prefix.encode()
    cursor = txn.cursor(db=catalog.db[db])
    if not cursor.set_range(start):
        return
    for key, value in cursor:
        if not bytes(key).startswith(start):
            break
        yield bytes(key).decode("utf-8", "surrogateescape"), bytes(value)


def _name_prefix(query: Query) -> str:
    """The literal start of a PatientName query, folded as the index files it."""
    if _kind(query, "PatientName") not in ("single", "wildcard"):
        return ""
    value = query.value("PatientName")
    if "\\" in value:
        return ""
    group = next((g for g in value.split("=") if g.strip()), "")
    literal = ""
    for char in group:
        if char in "*?":
            break
        literal += char
    if literal == group:
        return fold_name(literal)
    return literal.strip().upper()


def _date_bounds(value: str) -> tuple[str, str | None]:
    value = value.replace(".", "")
    if "-" not in value:
        return value, value
    low, high = value.split("-", 1)
    return low, (high or None)


def _unique(values: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for value in values:
        if value not in seen:
            seen.add(value)
            yield value
