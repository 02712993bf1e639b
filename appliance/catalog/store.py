"""The catalog: one LMDB environment, the single source of truth.

Named databases (keys and values are UTF-8; values are compact JSON)::

    meta                 schema_version, bytes.<tier> totals, next pack number
    patients             PatientID NUL IssuerOfPatientID -> attributes, counts
    merged               a retired patient key -> the key it was merged into
    studies              StudyInstanceUID  -> attributes, patient, counts
    series               SeriesInstanceUID -> attributes, study, count
    instances            SOPInstanceUID    -> InstanceRecord (copies, checksums)
    packs                pack ID -> tier, location, size, checksum, members
    requests             request ID -> an operator request (load a volume)
    replication          number -> SOP Instance UID, size, time: the mirror's queue
    journal              number -> a change (store, replace, replicated, ...)
    idx.study.patient    patient key -> StudyInstanceUID          (duplicates)
    idx.study.accession  AccessionNumber -> StudyInstanceUID      (duplicates)
    idx.study.date       StudyDate (YYYYMMDD) -> StudyInstanceUID (duplicates)
    idx.study.name       folded name group -> StudyInstanceUID    (duplicates)
    idx.patient.name     folded name group -> patient key         (duplicates)
    idx.series.study     StudyInstanceUID -> SeriesInstanceUID    (duplicates)
    idx.instance.series  SeriesInstanceUID -> SOPInstanceUID      (duplicates)
    idx.pack.study       StudyInstanceUID -> pack ID              (duplicates)
    idx.merged.into      patient key -> retired patient key merged into it
                         (duplicates; made from ``merged`` when a catalog
                         written before it is opened for writing)
    appointments         appointment ID -> what the RIS said about it
    hl7                  sender | control ID -> the ACK sent for that message
                         (kept by a restore for ADT: catalog/answers.py)
    pins                 StudyInstanceUID -> pinned online until, and why
    prefetch             appointment ID -> its priors and their state
    arrivals             number -> StudyInstanceUID: new studies to compare
                         with the RIS's orders (only while there are any)
    mismatches           StudyInstanceUID -> why it matches no order
    hits                 prior | appointment start -> online when first retrieved?
    commitments          Transaction UID -> a storage commitment request, its
                         result and the delivery of its report
    commitments.pending  Transaction UID -> "": those not reported yet
    audit.pending        time.random -> an audit record a change committed
                         here owes the audit log, until it is written there
                         (audit/owed.py)

A study record counts, per tier, the instances that have a verified copy
there (``copies``), so that migration policies see where a study is
without reading its instances.

LMDB serialises writers across processes, so every worker process opens the
same environment and each change of state is one write transaction.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import lmdb

from appliance.catalog import codec
from appliance.catalog.records import InstanceRecord, NewInstance
from appliance.errors import CatalogError, SchemaVersionError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# LMDB's data file in the catalog's folder: there is a catalog only where
# it is.
DATA_FILE = "data.mdb"
# LMDB refuses keys (and sorted duplicate values) longer than 511 bytes.
_MAX_KEY = 400

_DATABASES = (
    "meta",
    "patients",
    "merged",
    "studies",
    "series",
    "instances",
    "packs",
    "requests",
    "replication",
    "journal",
    "appointments",
    "hl7",
    "pins",
    "prefetch",
    "arrivals",
    "mismatches",
    "hits",
    "commitments",
    "commitments.pending",
    "audit.pending",
)
# Added after schema version 1 was fixed: created when the catalog is
# opened for writing, possibly missing when it is opened read-only.
INDEXES = (
    "idx.study.patient",
    "idx.study.accession",
    "idx.study.date",
    "idx.study.name",
    "idx.patient.name",
    "idx.series.study",
    "idx.instance.series",
    "idx.pack.study",
    "idx.merged.into",
)
# The index of the pointers in ``merged`` by the key each names: a merge
# finds the pointers to move on through it, not by reading every pointer.
POINTERS_BY_TARGET = "idx.merged.into"


class Outcome(Enum):
    """What recording an instance did."""

    STORED = "stored"
    IDENTICAL = "identical"  # already stored with the same bytes
    KEPT_FIRST = "kept_first"  # different bytes, policy keeps the stored copy
    REFUSED = "refused"  # different bytes, policy refuses the new one
    REPLACED = "replaced"  # different bytes, policy replaced the stored copy
    # The instance names a series or study the catalog files under another
    # study or patient: accepting it would show images under the wrong one.
    INCONSISTENT = "inconsistent"


@dataclass
class RecordResult:
    """The outcome of recording one instance, and what the caller must tidy."""

    outcome: Outcome
    # Files no catalog record counts any more, to delete after the commit.
    obsolete: list[tuple[str, str]]
    reason: str = ""


@contextmanager
def write_errors(what: str) -> Iterator[None]:
    """LMDB's errors while writing, as CatalogError: a full map says which
    setting to raise; any other is ``what`` and LMDB's reason."""
    try:
        yield
    except lmdb.MapFullError as exc:
        raise CatalogError(
            "the catalog is full; raise storage.catalog_max_size"
        ) from exc
    except lmdb.Error as exc:
        raise CatalogError(f"{what}: {exc}") from exc


