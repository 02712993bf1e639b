"""Reading scheduling messages from the RIS into appointments.

Accepted: SIU^S12 (booked), S13 (rescheduled), S14 (modified), S15
(cancelled), S17 (deleted), S26 (no-show); ORM^O01 and OMI^O23 orders with
order control NW (new), XO (changed), CA and DC (cancelled, discontinued);
SC (status changed) is acknowledged and ignored. Anything else is rejected.

Where a value can come from several fields, the first one present wins:

| value | SIU | ORM / OMI |
| --- | --- | --- |
| appointment time | TQ1-7, SCH-11.4, AIS-4 | TQ1-7, ORC-7.4, OBR-27.4 |
| patient | every repetition of PID-3: ID (.1) and assigning authority (.4) | the same |
| procedure | AIS-3 | OBR-44, OBR-4 |
| modality | (site table) | IPC-5, OBR-24, (site table) |
| accession | (none) | IPC-1, OBR-18 |
| requested procedure ID | (none) | IPC-2, OBR-19 |
| appointment key | SCH-1, SCH-2 (placer, filler ID) | ORC-2, ORC-3 (order numbers) |

Every value kept is held to the length of the DICOM attribute it becomes
(:mod:`appliance.hl7.bounds`). Problems are raised as :class:`MessageError`
with the HL7 error code (table 0357), the location and an AR (not accepted
at all) or AE (accepted as HL7 but not processable) acknowledgement code.
"""

from __future__ import annotations

import calendar
import logging
import re
import time
from dataclasses import dataclass

import hl7

from appliance.hl7 import bounds
from appliance.log_text import printable

logger = logging.getLogger(__name__)

# HL7 table 0357, the codes used here.
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
SEGMENT_SEQUENCE_ERROR = "100"
UNKNOWN_KEY_IDENTIFIER = "204"
DUPLICATE_KEY_IDENTIFIER = "205"
APPLICATION_INTERNAL_ERROR = "207"

ERROR_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}

BOOK = "book"
CANCEL = "cancel"
IGNORE = "ignore"

# Trigger event -> (action, the appointment's state afterwards).
SIU_EVENTS = {
    "S12": (BOOK, "booked"),
    "S13": (BOOK, "rescheduled"),
    "S14": (BOOK, "modified"),
    "S15": (CANCEL, "cancelled"),
    "S17": (CANCEL, "deleted"),
    "S26": (CANCEL, "no-show"),
}
ORDER_CONTROLS = {
    "NW": (BOOK, "booked"),
    "XO": (BOOK, "modified"),
    "CA": (CANCEL, "cancelled"),
    "DC": (CANCEL, "discontinued"),
    "SC": (IGNORE, ""),
}
ORDER_MESSAGES = {("ORM", "O01"), ("OMI", "O23")}

# HL7 table 0211: the character sets a message may name in MSH-18.
CHARSETS = {
    "": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/15": "iso8859-15",
}
# What python-hl7 undoes: F S T R E (separators), H N (highlight), Xhh
# (hex, whole bytes) and its formatting commands with a count of at most
# two digits. It drops C and M (character sets) and other commands from
# the value, logging the whole field, and repeats a formatting command's
# text as often as the count says: a few bytes would become gigabytes.
_KNOWN_ESCAPE = re.compile(
    r"^([FSTREHN]|X(?:[0-9A-Fa-f]{2})+"
    r"|\.(?:br|sp|fi|nf|in|ti|sk|ce)(?:[-+]?[0-9]{1,2})?)$"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The segments :func:`read` takes values from (see the table above).
_READ = ("MSH", "SCH", "TQ1", "AIS", "PID", "ORC", "OBR", "IPC")
# At least the day: an appointment needs one.
_DTM = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-]\d{4})?$"
)


class MessageError(Exception):
    """A message the appliance cannot take, and how to say so."""

    def __init__(
        self, ack_code: str, error_code: str, location: str, reason: str
    ) -> None:
        super().__init__(reason)
        self.ack_code = ack_code  # AR or AE
        self.error_code = error_code  # HL7 table 0357
        self.location = location  # e.g. "PID^1^3", "" when none
        self.reason = reason
        # The message's MSH alone, when the whole could not be parsed: the
        # ACK still echoes its control ID.
        self.header: hl7.Message | None = None


@dataclass(frozen=True)
class PatientIdentifier:
    patient_id: str
    issuer: str


