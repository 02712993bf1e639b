"""Storing an instance safely: check it, put it on the online tier, record it.

Both the C-STORE handler and ``appliance import`` go through
:class:`Ingest`. The order of steps is what keeps data safe (DESIGN.md,
rule 1): the bytes are flushed and renamed into place first, the catalog
transaction commits second, and only then is success reported. A crash
between the two leaves a file that no record counts, never a record without
its file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from appliance import part10
from appliance.catalog.records import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    Copy,
    InstanceRecord,
    NewInstance,
    collect,
    patient_key,
    text_of,
)
from appliance.catalog.store import Catalog, Outcome, RecordResult
from appliance.errors import (
    ApplianceError,
    OutOfSpaceError,
    RejectedInstance,
    StorageError,
)
from appliance.log_text import printable
from appliance.metrics import events
from appliance.storage.durable import fsync_file, translate_os_error
from appliance.storage.online import TIER_NAME, OnlineTier

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_INSTANCE = 0x0111
PROCESSING_FAILURE = 0x0110
# PS3.7 9.1.1.1.9 h: the SOP Instance UID breaks the UID construction rules.
INVALID_SOP_INSTANCE = 0x0117
_MAX_UID = 64  # characters (PS3.5 9.1)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Characters that make a UID something else when it is named again: '*' and
# '?' are C-FIND wildcards, a backslash separates a list of UIDs, and '/'
# ends a DICOMweb URL's path segment. In words, for a refusal's reason: a
# backslash itself would split a C-STORE's Error Comment (LO) in two.
_UNSENDABLE = {
    "*": "an asterisk",
    "?": "a question mark",
    "\\": "a backslash",
    "/": "a slash",
}
_READ_CHUNK = 1 << 20
_DEFER_SIZE = 64 * 1024

# The archive keeps what it is sent, byte for byte; judging the values of
# elements is the sender's business, so pydicom reads them without warnings.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


@dataclass
class StoreResult:
    """The answer to one store: a DICOM status and what happened."""

    status: int
    outcome: Outcome | None
    sop_instance_uid: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


@dataclass
class _Parsed:
    dataset: Dataset
    transfer_syntax: str
    dataset_offset: int
    # What the file meta (for a C-STORE: the request) announces.
    sop_class_uid: str
    sop_instance_uid: str


class GroupCommitter:
    """Records instances from many threads in shared catalog transactions.

    Each LMDB commit flushes the catalog to disk; batching the records that
    arrive while one commit runs lets concurrent associations share it.
    The thread that finds no commit running commits (it leads): its own
    record with whatever others queued meanwhile. If records were queued
    during that commit, it hands the lead to the first of their threads
    and goes back to its association; kept leading while they keep coming,
    its own sender would wait for as long as the others send. Over one
    association the leader is the association's own thread, so no record
    is handed to another thread and its answer handed back.
    """

    def __init__(self, catalog: Catalog, duplicate_policy: str) -> None:
        self.catalog = catalog
        self.duplicate_policy = duplicate_policy
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._leading = False

    def submit(self, item: NewInstance) -> RecordResult:
        """Record ``item``; returns once its transaction has committed."""
        pending = _Pending(item)
        with self._lock:
            self._waiting.append(pending)
            lead, self._leading = not self._leading, True
        if not lead:
            pending.woken.wait()
            # Woken with no answer: the lead was handed to this thread.
            lead = not pending.future.done()
        if lead:
            self._lead()
        return pending.future.result()

    def _lead(self) -> None:
        with self._lock:
            batch, self._waiting = self._waiting, []
        try:
            self._commit(batch)
        except BaseException as exc:
            # Interrupted (KeyboardInterrupt, SystemExit): no record waits
            # for a leader that has gone.
            with self._lock:
                stranded, self._waiting = batch + self._waiting, []
                self._leading = False
            for pending in stranded:
                if not pending.future.done():
                    pending.future.set_exception(exc)
                pending.woken.set()
            raise
        for pending in batch:
            pending.woken.set()
        with self._lock:
            if self._waiting:
                self._waiting[0].woken.set()
            else:
                self._leading = False

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = self.catalog.record(
                [pending.item for pending in batch], self.duplicate_policy
            )
        except Exception as exc:
            for pending in batch:
                pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)


class _Pending:
    """A record submitted to the group committer, and its thread's wake:
    set when its answer is in, or when that thread is to lead."""

    def __init__(self, item: NewInstance) -> None:
        self.item = item
        self.future: Future[RecordResult] = Future()
        self.woken = threading.Event()


class Ingest:
    """The one path by which instances enter the archive."""

    def __init__(
        self, catalog: Catalog, online: OnlineTier, duplicate_policy: str
    ) -> None:
        self.catalog = catalog
        self.online = online
        self.committer = GroupCommitter(catalog, duplicate_policy)
        # Flushing a received file waits on the disk while its checks and
        # checksums want the CPU: a pool thread does the first while the
        # association's own thread does the second.
        self._flusher = ThreadPoolExecutor(thread_name_prefix="flush")

    def close(self) -> None:
        self._flusher.shutdown()

    def store_received(
        self,
        received: Path,
        source: str,
        calling_ae: str = "",
        *,
        refuse_long_uids: bool = False,
        log_refusals: bool = True,
    ) -> StoreResult:
        """Store a Part 10 file that sits in the online tier's ``incoming/``.

        For a C-STORE, the file meta holds the request's Affected SOP Class
        and Instance UIDs; they must agree with the data set. An instance
        whose SOP Instance, Study or Series Instance UID holds '/', '\\',
        '*' or '?' is refused, however it comes: no C-FIND or DICOMweb URL
        could name it again. With ``refuse_long_uids`` (C-STORE, STOW-RS),
        so is one whose UID is longer than 64 characters: no DIMSE message
        could carry it back. Other non-conformant UIDs (letters, leading
        zeros) are stored with a warning, as they are on import. On every
        outcome ``received`` is consumed (moved, or left for the caller to
        delete). Without ``log_refusals`` a refused instance gets no log line
        here: the caller logs it (STOW-RS, which takes any number of parts in
        one request, logs only the first few).
        """
        result = self._store_received(
            received, source, calling_ae, refuse_long_uids, log_refusals
        )
        events.instance_received(
            events.store_outcome(result.status, result.outcome is Outcome.STORED)
        )
        return result

    def _store_received(
        self,
        received: Path,
        source: str,
        calling_ae: str,
        refuse_long_uids: bool,
        log_refusals: bool,
    ) -> StoreResult:
        uid = ""
        flushed = self._flusher.submit(fsync_file, received)
        try:
            parsed = _parse(received)
            uid = parsed.sop_instance_uid
            uid, odd = _check_identity(parsed, refuse_long_uids)
            size = received.stat().st_size
            self.online.check_room(size)
            record = self._record_for(received, parsed, size)
            _wait_for(flushed, received)
            self.online.adopt(received, record.copies[0].location, flushed=True)
            result = self._commit(
                record, parsed.dataset, source, calling_ae, log_refusals
            )
            _warn_if_stored(result, odd)
            return result
        except RejectedInstance as exc:
            uid = uid or _announced_uid(received)
            if log_refusals:
                _log_refusal(uid, source, exc.reason)
            return StoreResult(exc.status, None, uid, exc.reason)
        except OutOfSpaceError as exc:
            logger.error(
                "cannot store instance %s from %s: %s", printable(uid), source, exc
            )
            return StoreResult(OUT_OF_RESOURCES, None, uid, str(exc))
        except (ApplianceError, OSError) as exc:
            logger.error(
                "cannot store instance %s from %s: %s", printable(uid), source, exc
            )
            return StoreResult(PROCESSING_FAILURE, None, uid, str(exc))

    def import_file(self, path: Path, source: str) -> StoreResult:
        """Copy a Part 10 file from elsewhere (a CD, an old archive) in."""
        staged = self.online.incoming / f"{self.online.new_key()}.import"
        try:
            shutil.copyfile(path, staged)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            error = translate_os_error(exc, f"cannot import {path}")
            status = (
                OUT_OF_RESOURCES
                if isinstance(error, OutOfSpaceError)
                else PROCESSING_FAILURE
            )
            return StoreResult(status, None, "", str(error))
        try:
            return self.store_received(staged, source)
        finally:
            staged.unlink(missing_ok=True)

    def record_in_place(self, key: str, source: str) -> StoreResult:
        """Record the file already stored under ``key`` that no catalog entry
        names (an orphan the scrub found), with the same checks as a store.

        The file is neither moved nor removed, whatever the outcome: it was
        durable before and stays so; only the catalog learns of it.
        """
        path = self.online.path_of(key)
        uid = ""
        try:
            parsed = _parse(path)
            uid = parsed.sop_instance_uid
            uid, odd = _check_identity(parsed)
            record = self._record_for(path, parsed, path.stat().st_size, key)
            result = self.committer.submit(_new_instance(record, parsed.dataset))
            answer = self._answer(record, result, source)
            _warn_if_stored(answer, odd)
            return answer
        except RejectedInstance as exc:
            uid = uid or _announced_uid(path)
            _log_refusal(uid, source, exc.reason)
            return StoreResult(exc.status, None, uid, exc.reason)
        except (ApplianceError, OSError) as exc:
            logger.error(
                "cannot record instance %s from %s: %s", printable(uid), source, exc
            )
            return StoreResult(PROCESSING_FAILURE, None, uid, str(exc))

    def _record_for(
        self, path: Path, parsed: _Parsed, size: int, key: str | None = None
    ) -> InstanceRecord:
        dataset = parsed.dataset
        file_digest, content_digest = _digests(path, parsed.dataset_offset)
        patient = patient_key(
            text_of(dataset, "PatientID") or "",
            text_of(dataset, "IssuerOfPatientID") or "",
        )
        return InstanceRecord(
            sop_instance_uid=text_of(dataset, "SOPInstanceUID") or "",
            series_uid=text_of(dataset, "SeriesInstanceUID") or "",
            study_uid=text_of(dataset, "StudyInstanceUID") or "",
            patient=patient,
            transfer_syntax=parsed.transfer_syntax,
            size=size,
            sha256=file_digest,
            content_sha256=content_digest,
            received=time.time(),
            attributes=collect(dataset, INSTANCE_KEYWORDS),
            copies=[Copy(TIER_NAME, key or self.online.new_key())],
        )

    def _commit(
        self,
        record: InstanceRecord,
        dataset: Dataset,
        source: str,
        calling_ae: str,
        log_refusals: bool,
    ) -> StoreResult:
        try:
            result = self.committer.submit(_new_instance(record, dataset, calling_ae))
        except Exception:
            # The record did not commit: the file just placed counts for nothing.
            self.online.remove(record.copies[0].location)
            raise
        self._drop_obsolete(result)
        return self._answer(record, result, source, log_refusals)

    def _drop_obsolete(self, result: RecordResult) -> None:
        for tier, location in result.obsolete:
            if tier == TIER_NAME:
                self.online.remove(location)

    def _answer(
        self,
        record: InstanceRecord,
        result: RecordResult,
        source: str,
        log_refusals: bool = True,
    ) -> StoreResult:
        uid = record.sop_instance_uid
        outcome = result.outcome
        if outcome is Outcome.REFUSED:
            if log_refusals:
                _log_refusal(uid, source, result.reason)
            return StoreResult(DUPLICATE_INSTANCE, outcome, uid, result.reason)
        if outcome is Outcome.INCONSISTENT:
            if log_refusals:
                _log_refusal(uid, source, result.reason)
            return StoreResult(DOES_NOT_MATCH_SOP_CLASS, outcome, uid, result.reason)
        if outcome is Outcome.KEPT_FIRST:
            logger.warning(
                "instance %s from %s differs from the stored one; kept the stored "
                "copy (duplicate_policy keep_first)",
                printable(uid),
                source,
            )
        elif outcome is Outcome.REPLACED:
            logger.warning(
                "instance %s from %s differs from the stored one; replaced it "
                "(duplicate_policy replace)",
                printable(uid),
                source,
            )
        return StoreResult(SUCCESS, outcome, uid)


def _log_refusal(uid: str, source: str, reason: str) -> None:
    """The one WARNING line of a refused instance. The UID, and the UIDs a
    reason quotes, are the sender's: a line break in one, shown raw, would
    forge a line of the log, so control characters are shown as \\xNN."""
    logger.warning(
        "refused instance %s from %s: %s", printable(uid), source, printable(reason)
    )


def _wait_for(flushed: Future[None], path: Path) -> None:
    """Wait until ``path`` is on stable storage; its flush's error is ours."""
    try:
        flushed.result()
    except OSError as exc:
        raise translate_os_error(exc, f"cannot flush {path}") from exc