def encode_key(text: str) -> bytes:
    """An LMDB key for ``text``; overlong values (non-conformant UIDs) hashed."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= _MAX_KEY:
        return raw
    return b"#" + hashlib.sha256(raw).hexdigest().encode()


def _decode(raw: bytes | memoryview) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


def fold_name(group: str) -> str:
    """A person-name group as the name indexes file it: upper case, no padding."""
    return group.strip().rstrip("^").upper()


def name_index_keys(person_name: str | None) -> set[str]:
    """One name-index key per non-empty component group of a person name."""
    if not person_name:
        return set()
    return {fold_name(g) for g in person_name.split("=") if fold_name(g)}


class Catalog:
    """Patients, studies, series and instances, with their copies and indexes."""

    def __init__(
        self,
        path: Path,
        map_size: int = 64 * 2**30,
        readonly: bool = False,
        durable: bool = True,
    ) -> None:
        """Open (or make) the catalog at ``path``. One opened not ``durable``
        commits without flushing: for scratch catalogs that are made again
        from the start after a crash, or flushed by their owner."""
        self.path = path
        self.readonly = readonly
        try:
            if not readonly:
                path.mkdir(parents=True, exist_ok=True)
            self.env = self._open(path, map_size, readonly, durable)
        except FileExistsError as exc:
            # catalog_path (or the data folder) names a file.
            raise CatalogError(
                f"cannot open the catalog at {path}: {path} is a file, not a folder"
            ) from exc
        except (OSError, lmdb.Error) as exc:
            raise CatalogError(f"cannot open the catalog at {path}: {exc}") from exc

        if readonly:
            self.db = self._open_existing(map_size)
        else:
            self.db = {name: self.env.open_db(name.encode()) for name in _DATABASES}
        self._check_schema()
        if not readonly:
            # After the check: no index is made from another schema's records.
            self._open_indexes()

    def _open_indexes(self) -> None:
        """Open the indexes, making those a catalog written by an older
        version lacks, in one write transaction."""
        with (
            write_errors(f"cannot open the catalog at {self.path}"),
            self.env.begin(write=True) as txn,
        ):
            for name in INDEXES:
                self.db[name] = self._open_index(txn, name)

    def _open_index(self, txn: lmdb.Transaction, name: str) -> Any:
        """One index, made if missing. The index of pointers is filled from
        ``merged`` in the transaction that makes it: it never misses one,
        even when several processes open an older catalog at once."""
        raw_name = name.encode()
        try:
            return self.env.open_db(raw_name, txn=txn, create=False, dupsort=True)
        except lmdb.NotFoundError:
            pass
        index = self.env.open_db(raw_name, txn=txn, dupsort=True)
        if name == POINTERS_BY_TARGET:
            _index_pointers(self, txn, index)
        return index

    def _open_existing(self, map_size: int) -> dict[str, Any]:
        """The databases of a catalog opened read-only. One written by an
        older version lacks the databases added since: they are made (empty)
        by opening it once for writing, as the service would at its start."""
        names = (*_DATABASES, *INDEXES)
        try:
            self.env.open_db(b"meta", create=False)
        except lmdb.NotFoundError as exc:
            raise CatalogError(f"{self.path} holds no catalog") from exc
        try:
            return {
                name: self.env.open_db(name.encode(), create=False) for name in names
            }
        except lmdb.NotFoundError:
            pass
        self.env.close()
        try:
            Catalog(self.path, map_size).close()
            self.env = self._open(self.path, map_size, readonly=True)
            logger.info("catalog %s: databases added by this version made", self.path)
            return {
                name: self.env.open_db(name.encode(), create=False) for name in names
            }
        except (OSError, lmdb.Error, CatalogError) as exc:
            raise CatalogError(
                f"{self.path} was written by an older version and cannot be "
                f"brought up to date ({exc}); start the service once on it"
            ) from exc

    @staticmethod
    def _open(
        path: Path, map_size: int, readonly: bool, durable: bool = True
    ) -> lmdb.Environment:
        options: dict[str, Any] = {
            "map_size": map_size,
            "max_dbs": len(_DATABASES) + len(INDEXES) + 8,
            "max_readers": 512,
            "readonly": readonly,
            "sync": durable,
            "metasync": durable,
        }
        try:
            return lmdb.open(str(path), **options)
        except lmdb.ReadonlyError:
            if not readonly:
                raise
            # A catalog on read-only media (or without write permission on
            # its lock file) can still be read, without reader registration.
            return lmdb.open(str(path), lock=False, **options)

    def has(self, db: str) -> bool:
        """Whether the catalog holds database ``db``."""
        return db in self.db

    def close(self) -> None:
        self.env.close()

    def _check_schema(self) -> None:
        with self.env.begin(write=not self.readonly, db=self.db["meta"]) as txn:
            found = txn.get(b"schema_version")
            if found is None and self.readonly:
                raise CatalogError(f"{self.path} holds no catalog")
            if found is None:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode())
                return
        if int(found) != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the catalog at {self.path} has schema version {int(found)}; "
                f"this appliance reads version {SCHEMA_VERSION}"
            )

    # -- writing ---------------------------------------------------------

    def record(
        self, batch: list[NewInstance], duplicate_policy: str
    ) -> list[RecordResult]:
        """Record new instances in one durable transaction (a group commit).

        A SOP Instance UID already in the catalog is resolved here, inside
        the write transaction, so that two associations storing the same
        instance at once end with one record.
        """
        with (
            write_errors("cannot write the catalog"),
            self.env.begin(write=True) as txn,
        ):
            writer = _Writer(self, txn)
            return [writer.add(item, duplicate_policy) for item in batch]

    def touch_studies(self, study_uids: set[str]) -> None:
        """Set the last-access time of studies (a retrieve happened)."""
        now = time.time()
        with self.env.begin(write=True) as txn:
            for uid in study_uids:
                study = self._get(txn, "studies", uid)
                if study is not None:
                    study["last_access"] = now
                    self._put(txn, "studies", uid, study)

    # -- reading ---------------------------------------------------------

    def read(self) -> lmdb.Transaction:
        """A read transaction: a consistent snapshot for a whole query."""
        return self.env.begin(write=False, buffers=False)

    def _get(self, txn: lmdb.Transaction, db: str, key: str) -> dict[str, Any] | None:
        if not key:
            return None  # LMDB has no empty keys: a missing UID names nothing
        raw = txn.get(encode_key(key), db=self.db[db])
        return None if raw is None else codec.loads(raw)

    def _put(self, txn: lmdb.Transaction, db: str, key: str, value: Any) -> None:
        txn.put(encode_key(key), codec.dumps(value), db=self.db[db])

    def get(self, txn: lmdb.Transaction, db: str, key: str) -> dict[str, Any] | None:
        """One record of ``patients``, ``studies`` or ``series`` by key."""
        return self._get(txn, db, key)

    def instance(self, txn: lmdb.Transaction, uid: str) -> InstanceRecord | None:
        data = self._get(txn, "instances", uid)
        if data is None:
            return None
        return InstanceRecord.from_json(data.get("key", uid), data)

    def index_values(
        self, txn: lmdb.Transaction, index: str, key: str
    ) -> Iterator[str]:
        """Every value filed under ``key`` in a duplicate-key index."""
        cursor = txn.cursor(db=self.db[index])
        if cursor.set_key(encode_key(key)):
            for value in cursor.iternext_dup():
                yield _decode(value)

    def index_range(
        self, txn: lmdb.Transaction, index: str, low: str, high: str | None
    ) -> Iterator[str]:
        """Values whose index key k has low <= k and (high is None or k <= high)."""
        cursor = txn.cursor(db=self.db[index])
        if not cursor.set_range(low.encode()):
            return
        stop = high.encode() if high is not None else None
        for key, value in cursor:
            if stop is not None and bytes(key) > stop:
                break
            yield _decode(value)

    def index_prefix(
        self, txn: lmdb.Transaction, index: str, prefix: str
    ) -> Iterator[str]:
        """Values whose index key starts with ``prefix``."""
        start = prefix.encode()
        cursor = txn.cursor(db=self.db[index])
        if not cursor.set_range(start):
            return
        for key, value in cursor:
            if not bytes(key).startswith(start):
                break
            yield _decode(value)

    def all_records(
        self, txn: lmdb.Transaction, db: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every (key, record) of a main database, in key order."""
        for key, raw in txn.cursor(db=self.db[db]):
            record = codec.loads(raw)
            text = record.get("key")
            yield _decode(key) if text is None else text, record

    def counts(self) -> dict[str, int]:
        """Numbers of patients, studies, series and instances; bytes of
        instances per tier (``bytes.<tier>``) and of packs (``packbytes.<tier>``)."""
        with self.read() as txn:
            result = {
                name: txn.stat(self.db[name])["entries"]
                for name in ("patients", "studies", "series", "instances")
            }
            for key, value in txn.cursor(db=self.db["meta"]):
                if bytes(key).startswith((b"bytes.", b"packbytes.")):
                    result[_decode(key)] = int(bytes(value))
        return result