@dataclass(frozen=True)
class ScheduleMessage:
    """What one message says about one appointment."""

    control_id: str
    sender: str  # MSH-3 and MSH-4, to tell senders' control IDs apart
    message_type: str  # e.g. "SIU^S12"
    action: str  # book, cancel or ignore
    state: str  # booked, rescheduled, cancelled, ...
    appointment_id: str  # "appointment:..." or "order:..."
    patients: tuple[PatientIdentifier, ...] = ()
    start: float | None = None  # seconds since the epoch
    procedure_code: str = ""
    procedure_text: str = ""
    modality: str = ""
    accession: str = ""
    requested_procedure_id: str = ""


def normalise(raw: bytes) -> str:
    """The message as text with CR between segments: senders use LF or CR
    LF too, and some end with an empty segment. Decoded as MSH-18 says
    (UTF-8 when it says nothing); bytes that are not of that character set
    are refused rather than guessed, since a wrong patient ID never matches
    anything."""
    if not raw.startswith(b"MSH") or len(raw) < 8:
        raise MessageError("AR", SEGMENT_SEQUENCE_ERROR, "MSH", "no MSH segment first")
    charset = _charset(raw)
    try:
        text = raw.decode(charset)
    except UnicodeDecodeError as exc:
        raise MessageError(
            "AE",
            DATA_TYPE_ERROR,
            "MSH^1^18",
            f"bytes that are not {charset} at offset {exc.start}; MSH-18 names "
            "the character set of a message in another one",
        ) from exc
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(line for line in text.split("\r") if line.strip())


def _charset(raw: bytes) -> str:
    """The Python codec for MSH-18 (HL7 table 0211), or MessageError."""
    first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0]
    fields = first.split(raw[3:4])
    declared = (
        fields[17].split(b"~")[0].strip().decode("ascii", "replace")
        if len(fields) > 17
        else ""
    )
    if declared not in CHARSETS:
        raise MessageError(
            "AR",
            DATA_TYPE_ERROR,
            "MSH^1^18",
            f"character set {declared!r} is not handled "
            f"({', '.join(name or '(empty)' for name in CHARSETS)} are)",
        )
    return CHARSETS[declared]


def parse(raw: bytes) -> hl7.Message:
    """The message parsed by python-hl7, or MessageError (AR or AE)."""
    try:
        text = normalise(raw)
    except MessageError as error:
        # A message in the wrong character set still has an MSH to answer
        # from: its sender matches the refusal by the control ID.
        first = raw.replace(b"\n", b"\r").split(b"\r", 1)[0]
        error.header = header_alone(first.decode("utf-8", "replace"))
        raise
    try:
        _check_one_message(text)
        _check_escapes(text)
    except MessageError as error:
        error.header = header_alone(text)
        raise
    try:
        return hl7.parse(text)
    except Exception as exc:  # python-hl7 raises plain errors on bad input
        raise MessageError(
            "AR", SEGMENT_SEQUENCE_ERROR, "", f"not an HL7 v2 message: {exc}"
        ) from exc


def header_alone(text: str) -> hl7.Message | None:
    """The first segment of ``text`` parsed alone if it is an MSH that
    parses, else None: what an answer to a message refused whole can be
    addressed from."""
    header = text.split("\r", 1)[0]
    if not header.startswith("MSH"):
        return None
    try:
        _check_escapes(header)
        return hl7.parse(header)
    except Exception:  # a header as damaged as the rest: answered bare
        return None


def _check_one_message(text: str) -> None:
    """Refuse two messages in one frame: only the first would be read, and
    its ACK would answer for both."""
    later = text.find("\rMSH" + text[3:4])
    if later != -1:
        number = text.count("\r", 0, later) + 2
        raise MessageError(
            "AR",
            SEGMENT_SEQUENCE_ERROR,
            "MSH^2",
            f"a second MSH segment (segment {number}): one message per frame",
        )


