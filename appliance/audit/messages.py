"""Audit messages in the DICOM audit message format (PS3.15 A.5.1): the
message as data, its XML encoding, and the summary ``audit show`` prints.

The XML follows the DICOM schema, which extends RFC 3881::

    AuditMessage
      EventIdentification  EventActionCode EventDateTime EventOutcomeIndicator
        EventID, EventTypeCode*, EventOutcomeDescription?
      ActiveParticipant+   UserID AlternativeUserID? UserName? UserIsRequestor
                           NetworkAccessPointID? NetworkAccessPointTypeCode?
        RoleIDCode?
      AuditSourceIdentification  AuditSourceID AuditEnterpriseSiteID?
        AuditSourceTypeCode
      ParticipantObjectIdentification*  ParticipantObjectID
                           ParticipantObjectTypeCode ParticipantObjectTypeCodeRole
        ParticipantObjectIDTypeCode, ParticipantObjectName | ParticipantObjectQuery,
        ParticipantObjectDetail*, ParticipantObjectDescription?, SOPClass*,
        Accession*

Coded values carry csd-code, codeSystemName and originalText attributes.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.audit import codes
from appliance.audit.codes import Code

# Characters XML 1.0 cannot carry at all, not even escaped; DICOM values
# may hold some (NUL padding, ESC of ISO 2022 character sets).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass
class Participant:
    """An active participant: a person, an application or a peer AE."""

    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str = ""
    user_name: str = ""
    network_access_point: str = ""


@dataclass
class ParticipantObject:
    """What the event was about: a patient, a study, a query, a node."""

    object_id: str
    id_type: Code
    type_code: str
    role: str
    name: str = ""
    query: bytes | None = None
    description: str = ""
    details: list[tuple[str, str]] = field(default_factory=list)
    # SOP Class UID -> number of instances of that class (studies only)
    sop_classes: dict[str, int] = field(default_factory=dict)
    accessions: list[str] = field(default_factory=list)


@dataclass
class AuditMessage:
    """One audit event. ``name`` is the short name ``audit show`` filters on,
    e.g. ``instances-stored``; the audit source is filled in when recorded."""

    name: str
    event_id: Code
    action: str
    outcome: int = codes.SUCCESS
    event_types: list[Code] = field(default_factory=list)
    outcome_description: str = ""
    participants: list[Participant] = field(default_factory=list)
    objects: list[ParticipantObject] = field(default_factory=list)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    source_id: str = ""
    site_id: str = ""


def clean(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry."""
    return _NOT_XML.sub("", text)