class _Writer:
    """The steps of recording instances inside one write transaction."""

    def __init__(self, catalog: Catalog, txn: lmdb.Transaction) -> None:
        self.catalog = catalog
        self.txn = txn

    def add(self, item: NewInstance, policy: str) -> RecordResult:
        record = item.record
        existing = self.catalog.instance(self.txn, record.sop_instance_uid)
        if existing is not None:
            return self._resolve_duplicate(existing, item, policy)
        self._follow_merge(item)
        conflict = self._hierarchy_conflict(record)
        if conflict:
            new_copies = [(c.tier, c.location) for c in record.copies]
            return RecordResult(Outcome.INCONSISTENT, new_copies, conflict)

        self._add_patient(item)
        self._add_study(item)
        self._add_series(item)
        self.catalog._put(
            self.txn, "instances", record.sop_instance_uid, _with_key(record)
        )
        self._index("idx.instance.series", record.series_uid, record.sop_instance_uid)
        self._add_bytes(record, +1)
        self._journal_and_queue("store", item)
        return RecordResult(Outcome.STORED, [])

    def _follow_merge(self, item: NewInstance) -> None:
        """File an instance that names a retired patient (merged, or its
        identifier changed) under the patient it belongs to now; its stored
        bytes keep what the modality sent."""
        survivor = merged_into(self.catalog, self.txn, item.record.patient)
        if survivor is None:
            return
        item.record.patient = survivor
        patient_id, _, issuer = survivor.partition("\x00")
        attrs = {**item.patient, "PatientID": patient_id}
        attrs.pop("IssuerOfPatientID", None)
        if issuer:
            attrs["IssuerOfPatientID"] = issuer
        item.patient = attrs

    def _hierarchy_conflict(self, record: InstanceRecord) -> str:
        """Why the instance does not fit the patient/study/series tree, or ''."""
        series = self.catalog._get(self.txn, "series", record.series_uid)
        if series is not None and series["study"] != record.study_uid:
            return (
                f"series {record.series_uid} belongs to study {series['study']}, "
                f"not to {record.study_uid}"
            )
        study = self.catalog._get(self.txn, "studies", record.study_uid)
        if study is not None and study["patient"] != record.patient:
            return (
                f"study {record.study_uid} belongs to another patient "
                "(PatientID or IssuerOfPatientID differ)"
            )
        return ""

    def _resolve_duplicate(
        self, existing: InstanceRecord, item: NewInstance, policy: str
    ) -> RecordResult:
        record = item.record
        new_copies = [(c.tier, c.location) for c in record.copies]
        if existing.content_sha256 == record.content_sha256:
            return RecordResult(Outcome.IDENTICAL, new_copies)
        if policy == "keep_first":
            return RecordResult(Outcome.KEPT_FIRST, new_copies)
        if policy == "replace":
            same_place = (existing.study_uid, existing.series_uid) == (
                record.study_uid,
                record.series_uid,
            )
            if same_place:
                return self._replace(existing, item)
            reason = "the new bytes name another study or series; refused"
            return RecordResult(Outcome.REFUSED, new_copies, reason)
        return RecordResult(
            Outcome.REFUSED,
            new_copies,
            "another instance with different content holds this SOP Instance UID",
        )

    def _journal_and_queue(self, op: str, item: NewInstance) -> None:
        """Write the change to the journal and queue the instance for the
        mirror, in the transaction that records it: a crash cannot store an
        instance that the mirror will never get."""
        record = item.record
        entry = {
            "op": op,
            "instance": _with_key(record),
            "patient": item.patient,
            "study": item.study,
            "series": item.series,
        }
        append_journal(self.catalog, self.txn, entry)
        number = next_number(self.catalog, self.txn, "replication.next")
        queued = {"uid": record.sop_instance_uid, "size": record.size}
        queued["time"] = record.received
        self.txn.put(
            sequence_key(number),
            codec.dumps(queued),
            db=self.catalog.db["replication"],
        )

    def _replace(self, existing: InstanceRecord, item: NewInstance) -> RecordResult:
        record = item.record
        self._add_bytes(existing, -1)
        self.catalog._put(
            self.txn, "instances", record.sop_instance_uid, _with_key(record)
        )
        self._add_bytes(record, +1)
        study = self.catalog._get(self.txn, "studies", record.study_uid)
        if study is not None:
            count_copies(study, existing, -1)
            count_copies(study, record, +1)
            study["bytes"] += record.size - existing.size
            self.catalog._put(self.txn, "studies", record.study_uid, study)
        old = [(c.tier, c.location) for c in existing.copies]
        self._journal_and_queue("replace", item)
        return RecordResult(Outcome.REPLACED, old)

    def _add_patient(self, item: NewInstance) -> None:
        key = item.record.patient
        patient = self.catalog._get(self.txn, "patients", key)
        is_new_study = self.catalog._get(self.txn, "studies", item.record.study_uid)
        is_new_series = self.catalog._get(self.txn, "series", item.record.series_uid)
        if patient is None:
            patient = {"key": key, "attrs": item.patient, "studies": 0}
            patient.update(series=0, instances=0)
            for name in name_index_keys(item.patient.get("PatientName")):
                self._index("idx.patient.name", name, key)
        patient["studies"] += is_new_study is None
        patient["series"] += is_new_series is None
        patient["instances"] += 1
        self.catalog._put(self.txn, "patients", key, patient)

    def _add_study(self, item: NewInstance) -> None:
        record = item.record
        study = self.catalog._get(self.txn, "studies", record.study_uid)
        if study is None:
            study = self._new_study(item)
        is_new_series = self.catalog._get(self.txn, "series", record.series_uid)
        count_in_study(study, item, is_new_series is None)
        self.catalog._put(self.txn, "studies", record.study_uid, study)

    def _new_study(self, item: NewInstance) -> dict[str, Any]:
        record = item.record
        uid = record.study_uid
        self._index("idx.study.patient", record.patient, uid)
        self._note_arrival(uid)
        accession = item.study.get("AccessionNumber")
        if accession:
            self._index("idx.study.accession", accession, uid)
        study_date = item.study.get("StudyDate")
        if study_date:
            self._index("idx.study.date", study_date.replace(".", "")[:8], uid)
        # The patient's name as the catalog holds it, which an update from
        # the RIS may have corrected since this instance was made.
        patient = self.catalog._get(self.txn, "patients", record.patient) or {}
        name = patient.get("attrs", item.patient).get("PatientName")
        for group in name_index_keys(name):
            self._index("idx.study.name", group, uid)
        return new_study(item, item.study)

    def _note_arrival(self, study_uid: str) -> None:
        """Queue a new study for comparison with the RIS's orders, on sites
        whose RIS sends them (one stat of a small database otherwise)."""
        if not self.txn.stat(self.catalog.db["appointments"])["entries"]:
            return
        number = next_number(self.catalog, self.txn, "arrivals.next")
        self.txn.put(
            sequence_key(number), study_uid.encode(), db=self.catalog.db["arrivals"]
        )

    def _add_series(self, item: NewInstance) -> None:
        record = item.record
        series = self.catalog._get(self.txn, "series", record.series_uid)
        if series is None:
            series = {"key": record.series_uid, "attrs": item.series}
            series.update(study=record.study_uid, instances=0)
            self._index("idx.series.study", record.study_uid, record.series_uid)
        series["instances"] += 1
        self.catalog._put(self.txn, "series", record.series_uid, series)

    def _index(self, index: str, key: str, value: str) -> None:
        self.txn.put(
            encode_key(key),
            encode_key(value),
            db=self.catalog.db[index],
            dupdata=True,
        )

    def _add_bytes(self, record: InstanceRecord, sign: int) -> None:
        meta = self.catalog.db["meta"]
        for copy in record.copies:
            key = f"bytes.{copy.tier}".encode()
            current = int(self.txn.get(key, b"0", db=meta))
            self.txn.put(key, str(current + sign * record.size).encode(), db=meta)