def _new_instance(
    record: InstanceRecord, dataset: Dataset, calling_ae: str = ""
) -> NewInstance:
    return NewInstance(
        record=record,
        patient=collect(dataset, PATIENT_KEYWORDS),
        study=collect(dataset, STUDY_KEYWORDS),
        series=collect(dataset, SERIES_KEYWORDS),
        calling_ae=calling_ae,
    )


def _parse(path: Path) -> _Parsed:
    """Check a Part 10 file's structure and read its header; refuse what
    cannot be understood, so that nothing the archive keeps is unreadable."""
    try:
        offset, transfer_syntax = part10.read_file_meta(path)
        part10.check_structure(path, offset, transfer_syntax)
        dataset = pydicom.dcmread(path, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    except part10.StructureError as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, str(exc)) from exc
    except OSError as exc:
        # The file went missing or cannot be read: the appliance's fault,
        # not the data set's.
        raise StorageError(f"cannot read the received file: {exc}") from exc
    except Exception as exc:
        raise RejectedInstance(
            CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}"
        ) from exc
    meta = dataset.file_meta
    return _Parsed(
        dataset,
        transfer_syntax,
        offset,
        sop_class_uid=text_of(meta, "MediaStorageSOPClassUID") or "",
        sop_instance_uid=text_of(meta, "MediaStorageSOPInstanceUID") or "",
    )


