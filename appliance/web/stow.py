"""STOW-RS (PS3.18 10.5): each part of a request stored as a C-STORE is.

Every part goes through :class:`appliance.ingest.Ingest`, the one path by
which instances enter the archive, so the durability rules (bytes flushed
and renamed, catalog record committed, only then success) and the
duplicate policy are those of C-STORE. The answer is the store response
module of PS3.18 10.5.3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
from pydicom.dataset import Dataset

from appliance.audit.dicom import StoreTally
from appliance.audit.events import Peer
from appliance.catalog.records import text_of
from appliance.catalog.store import Outcome
from appliance.ingest import DOES_NOT_MATCH_SOP_CLASS
from appliance.log_text import printable
from appliance.web.archive import Archive

logger = logging.getLogger(__name__)

_UIDS = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]
# Refused instances of one request logged one line each; the others are
# counted in one line. A request may hold any number of parts: thousands of
# refusals, each a WARNING line, would bury the log and push every other
# process's warnings out of the recent errors (appliance/error_log.py).
REFUSALS_LOGGED = 10


@dataclass
class _Refusals:
    """The WARNING lines of one request's refused instances."""

    source: str
    count: int = 0

    def log(self, sop_instance: str, reason: str) -> None:
        self.count += 1
        if self.count <= REFUSALS_LOGGED:
            logger.warning(
                "refused instance %s from %s: %s",
                printable(sop_instance) or "(unknown)",
                self.source,
                printable(reason),
            )

    def log_the_rest(self) -> None:
        if self.count > REFUSALS_LOGGED:
            logger.warning(
                "STOW-RS from %s: %d more instance(s) refused, not logged one by "
                "one (the answer's FailedSOPSequence names each)",
                self.source,
                self.count - REFUSALS_LOGGED,
            )


@dataclass
class StoreAnswer:
    """The HTTP status, the response body and the failure reasons."""

    status: int
    body: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


def store_parts(
    archive: Archive,
    parts: list[Path],
    study: str | None,
    source: str,
    base: str,
    caller: Peer | None = None,
) -> StoreAnswer:
    """Store each part file (consumed whatever happens); ``study`` is the
    study the URL names, if any; ``base`` the URL RetrieveURLs start with.
    What was stored and refused is audited as ``caller``'s."""
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    reasons: list[str] = []
    already_there = 0
    tally = StoreTally()
    refusals = _Refusals(source)
    for number, path in enumerate(parts, start=1):
        try:
            item, reason, outcome = _store_one(archive, path, study, source, base)
        finally:
            path.unlink(missing_ok=True)
        uid = str(item.ReferencedSOPInstanceUID)
        tally.add(uid, reason is None, reason or "")
        already_there += outcome is Outcome.IDENTICAL
        if reason is None:
            referenced.append(item)
        else:
            refusals.log(uid, reason)
            failed.append(item)
            reasons.append(f"instance {number}: {reason}")
    refusals.log_the_rest()
    if archive.tiers.audit is not None and caller is not None:
        tally.report(archive.tiers.audit, archive.catalog, caller)

    stored = Dataset()
    if study is not None and referenced:
        stored.RetrieveURL = f"{base}/studies/{_segment(study)}"
    if referenced:
        stored.ReferencedSOPSequence = referenced
    if failed:
        stored.FailedSOPSequence = failed
    # PS3.18 10.5.3: 200 all stored, 202 some, 409 none.
    status = 200 if not failed else 409 if not referenced else 202
    logger.info(
        "STOW-RS from %s: %d instance(s) stored, %d already there, %d refused",
        source,
        len(referenced) - already_there,
        already_there,
        len(failed),
    )
    return StoreAnswer(status, stored.to_json_dict(), reasons)


def _store_one(
    archive: Archive, path: Path, study: str | None, source: str, base: str
) -> tuple[Dataset, str | None, Outcome | None]:
    """The part's result item, why it was refused (None when stored) and
    what storing it did (None when it was refused before ingest)."""
    sop_class, sop_instance = _announced(path)
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance

    # A UID that no URL or C-FIND could carry back is refused by ingest, as
    # over C-STORE and on import.
    refusal = _elsewhere(_uids_of(path), study)
    if refusal is not None:
        item.FailureReason, reason = refusal
        return item, reason, None

    # Refusals are logged by store_parts, which logs only a request's first few.
    result = archive.ingest.store_received(
        path, source, refuse_long_uids=True, log_refusals=False
    )
    if result.sop_instance_uid and result.sop_instance_uid != "(unknown)":
        item.ReferencedSOPInstanceUID = result.sop_instance_uid
    if not result.ok:
        item.FailureReason = result.status
        return item, result.reason or f"status 0x{result.status:04X}", result.outcome
    with archive.catalog.read() as txn:
        record = archive.catalog.instance(txn, result.sop_instance_uid)
    if record is not None:
        item.RetrieveURL = (
            f"{base}/studies/{_segment(record.study_uid)}"
            f"/series/{_segment(record.series_uid)}"
            f"/instances/{_segment(record.sop_instance_uid)}"
        )
    return item, None, result.outcome


def _segment(uid: str) -> str:
    # A non-conformant UID stored as it is (a space, say) must still make
    # a valid URL; a conformant one is left as it is.
    return quote(uid, safe="")


def _announced(path: Path) -> tuple[str, str]:
    """The SOP Class and Instance UIDs the part's file meta announces."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return "", ""
    return (
        text_of(meta, "MediaStorageSOPClassUID") or "",
        text_of(meta, "MediaStorageSOPInstanceUID") or "",
    )


def _uids_of(path: Path) -> dict[str, str]:
    """The part's SOP Instance, Series and Study Instance UIDs as text (a
    value with several is joined by backslashes); those it has."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UIDS)
    except Exception:
        # Ingest refuses what cannot be read, with the reason.
        return {}
    found = {keyword: text_of(dataset, keyword) for keyword in _UIDS}
    return {keyword: value for keyword, value in found.items() if value}


def _elsewhere(uids: dict[str, str], study: str | None) -> tuple[int, str] | None:
    """The status and reason to refuse an instance of another study than
    the one the URL names (PS3.18 10.5.1)."""
    found = uids.get("StudyInstanceUID")
    if study is None or found is None or found == study:
        return None
    return (
        DOES_NOT_MATCH_SOP_CLASS,
        "the instance belongs to another study than the URL names",
    )
