"""Reading patient administration messages (ADT) from registration.

Accepted, with what the archive does:

| event | meaning | identifiers | attributes |
| --- | --- | --- | --- |
| A08, A31 | update patient information | PID-3 (every repetition) | PID-5, 7, 8 |
| A40 | merge patient: MRG-1 into PID-3 (each pair) | PID-3 first, MRG-1 | PID-5, 7, 8 |
| A47 | change patient identifier list | PID-3 first repetition, MRG-1 | PID-5, 7, 8 |

Other ADT events get AR. An identifier is CX component 1, its issuer the
namespace of component 4 (PID-3.4, MRG-1.4), matched with
IssuerOfPatientID. Attributes become DICOM values: PID-5 (XPN family^given^
middle^suffix^prefix) as PatientName family^given^middle^prefix^suffix,
PID-7 as PatientBirthDate, PID-8 as PatientSex (F, M; O, A, N as O; U as
unknown), and for A08/A31 the other PID-3 repetitions as OtherPatientIDs
(the catalog leaves out the patient's own ID).
An empty field leaves the attribute as it is; ``""`` (HL7's null) clears it.
Every value is held to the length of the DICOM attribute it becomes
(:mod:`appliance.hl7.bounds`); a longer one is refused, never cut.

An A40 (message structure ADT_A39) may carry several patients to merge,
each a PID followed by its MRG: every pair is read, in order, and a message
with one pair wrong (or a PID without its MRG) is refused whole, the ERR
naming the pair by its segment sequence (``MRG^2^1`` for the second MRG).
The other events read the first PID and MRG only.
"""

from __future__ import annotations

import calendar
import logging
import re
from dataclasses import dataclass, field

import hl7

from appliance.hl7 import bounds
from appliance.hl7.messages import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_EVENT_CODE,
    MessageError,
    PatientIdentifier,
    _bounded,
    _identifier,
    _require_segment,
    _value,
    printable,
)

logger = logging.getLogger(__name__)

UPDATE = "update"
MERGE = "merge"
CHANGE_ID = "change-id"
EVENTS = {"A08": UPDATE, "A31": UPDATE, "A40": MERGE, "A47": CHANGE_ID}

_NULL = '""'
# The most PID/MRG pairs an A40 may carry. Each pair is read by looking its
# segments up from the start of the message, so that the time grows with
# the square of the pairs: 3,000 took over four minutes of a core, a
# message of hl7.max_message_bytes would take hours. Registration sends
# one pair, now and then a few.
MAX_MERGE_PAIRS = 100
_READ = ("MSH", "EVN", "PID", "MRG")
_SEX = {"F": "F", "M": "M", "O": "O", "A": "O", "N": "O", "U": None}
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})")
# No control character, ESC included: PS3.5 6.1.3 lets ESC into PN and LO
# only as the bytes of an ISO 2022 code extension, and a message decoded
# from UTF-8, ASCII or ISO 8859 (MSH-18) has none. An ESC left in the text
# would be sent as such, a name no workstation can show.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class PatientChange:
    """One patient a message is about: for an A40, one PID/MRG pair."""

    number: int  # the segment sequence of its PID (and MRG), from 1
    identifiers: tuple[PatientIdentifier, ...]  # PID-3
    prior: PatientIdentifier | None = None  # MRG-1 (merge, change-id)
    # DICOM keyword -> new value, None to clear; absent: unchanged.
    demographics: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PatientMessage:
    """What one ADT message asks of the catalog."""

    control_id: str
    sender: str  # MSH-3 and MSH-4, to tell senders' control IDs apart
    message_type: str  # e.g. "ADT^A40"
    action: str  # update, merge or change-id
    changes: tuple[PatientChange, ...]  # one; an A40 one per PID/MRG pair


def is_adt(message: hl7.Message) -> bool:
    return _value(message, "MSH", 9, component=1).upper() == "ADT"


def read(message: hl7.Message, control_id: str, sender: str) -> PatientMessage:
    """The patient change an ADT message asks for, or MessageError."""
    event = printable(_value(message, "MSH", 9, component=2).upper())
    if event not in EVENTS:
        raise MessageError(
            "AR",
            UNSUPPORTED_EVENT_CODE,
            "MSH^1^9^1^2",
            f"ADT^{event or '(empty)'} is not handled (A08, A31, A40, A47 are)",
        )
    action = EVENTS[event]
    message = _patient_segments(message)
    _require_segment(message, "PID")
    pairs = _merge_pairs(message) if event == "A40" else 1
    changes = tuple(_change_of_pair(message, action, n) for n in range(1, pairs + 1))
    return PatientMessage(
        control_id=control_id,
        sender=sender,
        message_type=f"ADT^{event}",
        action=action,
        changes=changes,
    )


def _patient_segments(message: hl7.Message) -> hl7.Message:
    """The message with only the segments read here. python-hl7 looks a
    field up by scanning every segment of the message, and each repetition
    of PID-3 is looked up: 2,000 repetitions and 2,000 other segments took
    6 s, a message of hl7.max_message_bytes would take an hour."""
    kept = [segment for segment in message if str(segment[0]) in _READ]
    return message.create_message(kept)


def _change_of_pair(message: hl7.Message, action: str, number: int) -> PatientChange:
    """The ``number``-th change; what is wrong with a pair after the first
    is said to be in that pair, as the catalog's refusals are."""
    try:
        return _change(message, action, number)
    except MessageError as exc:
        if number == 1 or exc.reason.startswith("pair "):
            raise
        refused = MessageError(
            exc.ack_code, exc.error_code, exc.location, f"pair {number}: {exc.reason}"
        )
        refused.header = exc.header
        raise refused from exc


