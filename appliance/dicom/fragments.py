"""DIMSE message fragments: their order as they arrive, and the shortest
PDU that can carry one (PS3.8 9.3.5, E.2).

A message is sent as the fragments of its command set, the last one marked
so, then, when the command announces a data set, the fragments of that data
set on the same presentation context (PS3.7 6.3.1). pynetdicom takes
fragments in whatever order they come: a command arriving while a C-STORE's
data set is being received starts a new file and forgets the first one,
left behind in ``incoming/``; a data set fragment before any command ends
in an exception. Each such P-DATA-TF is recognised here before pynetdicom
reads it, so that the association can be aborted and nothing kept.
"""

from __future__ import annotations

from pynetdicom.dimse_messages import DIMSEMessage

# Message Control Header bits (PS3.8 E.2).
_COMMAND = 0x01
_LAST = 0x02
# A presentation data value item: its length (4 bytes), presentation
# context ID and message control header (1 each), one byte of the message.
_SHORTEST_PDU = 7


def too_short(maximum: int | None) -> str:
    """Why a peer's Maximum Length Received leaves no room for a single byte
    of a message (0 means no limit), or ""."""
    if maximum is None or maximum == 0 or maximum >= _SHORTEST_PDU:
        return ""
    return f"it takes PDUs of at most {maximum} bytes, too short for any message"


def out_of_order(message: DIMSEMessage | None, pdvs: list[tuple[int, bytes]]) -> str:
    """Why the presentation data values ``pdvs`` of one P-DATA-TF cannot
    continue ``message``, the message being received (None between two
    messages); "" when they can.

    What follows the last fragment of a command or of a data set is not
    judged: whether a data set follows is for the command to say, once
    decoded, and pynetdicom ends the message at its data set's last fragment.
    """
    context = message.context_id if message is not None else None
    for context_id, data in pdvs:
        if not data:
            return "a presentation data value without its message control header"
        if data[0] & _COMMAND:
            if context is not None:
                return "a command arrived where a data set was due"
        elif context is None:
            return "a data set fragment arrived before its command"
        elif context_id != context:
            return (
                f"a data set fragment on presentation context {context_id}, "
                f"its command on {context}"
            )
        if data[0] & _LAST:
            return ""
    return ""
