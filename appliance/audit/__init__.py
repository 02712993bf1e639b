"""The audit trail: who stored, queried, retrieved, exported, recalled,
released or deleted what, patient record changes and security alerts, as
DICOM audit messages (PS3.15 A.5) in a local append-only log that a sender
forwards to a syslog collector (docs/audit.md).

The calls the rest of the appliance makes take a *target*: the
configuration, a :class:`Trail` (which a long-lived object keeps), or None
(auditing off for that caller)::

    audit.record(config, events.query(...))
    audit.security_alert(config, "host key of mirror.example changed",
                         Peer("", "192.0.2.7"), outcome=codes.SERIOUS_FAILURE)
    audit.patient_record_changed(config, codes.UPDATE, "PID-1", "DOE^JANE",
                                 description="ADT^A08", source=Peer("RIS"))

Recording appends one line to the log and flushes it; it never sends over
the network and never raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from appliance.audit import codes, events
from appliance.audit.codes import Code
from appliance.audit.events import Peer, StudyRef
from appliance.audit.messages import AuditMessage
from appliance.audit.trail import Trail

if TYPE_CHECKING:
    from appliance.catalog.store import Catalog
    from appliance.config import Config

Target = Union["Config", Trail, None]

__all__ = [
    "Peer",
    "StudyRef",
    "Target",
    "Trail",
    "application_started",
    "application_stopped",
    "codes",
    "events",
    "instances_imported",
    "login_refused",
    "operator_action",
    "patient_record_changed",
    "record",
    "restore_finished",
    "security_alert",
    "study_copies_changed",
    "study_deleted",
    "study_exported",
    "trail_of",
]


def trail_of(target: Target) -> Trail | None:
    if target is None or isinstance(target, Trail):
        return target
    return Trail.of(target)


def record(target: Target, message: AuditMessage) -> None:
    """Record ``message`` in the audit log of ``target``."""
    trail = trail_of(target)
    if trail is not None:
        trail.record(message)


def application_started(target: Target) -> None:
    trail = trail_of(target)
    if trail is not None:
        trail.record(events.application_activity(True, trail.ae_title))


def application_stopped(target: Target) -> None:
    trail = trail_of(target)
    if trail is not None:
        trail.record(events.application_activity(False, trail.ae_title))


def security_alert(
    target: Target,
    description: str,
    peer: Peer | None = None,
    kind: Code = codes.NODE_AUTHENTICATION,
    outcome: int = codes.MINOR_FAILURE,
) -> None:
    """A security alert: an association refused, a failed TLS handshake,
    a changed host key, a peer sending broken messages again and again."""
    trail = trail_of(target)
    if trail is not None:
        trail.record(
            events.security_alert(trail.ae_title, description, peer, kind, outcome)
        )


def login_refused(target: Target, user: str, address: str, reason: str = "") -> None:
    """Credentials the HTTP server refused, naming ``user`` (or none);
    ``reason`` when it is not that they were wrong (a lock)."""
    trail = trail_of(target)
    if trail is not None:
        trail.record(events.login_refused(trail.ae_title, user, address, reason))


def operator_action(
    target: Target, account: str, address: str, action: str, detail: str
) -> None:
    """An operator's action through the admin API, by ``account`` from
    ``address``."""
    trail = trail_of(target)
    if trail is not None:
        trail.record(
            events.operator_action(trail.ae_title, account, address, action, detail)
        )


def patient_record_changed(
    target: Target,
    action: str,
    patient_id: str,
    patient_name: str = "",
    description: str = "",
    source: Peer | None = None,
    other_patient_ids: list[str] | None = None,
) -> None:
    """A patient record created (C), updated (U), merged (U, with the
    merged identities in ``other_patient_ids``) or deleted (D)."""
    trail = trail_of(target)
    if trail is not None:
        message = events.patient_record_changed(
            trail.ae_title,
            action,
            patient_id,
            patient_name,
            description,
            source,
            other_patient_ids,
        )
        trail.record(message)


def study_deleted(
    target: Target, catalog: Catalog, study_uid: str, reason: str
) -> None:
    """Call before the study leaves the catalog, so that its patient and
    instances can still be named."""
    trail = trail_of(target)
    if trail is not None:
        from appliance.audit.studies import study

        trail.record(
            events.study_deleted(trail.ae_title, study(catalog, study_uid), reason)
        )


def study_copies_changed(
    target: Target,
    name: str,
    catalog: Catalog,
    study_uid: str,
    action: str,
    description: str,
    outcome: int = codes.SUCCESS,
) -> None:
    """The appliance recalled, released, repaired or lost copies of a study
    (``name``: study-recalled, study-released, study-repaired, copies-lost)."""
    trail = trail_of(target)
    if trail is None or not trail.enabled:
        return
    from appliance.audit.studies import study

    ref = study(catalog, study_uid)
    trail.record(
        events.copies_changed(name, trail.ae_title, ref, action, description, outcome)
    )


def study_exported(
    target: Target,
    catalog: Catalog,
    study_uid: str,
    destination: Peer,
    failure: str = "",
) -> None:
    """A study sent to another archive by ``appliance export``."""
    trail = trail_of(target)
    if trail is None or not trail.enabled:
        return
    from appliance.audit.studies import study

    ref = study(catalog, study_uid)
    trail.record(events.exported(trail.ae_title, destination, ref, failure))


def restore_finished(
    target: Target,
    name: str,
    source: str,
    description: str,
    failure: str = "",
    catalog: Catalog | None = None,
    study_uids: list[str] | None = None,
) -> None:
    """A restore (``name`` restore) or a restore drill (``name`` drill) ended;
    the studies are named when given (a drill's sample, not a whole restore)."""
    trail = trail_of(target)
    if trail is None or not trail.enabled:
        return
    refs: list[StudyRef] = []
    if catalog is not None and study_uids:
        from appliance.audit.studies import study

        refs = [study(catalog, uid) for uid in study_uids]
    message = events.restore_activity(
        name, trail.ae_title, source, description, refs, failure
    )
    trail.record(message)


def instances_imported(
    target: Target, catalog: Catalog, sop_instance_uids: list[str], source: str
) -> None:
    """Files read in by ``appliance import``: one message per study."""
    trail = trail_of(target)
    if trail is None or not trail.enabled or not sop_instance_uids:
        return
    from appliance.audit.studies import studies_of_instances

    for ref in studies_of_instances(catalog, sop_instance_uids):
        trail.record(events.imported(trail.ae_title, source, ref))
