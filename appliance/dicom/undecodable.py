"""Why pynetdicom could not decode what a peer sent, in words fit for one
log line.

The text of pynetdicom's and pydicom's exceptions quotes the peer's bytes
(an AE title, a UID), control characters and line breaks included: shown
raw, they would forge lines of the log. And pynetdicom checks the lengths
of items with bare asserts, whose exceptions say nothing at all.
"""

from __future__ import annotations

from appliance.log_text import printable

# Where pynetdicom asserts that an item's length fits in the bytes that
# are left (its functions' qualified names), and what failing it means.
_ASSERTIONS = {
    "PDU._generate_items": "an item is longer than the rest of the PDU",
    "P_DATA_TF._generate_items": (
        "a presentation data value is longer than the rest of the PDU"
    ),
    "PDUItem._generate_items": "a sub-item is longer than the rest of its item",
    "SOPClassCommonExtendedNegotiationSubItem._generate_items": (
        "a related general SOP class UID is longer than the rest of its item"
    ),
}


def reason(exc: BaseException) -> str:
    """What ``exc``, raised while decoding a peer's PDU or message, says
    was wrong, its control characters shown as ``\\xNN``."""
    text = str(exc)
    if not text:
        # A bare assert or the like: where it failed is all there is.
        where = _failed_in(exc)
        return _ASSERTIONS.get(where, f"{type(exc).__name__}: a malformed item")

    return printable(f"{type(exc).__name__}: {text}")


def _failed_in(exc: BaseException) -> str:
    """The qualified name of the function that raised ``exc``, or ""."""
    trace = exc.__traceback__
    if trace is None:
        return ""

    while trace.tb_next is not None:
        trace = trace.tb_next
    return trace.tb_frame.f_code.co_qualname
