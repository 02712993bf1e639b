"""What the DICOM node records: a message per association and study for
the instances it received, one per C-FIND, one per study a C-GET or
C-MOVE sent. Called when the work is done, never before a response."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset

from appliance.audit import events
from appliance.audit.events import Peer, StudyRef
from appliance.audit.studies import studies_of_instances, studies_with_counts
from appliance.audit.trail import Trail
from appliance.catalog.store import Catalog

# Characters that make a C-FIND key a pattern rather than a value.
_WILDCARDS = set("*?\\")


class RetrievedItem(Protocol):
    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def study_uid(self) -> str: ...


def peer_of(assoc: Any) -> Peer:
    """The peer that requested the association: AE title and address."""
    requestor = assoc.requestor
    title = requestor.ae_title
    if not title and requestor.primitive is not None:
        title = requestor.primitive.calling_ae_title
    if isinstance(title, bytes):
        title = title.decode("ascii", "replace")
    return Peer(str(title or "").strip(), str(requestor.address or ""))


@dataclass
class StoreTally:
    """The instances one association stored and refused."""

    stored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, sop_instance_uid: str, ok: bool, reason: str = "") -> None:
        if ok:
            self.stored.append(sop_instance_uid)
        else:
            self.refused.append(sop_instance_uid)
            self.reasons[reason or "refused"] += 1

    def report(self, trail: Trail, catalog: Catalog, caller: Peer) -> None:
        """One message per study stored, one per study with refusals."""
        if not trail.enabled or not (self.stored or self.refused):
            return
        for study in studies_of_instances(catalog, self.stored):
            trail.record(events.instances_stored(caller, trail.ae_title, study))
        if not self.refused:
            return
        failure = f"{len(self.refused)} instance(s) refused: " + ", ".join(
            f"{reason} ({count})" for reason, count in self.reasons.most_common()
        )
        known: list[StudyRef | None] = [*studies_of_instances(catalog, self.refused)]
        for subject in known or [None]:
            message = events.instances_stored(caller, trail.ae_title, subject, failure)
            trail.record(message)


def query_answered(
    trail: Trail,
    caller: Peer,
    sop_class_uid: str,
    raw_identifier: bytes,
    transfer_syntax: str,
    identifier: Dataset | None,
    failure: str = "",
) -> None:
    """Record one C-FIND with its identifier as received."""
    if not trail.enabled:
        return
    patient_id = _exact(identifier, "PatientID") if identifier is not None else ""
    message = events.query(
        caller,
        trail.ae_title,
        sop_class_uid,
        raw_identifier,
        transfer_syntax,
        patient_id,
        failure,
    )
    trail.record(message)


def _exact(identifier: Dataset, keyword: str) -> str:
    """The key's value when it names one value, not a pattern."""
    try:
        value = str(identifier.get(keyword, "") or "").strip()
    except Exception:  # an undecodable value names nothing
        return ""
    return "" if _WILDCARDS & set(value) else value


def retrieved(
    trail: Trail,
    catalog: Catalog,
    caller: Peer,
    destination: Peer | None,
    items: Sequence[RetrievedItem],
    failed_uids: Sequence[str],
    not_attempted: int,
) -> None:
    """One message per study sent (C-GET or C-MOVE), one per study with
    instances that failed or were never attempted."""
    if not trail.enabled or not items:
        return
    failed = set(failed_uids)
    attempted = len(items) - not_attempted
    sent: dict[str, Counter[str]] = defaultdict(Counter)
    missed: dict[str, Counter[str]] = defaultdict(Counter)
    for index, item in enumerate(items):
        ok = index < attempted and item.sop_instance_uid not in failed
        (sent if ok else missed)[item.study_uid][item.sop_class_uid] += 1
    target = destination or caller
    for study in studies_with_counts(catalog, sent):
        message = events.instances_retrieved(caller, trail.ae_title, target, study)
        trail.record(message)
    for study in studies_with_counts(catalog, missed):
        failure = f"{study.instances} instance(s) not sent"
        trail.record(
            events.instances_retrieved(caller, trail.ae_title, target, study, failure)
        )