def _check_escapes(text: str) -> None:
    """Refuse escape sequences python-hl7 cannot undo: it would log an error
    and cut the value short, and a cut ID matches the wrong record. An
    escape character that opens a sequence and no second one closing it
    within the value is refused too: python-hl7 drops the rest."""
    field = text[3:4]
    body = text.find(field, 4)  # where MSH-2 ends
    if not field or body == -1:
        return
    # The encoding characters as python-hl7 reads them: MSH-2 up to the
    # field separator, and the default for each one it leaves out.
    given = text[4:body]
    component, repetition, escape, subcomponent = (
        given[n : n + 1] or default for n, default in enumerate("^~\\&")
    )
    stops = {"\r", field, component, repetition, subcomponent} - {escape}
    separators = re.escape("".join(sorted(stops)))
    # Only the values with an escape character in them, from their start.
    value = f"(?:^|(?<=[{separators}]))[^{separators}]*{re.escape(escape)}"
    value += f"[^{separators}]*"
    for found in re.finditer(value, text[body:]):
        pieces = found.group().split(escape)
        # Pieces alternate text, sequence, text: an even count leaves one open.
        if len(pieces) % 2 == 0:
            problem = "an escape sequence without its end"
        elif all(_KNOWN_ESCAPE.match(sequence) for sequence in pieces[1::2]):
            continue
        else:
            problem = "unknown escape sequence"
        # Named by its field, never quoted: the value may be a name.
        where = _field_at(text, body + found.start())
        raise MessageError(
            "AE", DATA_TYPE_ERROR, where, f"{problem} in {bounds.field_name(where)}"
        )


def _field_at(text: str, offset: int) -> str:
    """The ERR-2 location (segment^repetition^field) of ``offset``."""
    start = text.rfind("\r", 0, offset) + 1
    segment = text[start : start + 3]
    repetition = sum(1 for line in text[:start].split("\r") if line[:3] == segment) + 1
    field = text.count(text[3:4], start, offset)
    # MSH-1 is the field separator itself: MSH's fields count from there.
    return f"{segment}^{repetition}^{field + 1 if segment == 'MSH' else field}"


def read(message: hl7.Message) -> ScheduleMessage:
    """The appointment a parsed message is about, or MessageError."""
    message = _schedule_segments(message)
    kind, event = _message_type(message)
    control_id, sender = header(message)
    header_fields = {
        "control_id": control_id,
        "sender": sender,
        "message_type": f"{kind}^{event}",
    }
    if kind == "SIU":
        return _read_schedule(message, event, header_fields)
    if (kind, event) in ORDER_MESSAGES:
        return _read_order(message, header_fields)
    if kind in ("SIU", "ORM", "OMI"):
        raise MessageError(
            "AR",
            UNSUPPORTED_EVENT_CODE,
            "MSH^1^9^1^2",
            f"{kind}^{event} is not handled",
        )
    raise MessageError(
        "AR",
        UNSUPPORTED_MESSAGE_TYPE,
        "MSH^1^9^1^1",
        f"message type {kind}^{event} is not handled (SIU, ORM^O01, OMI^O23, ADT are)",
    )


def _schedule_segments(message: hl7.Message) -> hl7.Message:
    """The message with only the segments read here: the first of each
    kind, the only one read. python-hl7 looks a field up by scanning every
    segment, and each repetition of PID-3 is looked up: 4,000 repetitions
    among 40,000 other segments (1 MB, hl7.max_message_bytes) took over
    three minutes of a core. Other segments of a kind read (a second AIS, OBR) count
    too, so they go as well."""
    first: dict[str, hl7.Segment] = {}
    for segment in message:
        name = str(segment[0])
        if name in _READ and name not in first:
            first[name] = segment
    return message.create_message(list(first.values()))


def header(message: hl7.Message) -> tuple[str, str]:
    """The message control ID (MSH-10) and the sender (MSH-3 ^ MSH-4), or
    MessageError (AR) when there is no control ID or version ID (MSH-12)."""
    control_id = _identifier(_field(message, "MSH", 10), "MSH^1^10")
    _bounded(control_id, bounds.CONTROL_ID, "MSH^1^10")
    msh = message.segment("MSH")
    sender = []
    for position in (3, 4):
        # Echoed in the ACK, which is kept to answer a resend; the sender
        # (escapes undone) is logged with a resend.
        location = f"MSH^1^{position}"
        whole = str(msh(position)) if len(msh) > position else ""
        _bounded(whole, bounds.APPLICATION, location)
        sender.append(_identifier(_field(message, "MSH", position), location))
    if not control_id:
        raise MessageError(
            "AR", REQUIRED_FIELD_MISSING, "MSH^1^10", "no message control ID (MSH-10)"
        )
    # HL7 v2.5 section 2.9.2.1: a receiver that cannot tell the version
    # rejects the message (AR); the ACK would have none to echo either.
    if not _field(message, "MSH", 12):
        raise MessageError(
            "AR", REQUIRED_FIELD_MISSING, "MSH^1^12", "no version ID (MSH-12)"
        )
    return control_id, "^".join(sender)


def _message_type(message: hl7.Message) -> tuple[str, str]:
    # Quoted in refusals and the log: an escaped line break must not start
    # a line of its own there.
    kind = printable(_value(message, "MSH", 9, component=1))
    event = printable(_value(message, "MSH", 9, component=2))
    if not kind:
        raise MessageError(
            "AR", REQUIRED_FIELD_MISSING, "MSH^1^9", "no message type (MSH-9)"
        )
    return kind.upper(), event.upper()