def catalog_exists(path: Path) -> bool:
    """Whether a catalog is at ``path``: its folder with LMDB's data file.
    An empty folder (made by hand, or a mount point whose disk is not
    mounted) holds no archive, and opening it would make a new, empty one."""
    return (path / DATA_FILE).is_file()


# LMDB allows one open environment per file and process: the checks that
# the service's scheduler threads make take turns.
_PEEK_LOCK = threading.Lock()


@contextmanager
def peek(path: Path) -> Iterator[Catalog]:
    """The catalog read-only, for a quick look from a thread of the service's
    listener process, one look at a time."""
    with _PEEK_LOCK:
        catalog = Catalog(path, readonly=True)
        try:
            yield catalog
        finally:
            catalog.close()


def merged_into(catalog: Catalog, txn: lmdb.Transaction, key: str) -> str | None:
    """The patient key that retired patient ``key`` now lives under, or None.

    The pointer of ``key`` itself counts first. Failing that, an ID without
    an issuer follows the one pointer filed under that ID when no other
    patient holds it, and an ID with an issuer follows the pointer filed
    without one: issuers are never mixed when both sides name one.
    """
    if not catalog.has("merged"):
        return None
    found = _pointer(catalog, txn, key)
    if found is None:
        patient_id, _, issuer = key.partition("\x00")
        if issuer:
            found = _pointer(catalog, txn, f"{patient_id}\x00")
        else:
            holders = keys_with_id(catalog, txn, "patients", patient_id)
            retired = keys_with_id(catalog, txn, "merged", patient_id)
            if not holders and len(retired) == 1:
                found = _pointer(catalog, txn, retired[0])
    return found