def _announced_uid(path: Path) -> str:
    """The SOP Instance UID the file meta announces, for a refusal's log line
    when the data set itself could not be read; '(unknown)' if none."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return "(unknown)"
    return text_of(meta, "MediaStorageSOPInstanceUID") or "(unknown)"


def _check_identity(
    parsed: _Parsed, refuse_long_uids: bool = False
) -> tuple[str, list[tuple[str, str]]]:
    """Refuse instances without their UIDs, or whose UIDs differ from the ones
    announced in the file meta (PS3.10 7.1) or the C-STORE request (PS3.4
    B.2.1); refuse UIDs that no query could name (:func:`_unsendable`) and
    UIDs too long to travel (``refuse_long_uids``). Returns the SOP
    Instance UID and the other non-conformant UIDs, to be warned about
    once the instance is stored (:func:`_warn_if_stored`).

    Invalid UIDs are judged before the announced ones are compared: a
    sender may cut an overlong UID to 64 characters in its request (DCMTK
    does), and the UID is what the sender has to correct.
    """
    dataset = parsed.dataset
    missing = [
        keyword
        for keyword in (
            "SOPClassUID",
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
        )
        if not text_of(dataset, keyword)
    ]
    if missing:
        raise RejectedInstance(
            DOES_NOT_MATCH_SOP_CLASS, "missing " + ", ".join(missing)
        )

    invalid = _invalid_uids(dataset)
    for keyword, value in invalid:
        refusal = _too_long(keyword, value) if refuse_long_uids else ""
        refusal = refusal or _unsendable(keyword, value)
        if refusal:
            raise RejectedInstance(_uid_status(keyword), refusal)
    return _check_announced(parsed), invalid


def _too_long(keyword: str, value: str) -> str:
    """Why the UID ``value`` of ``keyword`` is refused for its length; ""
    when it fits in a DIMSE message."""
    if len(value) <= _MAX_UID:
        return ""
    return f"{keyword} is {len(value)} characters long, over {_MAX_UID}: {value}"


def _unsendable(keyword: str, value: str) -> str:
    """Why the UID ``value`` of ``keyword`` is refused for a character that
    would make it a pattern, a list or a URL path of several segments when
    named again; "" when it has none.

    The reason starts with the fault (a C-STORE's Error Comment keeps its
    first 64 characters) and ends with the value as the sender wrote it,
    control characters escaped.
    """
    found = next((char for char in value if char in _UNSENDABLE), None)
    if found is None:
        return ""
    return (
        f"{keyword} holds {_UNSENDABLE[found]}, which no C-FIND or DICOMweb "
        f"URL can carry back as one UID: {value!r}"
    )


def _warn_if_stored(result: StoreResult, invalid: list[tuple[str, str]]) -> None:
    """One WARNING line for an instance stored with non-conformant UIDs.

    Only once it is stored: an instance refused for another reason (a
    duplicate, say) has its refusal's line, and is not said to be stored.
    """
    if not invalid or not result.ok:
        return
    named = ", ".join(f"{keyword} {value!r}" for keyword, value in invalid)
    logger.warning(
        "instance %r has a non-conformant %s; stored as it is",
        result.sop_instance_uid,
        named,
    )


def _check_announced(parsed: _Parsed) -> str:
    """The data set's SOP Instance UID, once it and its SOP Class UID are
    found to be the ones announced."""
    dataset = parsed.dataset
    uid = text_of(dataset, "SOPInstanceUID") or ""
    if uid != parsed.sop_instance_uid:
        raise RejectedInstance(
            DOES_NOT_MATCH_SOP_CLASS,
            f"the data set's SOP Instance UID {uid} differs from the announced "
            f"{parsed.sop_instance_uid}",
        )
    sop_class = text_of(dataset, "SOPClassUID") or ""
    if sop_class != parsed.sop_class_uid:
        raise RejectedInstance(
            DOES_NOT_MATCH_SOP_CLASS,
            f"the data set's SOP Class UID {sop_class} differs from the announced "
            f"{parsed.sop_class_uid}",
        )
    return uid


def _invalid_uids(dataset: Dataset) -> list[tuple[str, str]]:
    """The keyword and value of each of the instance's SOP Instance, Study
    and Series Instance UIDs that breaks the UID rules of PS3.5 9.1."""
    found = []
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = text_of(dataset, keyword) or ""
        if len(value) > _MAX_UID or not _UID.match(value):
            found.append((keyword, value))
    return found


def _uid_status(keyword: str) -> int:
    """The C-STORE status for an invalid UID of ``keyword``.

    The standard has a status of its own for the SOP Instance UID (PS3.7
    9.1.1.1.9 h); a Study or Series Instance UID that is no UID makes a
    data set that does not match its SOP class, whose IOD requires one
    (PS3.4 B.2.3, 0xA900).
    """
    if keyword == "SOPInstanceUID":
        return INVALID_SOP_INSTANCE
    return DOES_NOT_MATCH_SOP_CLASS


def _digests(path: Path, dataset_offset: int) -> tuple[str, str]:
    """SHA-256 of the whole file, and of the data set bytes after the file meta.

    The first verifies a copy; the second recognises the same instance sent
    again, whatever file meta the sender or an importer wrapped it in.
    """
    whole = hashlib.sha256()
    content = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            head = handle.read(dataset_offset)
            whole.update(head)
            while chunk := handle.read(_READ_CHUNK):
                whole.update(chunk)
                content.update(chunk)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    return whole.hexdigest(), content.hexdigest()