def _read_schedule(
    message: hl7.Message, event: str, header: dict[str, str]
) -> ScheduleMessage:
    if event not in SIU_EVENTS:
        raise MessageError(
            "AR",
            UNSUPPORTED_EVENT_CODE,
            "MSH^1^9^1^2",
            f"SIU^{event} is not handled (S12-S15, S17, S26 are)",
        )
    action, state = SIU_EVENTS[event]
    _require_segment(message, "SCH")
    key = _key(message, ("SCH", 1), ("SCH", 2))
    if not key:
        raise MessageError(
            "AE",
            REQUIRED_FIELD_MISSING,
            "SCH^1^1",
            "no appointment ID (SCH-1 placer or SCH-2 filler)",
        )
    start = _first_time(
        message,
        (("TQ1", 7, 1), ("SCH", 11, 4), ("AIS", 4, 1)),
    )
    return _finish(
        message,
        header,
        action=action,
        state=state,
        appointment_id=f"appointment:{key}",
        start=start,
        procedure=("AIS", 3),
        modality_fields=(),
        accession_fields=(),
        requested_fields=(),
    )


def _read_order(message: hl7.Message, header: dict[str, str]) -> ScheduleMessage:
    _require_segment(message, "ORC")
    control = printable(_value(message, "ORC", 1).upper())
    if control not in ORDER_CONTROLS:
        raise MessageError(
            "AR",
            UNSUPPORTED_EVENT_CODE,
            "ORC^1^1",
            f"order control {control or '(empty)'} is not handled "
            "(NW, XO, CA, DC, SC are)",
        )
    action, state = ORDER_CONTROLS[control]
    key = _key(message, ("ORC", 2), ("ORC", 3))
    if not key:
        raise MessageError(
            "AE",
            REQUIRED_FIELD_MISSING,
            "ORC^1^2",
            "no order number (ORC-2 placer or ORC-3 filler)",
        )
    start = _first_time(message, (("TQ1", 7, 1), ("ORC", 7, 4), ("OBR", 27, 4)))
    procedure = ("OBR", 44) if _value(message, "OBR", 44) else ("OBR", 4)
    return _finish(
        message,
        header,
        action=action,
        state=state,
        appointment_id=f"order:{key}",
        start=start,
        procedure=procedure,
        modality_fields=(("IPC", 5), ("OBR", 24)),
        accession_fields=(("IPC", 1), ("OBR", 18)),
        requested_fields=(("IPC", 2), ("OBR", 19)),
    )


def _finish(
    message: hl7.Message,
    header: dict[str, str],
    *,
    action: str,
    state: str,
    appointment_id: str,
    start: float | None,
    procedure: tuple[str, int],
    modality_fields: tuple[tuple[str, int], ...],
    accession_fields: tuple[tuple[str, int], ...],
    requested_fields: tuple[tuple[str, int], ...],
) -> ScheduleMessage:
    patients = _patients(message) if action != IGNORE else ()
    if action == BOOK and start is None:
        raise MessageError(
            "AE",
            REQUIRED_FIELD_MISSING,
            "TQ1^1^7",
            "no appointment time (TQ1-7, SCH-11.4, AIS-4, ORC-7.4 or OBR-27.4)",
        )
    segment, position = procedure
    where = f"{segment}^1^{position}"
    code = _value(message, segment, position, component=1)
    text = _value(message, segment, position, component=2)
    return ScheduleMessage(
        action=action,
        state=state,
        appointment_id=appointment_id,
        patients=patients,
        start=start,
        procedure_code=_bounded(code, bounds.LONG_STRING, where),
        procedure_text=_bounded(text, bounds.LONG_STRING, where),
        modality=_kept(message, modality_fields, bounds.CODE_STRING).upper(),
        accession=_kept(message, accession_fields, bounds.SHORT_STRING),
        requested_procedure_id=_kept(message, requested_fields, bounds.SHORT_STRING),
        **header,
    )


def _key(message: hl7.Message, *places: tuple[str, int]) -> str:
    """The appointment's key: the first of ``places`` (placer, filler) with
    a value."""
    return _kept(message, places, bounds.LONG_STRING)