def timestamp(moment: datetime) -> str:
    """UTC with milliseconds and a Z, as EventDateTime and RFC 5424 want."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def to_xml(message: AuditMessage) -> str:
    """The message as one XML document (UTF-8 text, no declaration, one line:
    line breaks inside values are character references)."""
    root = ET.Element("AuditMessage")
    _event(root, message)
    for participant in message.participants:
        _participant(root, participant)
    source = _sub(
        root,
        "AuditSourceIdentification",
        AuditSourceID=message.source_id,
        AuditEnterpriseSiteID=message.site_id,
    )
    _coded(source, "AuditSourceTypeCode", codes.APPLICATION_SERVER)
    for item in message.objects:
        _object(root, item)
    text = ET.tostring(root, encoding="unicode")
    # Attribute values are escaped by ElementTree; element text keeps line
    # breaks, which would split the record in the one-record-a-line log.
    return text.replace("\r", "&#13;").replace("\n", "&#10;")


def _event(root: ET.Element, message: AuditMessage) -> None:
    event = _sub(
        root,
        "EventIdentification",
        EventActionCode=message.action,
        EventDateTime=timestamp(message.time),
        EventOutcomeIndicator=str(message.outcome),
    )
    _coded(event, "EventID", message.event_id)
    for code in message.event_types:
        _coded(event, "EventTypeCode", code)
    if message.outcome_description:
        _text(event, "EventOutcomeDescription", message.outcome_description)


def _participant(root: ET.Element, participant: Participant) -> None:
    point = participant.network_access_point
    element = _sub(
        root,
        "ActiveParticipant",
        UserID=participant.user_id,
        AlternativeUserID=participant.alternative_user_id,
        UserName=participant.user_name,
        UserIsRequestor="true" if participant.requestor else "false",
        NetworkAccessPointID=point,
        NetworkAccessPointTypeCode=_access_point_type(point) if point else "",
    )
    if participant.role is not None:
        _coded(element, "RoleIDCode", participant.role)


def _object(root: ET.Element, item: ParticipantObject) -> None:
    element = _sub(
        root,
        "ParticipantObjectIdentification",
        ParticipantObjectID=item.object_id,
        ParticipantObjectTypeCode=item.type_code,
        ParticipantObjectTypeCodeRole=item.role,
    )
    _coded(element, "ParticipantObjectIDTypeCode", item.id_type)
    if item.name:
        _text(element, "ParticipantObjectName", item.name)
    if item.query is not None:
        _text(element, "ParticipantObjectQuery", base64.b64encode(item.query).decode())
    for kind, value in item.details:
        encoded = base64.b64encode(clean(value).encode()).decode()
        _sub(element, "ParticipantObjectDetail", type=kind, value=encoded)
    if item.description:
        _text(element, "ParticipantObjectDescription", item.description)
    for uid, count in item.sop_classes.items():
        _sub(element, "SOPClass", UID=uid, NumberOfInstances=str(count))
    for number in item.accessions:
        _sub(element, "Accession", Number=number)


def _access_point_type(point: str) -> str:
    try:
        ipaddress.ip_address(point)
    except ValueError:
        return codes.MACHINE_NAME
    return codes.IP_ADDRESS


def _sub(parent: ET.Element, tag: str, **attributes: str) -> ET.Element:
    """A child element with the attributes that have a value."""
    present = {name: clean(value) for name, value in attributes.items() if value}
    return ET.SubElement(parent, tag, present)


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    attributes = {
        "csd-code": code.code,
        "codeSystemName": code.system,
        "originalText": code.meaning,
    }
    return ET.SubElement(parent, tag, attributes)


def _text(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = clean(text)


# -- reading messages back ---------------------------------------------------


@dataclass
class Summary:
    """What ``audit show`` prints of one message."""

    time: str
    event: str
    action: str
    outcome: int
    users: list[str]
    patients: list[str]
    studies: list[str]
    description: str

    def as_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "event": self.event,
            "action": self.action,
            "outcome": self.outcome,
            "users": self.users,
            "patients": self.patients,
            "studies": self.studies,
            "description": self.description,
        }


def summarize(xml: str) -> Summary:
    """The summary of one message; ValueError if it is no audit message."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc
    event = root.find("EventIdentification")
    if root.tag != "AuditMessage" or event is None:
        raise ValueError("not an AuditMessage")
    event_id = event.find("EventID")
    types = [e.get("originalText", "") for e in event.findall("EventTypeCode")]
    name = event_id.get("originalText", "") if event_id is not None else ""
    return Summary(
        time=event.get("EventDateTime", ""),
        event=" / ".join([name, *types]),
        action=event.get("EventActionCode", ""),
        outcome=int(event.get("EventOutcomeIndicator", "0")),
        users=_users(root),
        patients=_object_ids(root, codes.PATIENT_NUMBER),
        studies=_object_ids(root, codes.STUDY_INSTANCE_UID),
        description=_description(root, event),
    )


def _users(root: ET.Element) -> list[str]:
    """The requestors first, then the other participants."""
    found = sorted(
        root.findall("ActiveParticipant"),
        key=lambda p: p.get("UserIsRequestor") != "true",
    )
    names = []
    for participant in found:
        user = participant.get("UserID", "")
        point = participant.get("NetworkAccessPointID")
        names.append(f"{user}@{point}" if point else user)
    return names


def _object_ids(root: ET.Element, id_type: Code) -> list[str]:
    ids = []
    for item in root.findall("ParticipantObjectIdentification"):
        coded = item.find("ParticipantObjectIDTypeCode")
        if coded is not None and coded.get("csd-code") == id_type.code:
            ids.append(item.get("ParticipantObjectID", ""))
    return ids


def _description(root: ET.Element, event: ET.Element) -> str:
    parts = [event.findtext("EventOutcomeDescription") or ""]
    for item in root.findall("ParticipantObjectIdentification"):
        parts.append(item.findtext("ParticipantObjectDescription") or "")
    # A security alert says the same in its outcome and its node object:
    # shown once.
    return "; ".join(part for part in dict.fromkeys(parts) if part)
