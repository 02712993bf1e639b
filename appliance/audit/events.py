"""The appliance's audit events, built as audit messages (PS3.15 A.5.3).

Each function returns one :class:`AuditMessage`; the trail records it. The
short names (``instances-stored``, ``query``, ...) are what
``appliance audit show --event`` filters on and docs/audit.md lists.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field

from appliance.audit import codes
from appliance.audit.codes import Code
from appliance.audit.messages import AuditMessage, Participant, ParticipantObject


@dataclass(frozen=True)
class Peer:
    """A DICOM peer (or another host): its AE title and address."""

    ae_title: str
    address: str = ""
    # A user that is no AE title: a person's account (the HTTP server's),
    # an HL7 application (MSH-3^MSH-4).
    account: bool = False


@dataclass
class StudyRef:
    """A study as an audit message names it, with its patient."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    # SOP Class UID -> number of instances concerned
    sop_classes: dict[str, int] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(self.sop_classes.values())


def application_activity(started: bool, ae_title: str) -> AuditMessage:
    """The appliance started or stopped (A.5.3.1)."""
    kind = codes.APPLICATION_START if started else codes.APPLICATION_STOP
    return AuditMessage(
        name="application-start" if started else "application-stop",
        event_id=codes.APPLICATION_ACTIVITY,
        action=codes.EXECUTE,
        event_types=[kind],
        participants=[_appliance(ae_title, False, codes.APPLICATION), _launcher()],
    )


def audit_log_used(ae_title: str, log_path: str) -> AuditMessage:
    """Someone read the audit log (A.5.3.2): ``appliance audit show``."""
    log = ParticipantObject(
        object_id=log_path,
        id_type=codes.URI,
        type_code=codes.SYSTEM_OBJECT,
        role=codes.ROLE_SECURITY_RESOURCE,
        name="audit log",
    )
    return AuditMessage(
        name="audit-log-used",
        event_id=codes.AUDIT_LOG_USED,
        action=codes.READ,
        participants=[_local_user(), _appliance(ae_title, False, codes.APPLICATION)],
        objects=[log],
    )


def instances_stored(
    caller: Peer, ae_title: str, study: StudyRef | None, failure: str = ""
) -> AuditMessage:
    """Instances of one study received over one association (A.5.3.4):
    one message for those stored, another for those refused (without a
    study when the refused instances could not even be read)."""
    return AuditMessage(
        name="instances-stored",
        event_id=codes.INSTANCES_TRANSFERRED,
        action=codes.CREATE,
        outcome=codes.MINOR_FAILURE if failure else codes.SUCCESS,
        outcome_description=failure,
        participants=[
            _peer(caller, True, codes.SOURCE),
            _appliance(ae_title, False, codes.DESTINATION),
        ],
        objects=_study_objects(study) if study is not None else [],
    )


def query(
    caller: Peer,
    ae_title: str,
    sop_class_uid: str,
    identifier: bytes,
    transfer_syntax: str,
    patient_id: str = "",
    failure: str = "",
) -> AuditMessage:
    """A C-FIND (A.5.3.10): the request identifier as sent, base64."""
    request = ParticipantObject(
        object_id=sop_class_uid,
        id_type=codes.SOP_CLASS_UID,
        type_code=codes.SYSTEM_OBJECT,
        role=codes.ROLE_QUERY,
        query=identifier,
        details=[("TransferSyntax", transfer_syntax)],
    )
    objects = [request]
    if patient_id:
        objects.append(_patient(patient_id, ""))
    return AuditMessage(
        name="query",
        event_id=codes.QUERY,
        action=codes.EXECUTE,
        outcome=codes.MINOR_FAILURE if failure else codes.SUCCESS,
        outcome_description=failure,
        participants=[
            _peer(caller, True, codes.SOURCE),
            _appliance(ae_title, False, codes.DESTINATION),
        ],
        objects=objects,
    )


def instances_retrieved(
    caller: Peer,
    ae_title: str,
    destination: Peer,
    study: StudyRef,
    failure: str = "",
) -> AuditMessage:
    """Instances of one study sent by C-GET or C-MOVE (A.5.3.4). For a
    C-MOVE the caller that asked is a third participant."""
    participants = [
        _appliance(ae_title, False, codes.SOURCE),
        _peer(destination, destination == caller, codes.DESTINATION),
    ]
    if destination != caller:
        participants.append(_peer(caller, True, None))
    return AuditMessage(
        name="instances-retrieved",
        event_id=codes.INSTANCES_TRANSFERRED,
        action=codes.READ,
        outcome=codes.MINOR_FAILURE if failure else codes.SUCCESS,
        outcome_description=failure,
        participants=participants,
        objects=_study_objects(study),
    )