def _kept(message: hl7.Message, places: tuple[tuple[str, int], ...], limit: int) -> str:
    """The first of ``places`` with a value, checked as an identifier and
    for its length; "" when none has one."""
    for segment, position in places:
        value = _value(message, segment, position)
        if value:
            location = f"{segment}^1^{position}"
            return _bounded(_identifier(value, location), limit, location)
    return ""


def _patients(message: hl7.Message) -> tuple[PatientIdentifier, ...]:
    _require_segment(message, "PID")
    pid = message.segment("PID")
    repetitions = len(pid(3)) if len(pid) > 3 else 0
    found = []
    for repetition in range(1, repetitions + 1):
        patient_id = _identifier(_value(message, "PID", 3, 1, repetition), "PID^1^3")
        if patient_id:
            issuer = _identifier(_value(message, "PID", 3, 4, repetition), "PID^1^3")
            for value in (patient_id, issuer):
                _bounded(value, bounds.LONG_STRING, "PID^1^3")
            found.append(PatientIdentifier(patient_id, issuer))
    if not found:
        raise MessageError(
            "AE",
            REQUIRED_FIELD_MISSING,
            "PID^1^3",
            "no patient identifier (PID-3)",
        )
    return tuple(dict.fromkeys(found))


def _first_time(
    message: hl7.Message, places: tuple[tuple[str, int, int], ...]
) -> float | None:
    for segment, position, component in places:
        value = _value(message, segment, position, component=component)
        if value:
            return parse_time(value, f"{segment}^1^{position}")
    return None


def parse_time(value: str, location: str) -> float:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as epoch seconds;
    without a zone it is the appliance's local time."""
    match = _DTM.match(value.strip())
    if match is None:
        raise MessageError(
            "AE", DATA_TYPE_ERROR, location, f"{value!r} is not an HL7 date and time"
        )
    year, month, day, hour, minute, second, zone = match.groups()
    parts = (
        int(year),
        int(month or 1),
        int(day or 1),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
    )
    try:
        _check_ranges(parts)
    except ValueError as exc:
        raise MessageError(
            "AE", DATA_TYPE_ERROR, location, f"{value!r} is not a valid time: {exc}"
        ) from exc
    if zone is None:
        return time.mktime((*parts, 0, 0, -1))
    sign = 1 if zone[0] == "+" else -1
    hours, minutes = int(zone[1:3]), int(zone[3:5])
    if hours > 14 or minutes > 59:
        raise MessageError(
            "AE", DATA_TYPE_ERROR, location, f"{value!r}: no such time zone offset"
        )
    offset = sign * (hours * 3600 + minutes * 60)
    return calendar.timegm((*parts, 0, 0, 0)) - offset


def _check_ranges(parts: tuple[int, ...]) -> None:
    year, month, day, hour, minute, second = parts
    if not 1900 <= year <= 2999:
        raise ValueError("year out of range")
    if not 1 <= month <= 12:
        raise ValueError("month out of range")
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise ValueError("day out of range")
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("time of day out of range")


def _require_segment(message: hl7.Message, name: str) -> None:
    try:
        message.segment(name)
    except KeyError as exc:
        raise MessageError(
            "AE", SEGMENT_SEQUENCE_ERROR, name, f"no {name} segment"
        ) from exc


def _field(message: hl7.Message, segment: str, position: int) -> str:
    return _value(message, segment, position)


def _value(
    message: hl7.Message,
    segment: str,
    position: int,
    component: int = 1,
    repetition: int = 1,
    occurrence: int = 1,
) -> str:
    """One component of a field of the ``occurrence``-th such segment
    (the first by default); "" when any part of it is absent. python-hl7's
    accessor numbers MSH's fields as the standard does, and undoes escape
    sequences (so no second pass here)."""
    number = str(occurrence) if occurrence > 1 else ""
    key = f"{segment}{number}.F{position}.R{repetition}.C{component}"
    try:
        raw = message[key]
    except (KeyError, IndexError):
        return ""
    return str(raw).strip()


def _bounded(value: str, limit: int, location: str) -> str:
    """``value``, or MessageError (AE) when it is longer than ``limit``
    characters (see :mod:`appliance.hl7.bounds`)."""
    reason = bounds.too_long(value, limit, location)
    if reason:
        raise MessageError("AE", DATA_TYPE_ERROR, location, reason)
    return value


def _identifier(value: str, location: str) -> str:
    """An ID, refused when it holds a control character (an escaped NUL,
    say): such an ID would never match, or match the wrong record."""
    if _CONTROL.search(value):
        raise MessageError(
            "AE",
            DATA_TYPE_ERROR,
            location,
            f"a control character in {bounds.field_name(location)}",
        )
    return value
