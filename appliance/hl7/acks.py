"""HL7 acknowledgements (original mode): MSA-1 AA, AE or AR, MSA-2 echoing
the message's control ID, and an ERR segment saying what was wrong.

The ACK names as its sender the application and facility the message was
addressed to (MSH-5, MSH-6), so the RIS sees the answer come from whom it
wrote to. A message without a readable MSH still gets an AR, from a header
of our own, since its sender waits for an answer either way.
"""

from __future__ import annotations

import time

import hl7
from hl7.util import generate_message_control_id

from appliance.hl7.messages import ERROR_TEXT, MessageError

FALLBACK_SENDER = "PACS_APPLIANCE"


def accept(message: hl7.Message) -> bytes:
    """AA for ``message``."""
    return _encode(_ack(message, "AA"))


def _ack(message: hl7.Message, code: str) -> hl7.Message:
    """python-hl7's ACK, stamped (MSH-7) with the local time and its offset:
    python-hl7 writes the UTC time without one, which HL7 reads as the
    sender's local time (HL7 v2.5 2.A.22)."""
    ack = message.create_ack(code, generate_message_control_id())
    ack.segment("MSH").assign_field(_stamp(), 7)
    return ack


def _stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S%z")


def refuse(message: hl7.Message | None, error: MessageError) -> bytes:
    """AE or AR for ``message`` (None when it could not be parsed), with an
    ERR segment and the reason in MSA-3."""
    if message is None:
        return _encode_text(_bare_ack(error))
    try:
        ack = _ack(message, error.ack_code)
    except Exception:  # python-hl7 fails in several ways on a bare MSH
        # An MSH too short to answer from (no MSH-9 components, say): the
        # sender still gets its answer, echoing what it sent as MSH-10.
        return _encode_text(_bare_ack(error, _control_id(message)))
    reason = message.escape(error.reason)
    # The ACK keeps the message's separators (MSH-1, MSH-2), which need not
    # be | and ^. MSA is its last segment: the reason becomes its third field.
    field, component = message.separators[1], message.separators[3]
    err = _err_segment(error, reason, field, component)
    # Every segment ends with CR (HL7 v2.5 section 2.5.1), the last too.
    text = f"{str(ack).rstrip(chr(13))}{field}{reason}\r{err}\r"
    return _encode_text(text)


def _err_segment(
    error: MessageError, escaped_reason: str, field: str = "|", component: str = "^"
) -> str:
    parts = (str(error.error_code), ERROR_TEXT[error.error_code], "HL70357")
    code = component.join(parts)
    # Locations are written with ^ between segment, repetition and field.
    location = error.location.replace("^", component)
    return field.join(("ERR", "", location, code, "E", "", "", "", escaped_reason))


def _control_id(message: hl7.Message) -> str:
    try:
        return _escape_plain(str(message["MSH.F10"]))
    except Exception:  # no MSH-10 to echo
        return ""


def _bare_ack(error: MessageError, echoed: str = "") -> str:
    stamp = _stamp()
    control_id = generate_message_control_id()
    reason = _escape_plain(error.reason)
    segments = (
        f"MSH|^~\\&|{FALLBACK_SENDER}||||{stamp}||ACK|{control_id}|P|2.5",
        f"MSA|{error.ack_code}|{echoed}|{reason}",
        _err_segment(error, reason),
    )
    return "".join(f"{segment}\r" for segment in segments)


def _escape_plain(text: str) -> str:
    """Escape the default separators in free text (HL7 2.7 section 2.7)."""
    replaced = text.replace("\\", "\\E\\")
    for character, sequence in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\")):
        replaced = replaced.replace(character, sequence)
    return replaced.replace("~", "\\R\\").replace("\r", " ").replace("\n", " ")


def _encode(ack: hl7.Message) -> bytes:
    return _encode_text(str(ack))


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8")
