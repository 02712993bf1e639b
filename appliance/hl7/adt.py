"""Reading patient administration messages (ADT) from registration.

Accepted, with what the archive does:

| event | meaning | identifiers | attributes |
| --- | --- | --- | --- |
| A08, A31 | update patient information | PID-3 (every repetition) | PID-5, 7, 8 |
| A40 | merge patient: MRG-1 into PID-3 | PID-3 first repetition, MRG-1 | PID-5, 7, 8 |
| A47 | change patient identifier list | PID-3 first repetition, MRG-1 | PID-5, 7, 8 |

Other ADT events get AR. An identifier is CX component 1, its issuer the
namespace of component 4 (PID-3.4, MRG-1.4), matched with
IssuerOfPatientID. Attributes become DICOM values: PID-5 (XPN family^given^
middle^suffix^prefix) as PatientName family^given^middle^prefix^suffix,
PID-7 as PatientBirthDate, PID-8 as PatientSex (F, M; O, A, N as O; U as
unknown), and for A08/A31 the further PID-3 repetitions as OtherPatientIDs.
An empty field leaves the attribute as it is; ``""`` (HL7's null) clears it.
Only the first PID and MRG of a message are read.
"""

from __future__ import annotations

import calendar
import logging
import re
from dataclasses import dataclass, field

import hl7

from appliance.hl7.messages import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    UNSUPPORTED_EVENT_CODE,
    MessageError,
    PatientIdentifier,
    _identifier,
    _require_segment,
    _value,
)

logger = logging.getLogger(__name__)

UPDATE = "update"
MERGE = "merge"
CHANGE_ID = "change-id"
EVENTS = {"A08": UPDATE, "A31": UPDATE, "A40": MERGE, "A47": CHANGE_ID}

_NULL = '""'
_SEX = {"F": "F", "M": "M", "O": "O", "A": "O", "N": "O", "U": None}
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})")


@dataclass(frozen=True)
class PatientMessage:
    """What one ADT message asks of the catalog."""

    control_id: str
    sender: str  # MSH-3 and MSH-4, to tell senders' control IDs apart
    message_type: str  # e.g. "ADT^A40"
    action: str  # update, merge or change-id
    identifiers: tuple[PatientIdentifier, ...]  # PID-3
    prior: PatientIdentifier | None = None  # MRG-1 (merge, change-id)
    # DICOM keyword -> new value, None to clear; absent: unchanged.
    demographics: dict[str, str | None] = field(default_factory=dict)


def is_adt(message: hl7.Message) -> bool:
    return _value(message, "MSH", 9, component=1).upper() == "ADT"


def read(message: hl7.Message, control_id: str, sender: str) -> PatientMessage:
    """The patient change an ADT message asks for, or MessageError."""
    event = _value(message, "MSH", 9, component=2).upper()
    if event not in EVENTS:
        raise MessageError(
            "AR",
            UNSUPPORTED_EVENT_CODE,
            "MSH^1^9^1^2",
            f"ADT^{event or '(empty)'} is not handled (A08, A31, A40, A47 are)",
        )
    action = EVENTS[event]
    _require_segment(message, "PID")
    identifiers = _identifiers(message, "PID", 3)
    if not identifiers:
        raise MessageError(
            "AE", REQUIRED_FIELD_MISSING, "PID^1^3", "no patient identifier (PID-3)"
        )
    prior = None
    if action != UPDATE:
        _require_segment(message, "MRG")
        merged = _identifiers(message, "MRG", 1)
        if not merged:
            raise MessageError(
                "AE",
                REQUIRED_FIELD_MISSING,
                "MRG^1^1",
                "no prior patient identifier (MRG-1) to merge or change",
            )
        prior = merged[0]
    demographics = _demographics(message)
    if action == UPDATE and len(identifiers) > 1:
        others = [i.patient_id for i in identifiers[1:]]
        demographics["OtherPatientIDs"] = "\\".join(others)
    return PatientMessage(
        control_id=control_id,
        sender=sender,
        message_type=f"ADT^{event}",
        action=action,
        identifiers=identifiers,
        prior=prior,
        demographics=demographics,
    )


def _identifiers(
    message: hl7.Message, segment: str, position: int
) -> tuple[PatientIdentifier, ...]:
    """Every identifier (CX) of a repeating field, in order, once each."""
    try:
        found_segment = message.segment(segment)
        repetitions = (
            len(found_segment(position)) if len(found_segment) > position else 0
        )
    except (KeyError, IndexError):
        return ()
    location = f"{segment}^1^{position}"
    found = []
    for repetition in range(1, repetitions + 1):
        value = _value(message, segment, position, 1, repetition)
        patient_id = _identifier(value, location)
        if patient_id and patient_id != _NULL:
            issuer = _value(message, segment, position, 4, repetition)
            found.append(PatientIdentifier(patient_id, _identifier(issuer, location)))
    return tuple(dict.fromkeys(found))


def _demographics(message: hl7.Message) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    name = _name(message)
    if name != "":
        found["PatientName"] = name
    birth = _value(message, "PID", 7)
    if birth:
        found["PatientBirthDate"] = None if birth == _NULL else _birth_date(birth)
    sex = _value(message, "PID", 8).upper()
    if sex:
        if sex != _NULL and sex not in _SEX:
            raise MessageError(
                "AE", DATA_TYPE_ERROR, "PID^1^8", "PID-8 is not a sex of table 0001"
            )
        found["PatientSex"] = None if sex == _NULL else _SEX[sex]
    return found


def _name(message: hl7.Message) -> str | None:
    """PID-5 as a DICOM person name; '' when absent, None for HL7 null."""
    family = _value_or_empty(message, "PID.F5.R1.C1.S1")
    if family == _NULL:
        return None
    parts = [family] + [_value(message, "PID", 5, c) for c in (2, 3, 5, 4)]
    for part in parts:
        if "^" in part or "=" in part or "\\" in part:
            raise MessageError(
                "AE",
                DATA_TYPE_ERROR,
                "PID^1^5",
                "PID-5 holds a character a DICOM person name cannot",
            )
    return "^".join(parts).rstrip("^")


def _value_or_empty(message: hl7.Message, key: str) -> str:
    try:
        return str(message[key]).strip()
    except (KeyError, IndexError):
        return ""


def _birth_date(value: str) -> str:
    match = _DATE.match(value)
    if match is not None:
        year, month, day = (int(part) for part in match.groups())
        if 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]:
            return value[:8]
    raise MessageError(
        "AE", DATA_TYPE_ERROR, "PID^1^7", "PID-7 is not a date of birth (YYYYMMDD)"
    )