def _merge_pairs(message: hl7.Message) -> int:
    """How many PID/MRG pairs an A40 carries, or MessageError when a PID
    has no MRG after it (before the next PID) or an MRG no PID before it."""
    pids = merges = 0
    for segment in message:
        name = str(segment[0])
        if name == "PID":
            if pids > merges:
                break
            pids += 1
        elif name == "MRG":
            if merges == pids:
                raise MessageError(
                    "AE",
                    SEGMENT_SEQUENCE_ERROR,
                    f"MRG^{merges + 1}",
                    f"MRG {merges + 1} has no PID before it",
                )
            merges += 1
    if pids > merges:
        raise MessageError(
            "AE",
            SEGMENT_SEQUENCE_ERROR,
            f"PID^{merges + 1}",
            f"PID {merges + 1} has no MRG after it (an A40 carries PID/MRG pairs)",
        )
    if pids > MAX_MERGE_PAIRS:
        raise MessageError(
            "AE",
            SEGMENT_SEQUENCE_ERROR,
            f"PID^{MAX_MERGE_PAIRS + 1}",
            f"{pids} PID/MRG pairs; an A40 may carry {MAX_MERGE_PAIRS}: send "
            "the others in further messages",
        )
    return pids


def _change(message: hl7.Message, action: str, number: int) -> PatientChange:
    """The change the ``number``-th PID (and MRG) asks for."""
    identifiers = _identifiers(message, "PID", 3, number)
    if not identifiers:
        raise MessageError(
            "AE",
            REQUIRED_FIELD_MISSING,
            f"PID^{number}^3",
            "no patient identifier (PID-3)",
        )
    prior = None
    if action != UPDATE:
        _require_segment(message, "MRG")
        merged = _identifiers(message, "MRG", 1, number)
        if not merged:
            raise MessageError(
                "AE",
                REQUIRED_FIELD_MISSING,
                f"MRG^{number}^1",
                "no prior patient identifier (MRG-1) to merge or change",
            )
        prior = merged[0]
    demographics = _demographics(message, number)
    if action == UPDATE and len(identifiers) > 1:
        others = [i.patient_id for i in identifiers[1:]]
        demographics["OtherPatientIDs"] = "\\".join(others)
    return PatientChange(number, identifiers, prior, demographics)


def _identifiers(
    message: hl7.Message, segment: str, position: int, number: int = 1
) -> tuple[PatientIdentifier, ...]:
    """Every identifier (CX) of a repeating field of the ``number``-th such
    segment, in order, once each."""
    try:
        found_segment = message.segments(segment)[number - 1]
        repetitions = (
            len(found_segment(position)) if len(found_segment) > position else 0
        )
    except (KeyError, IndexError):
        return ()
    location = f"{segment}^{number}^{position}"
    found = []
    for repetition in range(1, repetitions + 1):
        value = _value(message, segment, position, 1, repetition, number)
        patient_id = _kept(value, location)
        if patient_id and patient_id != _NULL:
            issuer = _value(message, segment, position, 4, repetition, number)
            found.append(PatientIdentifier(patient_id, _kept(issuer, location)))
    return tuple(dict.fromkeys(found))


def _kept(value: str, location: str) -> str:
    """An identifier or issuer (LO), checked. A backslash (HL7 ``\\E\\``) is
    refused: it separates the values of a DICOM attribute (PS3.5 6.4), so
    that an ID holding one would be sent as two."""
    if "\\" in value:
        raise MessageError(
            "AE",
            DATA_TYPE_ERROR,
            location,
            f"a backslash in {bounds.field_name(location)}: a DICOM "
            "identifier cannot hold one",
        )
    return _bounded(_identifier(value, location), bounds.LONG_STRING, location)


def _demographics(message: hl7.Message, number: int) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    name = _name(message, number)
    if name != "":
        found["PatientName"] = name
    birth = _value(message, "PID", 7, occurrence=number)
    if birth:
        found["PatientBirthDate"] = (
            None if birth == _NULL else _birth_date(birth, number)
        )
    sex = _value(message, "PID", 8, occurrence=number).upper()
    if sex:
        if sex != _NULL and sex not in _SEX:
            raise MessageError(
                "AE",
                DATA_TYPE_ERROR,
                f"PID^{number}^8",
                "PID-8 is not a sex of table 0001",
            )
        found["PatientSex"] = None if sex == _NULL else _SEX[sex]
    return found


def _name(message: hl7.Message, number: int) -> str | None:
    """PID-5 as a DICOM person name; '' when absent, None for HL7 null."""
    family = _value_or_empty(message, f"PID{number}.F5.R1.C1.S1")
    if family == _NULL:
        return None
    location = f"PID^{number}^5"
    parts = [family] + [
        _value(message, "PID", 5, c, occurrence=number) for c in (2, 3, 5, 4)
    ]
    for part in parts:
        if "^" in part or "=" in part or "\\" in part or _CONTROL.search(part):
            raise MessageError(
                "AE",
                DATA_TYPE_ERROR,
                location,
                "PID-5 holds a character a DICOM person name cannot",
            )
    return _bounded("^".join(parts).rstrip("^"), bounds.PERSON_NAME, location)


def _value_or_empty(message: hl7.Message, key: str) -> str:
    try:
        return str(message[key]).strip()
    except (KeyError, IndexError):
        return ""


def _birth_date(value: str, number: int) -> str:
    match = _DATE.match(value)
    if match is not None:
        year, month, day = (int(part) for part in match.groups())
        if 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]:
            return value[:8]
    raise MessageError(
        "AE",
        DATA_TYPE_ERROR,
        f"PID^{number}^7",
        "PID-7 is not a date of birth (YYYYMMDD)",
    )