def exported(
    ae_title: str, destination: Peer, study: StudyRef, failure: str = ""
) -> AuditMessage:
    """A study sent to another archive by ``appliance export`` (A.5.3.5)."""
    return AuditMessage(
        name="exported",
        event_id=codes.EXPORT,
        action=codes.READ,
        outcome=codes.MINOR_FAILURE if failure else codes.SUCCESS,
        outcome_description=failure,
        participants=[
            _appliance(ae_title, False, codes.SOURCE),
            _peer(destination, False, codes.DESTINATION),
            _local_user(),
        ],
        objects=_study_objects(study),
    )


def imported(
    ae_title: str, source: str, study: StudyRef, failure: str = ""
) -> AuditMessage:
    """Instances read in from files or media (A.5.3.6): ``appliance import``."""
    media = Participant(source, False, codes.SOURCE_MEDIA)
    return AuditMessage(
        name="imported",
        event_id=codes.IMPORT,
        action=codes.CREATE,
        outcome=codes.MINOR_FAILURE if failure else codes.SUCCESS,
        outcome_description=failure,
        participants=[
            media,
            _appliance(ae_title, False, codes.DESTINATION),
            _local_user(),
        ],
        objects=_study_objects(study),
    )


def copies_changed(
    name: str,
    ae_title: str,
    study: StudyRef,
    action: str,
    description: str,
    outcome: int = codes.SUCCESS,
) -> AuditMessage:
    """The appliance itself read, made or dropped copies of a study's
    instances (A.5.3.3, DICOM Instances Accessed): a recall, a release, a
    repair by the scrub, a copy found lost."""
    return AuditMessage(
        name=name,
        event_id=codes.INSTANCES_ACCESSED,
        action=action,
        outcome=outcome,
        outcome_description=description if outcome else "",
        participants=[_appliance(ae_title, True, codes.APPLICATION)],
        objects=_study_objects(study, description if not outcome else ""),
    )


def study_deleted(ae_title: str, study: StudyRef, reason: str) -> AuditMessage:
    """A study removed from the archive (A.5.3.7)."""
    return AuditMessage(
        name="study-deleted",
        event_id=codes.STUDY_DELETED,
        action=codes.DELETE,
        participants=[_appliance(ae_title, False, codes.APPLICATION), _local_user()],
        objects=_study_objects(study, reason),
    )


def restore_activity(
    name: str,
    ae_title: str,
    source: str,
    description: str,
    studies: list[StudyRef] | None = None,
    failure: str = "",
) -> AuditMessage:
    """A restore (instances imported from the mirror or media, A.5.3.6) or a
    restore drill (instances read back and checked, A.5.3.3)."""
    drill = name == "drill"
    return AuditMessage(
        name=name,
        event_id=codes.INSTANCES_ACCESSED if drill else codes.IMPORT,
        action=codes.READ if drill else codes.CREATE,
        outcome=codes.MINOR_FAILURE if failure else codes.SUCCESS,
        outcome_description="; ".join(p for p in (description, failure) if p),
        participants=[
            Participant(source, False, codes.SOURCE_MEDIA),
            _appliance(ae_title, not drill, codes.DESTINATION),
            _local_user(),
        ],
        objects=[o for study in studies or [] for o in _study_objects(study)],
    )


def patient_record_changed(
    ae_title: str,
    action: str,
    patient_id: str,
    patient_name: str = "",
    description: str = "",
    source: Peer | None = None,
    other_patient_ids: list[str] | None = None,
) -> AuditMessage:
    """A patient record created, updated, merged or deleted (A.5.3.9).
    ``action`` is C, R, U or D; for a merge, ``other_patient_ids`` names the
    merged identities and ``patient_id`` the one that survives."""
    participants = [_appliance(ae_title, source is None, codes.APPLICATION)]
    if source is not None:
        participants.append(_peer(source, True, codes.SOURCE))
    objects = [_patient(patient_id, patient_name, description)]
    objects += [_patient(other, "", "merged") for other in other_patient_ids or []]
    return AuditMessage(
        name="patient-record",
        event_id=codes.PATIENT_RECORD,
        action=action,
        participants=participants,
        objects=objects,
    )