def _pointer(catalog: Catalog, txn: lmdb.Transaction, key: str) -> str | None:
    # Pointers always name a live patient (a merge re-points those naming
    # the patient it retires), so one step is enough; a few more guard
    # against a catalog written otherwise.
    target = None
    for _ in range(8):
        data = catalog._get(txn, "merged", key)
        if data is None:
            break
        target = key = str(data["into"])
    return target


def _index_pointers(catalog: Catalog, txn: lmdb.Transaction, index: Any) -> None:
    """File every pointer of ``merged`` under the key it names."""
    pointers = 0
    for raw_key, raw in txn.cursor(db=catalog.db["merged"]):
        target = encode_key(str(codec.loads(raw)["into"]))
        txn.put(target, bytes(raw_key), db=index, dupdata=True)
        pointers += 1
    logger.info(
        "catalog %s: index of merged patients made (%d pointers)",
        catalog.path,
        pointers,
    )


def keys_with_id(
    catalog: Catalog, txn: lmdb.Transaction, db: str, patient_id: str
) -> list[str]:
    """The patient keys in ``db`` (patients or merged) with that PatientID,
    whatever their issuer."""
    start = encode_key(patient_id + "\x00")
    found = []
    cursor = txn.cursor(db=catalog.db[db])
    if cursor.set_range(start):
        for raw_key in cursor.iternext(keys=True, values=False):
            if not bytes(raw_key).startswith(start):
                break
            found.append(_decode(raw_key))
    return found