def security_alert(
    ae_title: str,
    description: str,
    peer: Peer | None = None,
    kind: Code = codes.NODE_AUTHENTICATION,
    outcome: int = codes.MINOR_FAILURE,
) -> AuditMessage:
    """Something a security officer should see (A.5.3.11): an association
    refused, a TLS handshake that failed, a mirror's host key that changed,
    a peer that keeps sending broken messages. ``peer`` is the subject."""
    participants = [_appliance(ae_title, peer is None, codes.APPLICATION)]
    objects = []
    if peer is not None:
        participants.append(_peer(peer, True, None))
        node = ParticipantObject(
            object_id=peer.address or peer.ae_title,
            id_type=codes.NODE_ID,
            type_code=codes.SYSTEM_OBJECT,
            role=codes.ROLE_SECURITY_RESOURCE,
            description=description,
        )
        objects.append(node)
    return AuditMessage(
        name="security-alert",
        event_id=codes.SECURITY_ALERT,
        action=codes.EXECUTE,
        outcome=outcome,
        event_types=[kind],
        outcome_description=description,
        participants=participants,
        objects=objects,
    )


def operator_action(
    ae_title: str, account: str, address: str, action: str, detail: str
) -> AuditMessage:
    """An operator's action through the admin API (a volume marked loaded,
    the mirror's rate changed...): a restricted function used, by whom and
    from where. ``detail`` names volumes, rates or UIDs, never a patient."""
    user = Participant(
        user_id=account,
        requestor=True,
        role=None,
        network_access_point=address,
    )
    return AuditMessage(
        name="operator-action",
        event_id=codes.SECURITY_ALERT,
        action=codes.EXECUTE,
        outcome=codes.SUCCESS,
        event_types=[codes.RESTRICTED_FUNCTION],
        outcome_description=f"{action}: {detail}",
        participants=[_appliance(ae_title, False, codes.APPLICATION), user],
        objects=[],
    )


def login_refused(
    ae_title: str, user: str, address: str, reason: str = ""
) -> AuditMessage:
    """Credentials the HTTP server refused: who they named (or "-") and
    from where; a run of them is someone guessing passwords. ``reason``
    replaces the default description (a lock that begins)."""
    person = Participant(
        user_id=user or "-", requestor=True, network_access_point=address
    )
    return AuditMessage(
        name="login-refused",
        event_id=codes.USER_AUTHENTICATION,
        action=codes.EXECUTE,
        outcome=codes.MINOR_FAILURE,
        event_types=[codes.LOGIN],
        outcome_description=reason or "wrong user name, password or token",
        participants=[person, _appliance(ae_title, False, codes.APPLICATION)],
        objects=[],
    )


# -- participants and objects ---------------------------------------------------


def _appliance(ae_title: str, requestor: bool, role: Code | None) -> Participant:
    return Participant(
        user_id=ae_title,
        requestor=requestor,
        role=role,
        alternative_user_id=f"AETITLE={ae_title}",
    )


def _peer(peer: Peer, requestor: bool, role: Code | None) -> Participant:
    return Participant(
        user_id=peer.ae_title or "?",
        requestor=requestor,
        role=role,
        alternative_user_id=(
            f"AETITLE={peer.ae_title}" if peer.ae_title and not peer.account else ""
        ),
        network_access_point=peer.address,
    )


def _local_user() -> Participant:
    """The person who ran the command (or the service's user)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Participant(user_id=user, requestor=True, role=codes.APPLICATION_LAUNCHER)


def _launcher() -> Participant:
    launcher = _local_user()
    launcher.requestor = False
    return launcher


def _patient(patient_id: str, name: str, description: str = "") -> ParticipantObject:
    return ParticipantObject(
        object_id=patient_id,
        id_type=codes.PATIENT_NUMBER,
        type_code=codes.PERSON,
        role=codes.ROLE_PATIENT,
        name=name,
        description=description,
    )


def _study_objects(study: StudyRef, description: str = "") -> list[ParticipantObject]:
    """The study (with its SOP classes and accession) and its patient."""
    item = ParticipantObject(
        object_id=study.study_uid,
        id_type=codes.STUDY_INSTANCE_UID,
        type_code=codes.SYSTEM_OBJECT,
        role=codes.ROLE_REPORT,
        description=description,
        sop_classes=dict(study.sop_classes),
        accessions=[study.accession] if study.accession else [],
    )
    if not study.patient_id and not study.patient_name:
        return [item]
    return [item, _patient(study.patient_id, study.patient_name)]