def sequence_key(number: int) -> bytes:
    """The key of a queue or journal entry: its number, so keys sort in order."""
    return number.to_bytes(8, "big")


def next_number(catalog: Catalog, txn: lmdb.Transaction, counter: str) -> int:
    """The next number of a counter kept in ``meta`` (starting at 1)."""
    meta = catalog.db["meta"]
    number = int(txn.get(counter.encode(), b"1", db=meta))
    txn.put(counter.encode(), str(number + 1).encode(), db=meta)
    return number


def append_journal(
    catalog: Catalog, txn: lmdb.Transaction, entry: dict[str, Any]
) -> int:
    """Add a change to the journal (what the mirror needs to replay it)."""
    number = next_number(catalog, txn, "journal.next")
    entry = {"seq": number, "time": time.time(), **entry}
    txn.put(sequence_key(number), codec.dumps(entry), db=catalog.db["journal"])
    return number


def new_study(item: NewInstance, attributes: dict[str, str]) -> dict[str, Any]:
    """The record of a study its first instance, ``item``, starts; nothing
    counted in it yet (see :func:`count_in_study`)."""
    record = item.record
    return {
        "key": record.study_uid,
        "attrs": attributes,
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


def count_in_study(study: dict[str, Any], item: NewInstance, new_series: bool) -> None:
    """Count a new instance in its study's record: series, instances, bytes,
    copies per tier, modalities, SOP classes and sending AE titles."""
    record = item.record
    study["series"] += new_series
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


def count_copies(study: dict[str, Any], record: InstanceRecord, sign: int) -> None:
    """Add (``sign`` +1) or take away (-1) ``record``'s verified copies in
    its study's per-tier counts."""
    counts = study.setdefault("copies", {})
    for tier in {copy.tier for copy in record.copies if copy.verified}:
        counts[tier] = counts.get(tier, 0) + sign
        if counts[tier] <= 0:
            del counts[tier]


def _with_key(record: InstanceRecord) -> dict[str, Any]:
    data = record.as_json()
    data["key"] = record.sop_instance_uid
    return data
