"""C-FIND and C-STORE responses encoded straight to bytes, ready for the
network.

A query can have thousands of matches, and each response is a short run of
text elements. Building a pydicom Dataset for its identifier and another
for its command set, and passing both through pydicom's writer, costs more
than finding the matches; so this module writes the responses itself. The
same holds for the C-STORE-RSP that answers every received instance.

The command set of a C-FIND-RSP (PS3.7 9.3.2.2) is always Implicit VR
Little Endian (PS3.7 6.3.1). Identifiers are written here in the common
case, in Little Endian (PS3.5 7.1):

    implicit VR:  tag group (2) | tag element (2) | length (4) | value
    explicit VR:  tag group (2) | tag element (2) | VR (2) | length (2) | value
                  tag group (2) | tag element (2) | VR (2) | 00 00 | length (4)
                  | value, for the VRs in _LONG_LENGTH_VRS (PS3.5 7.1.2)

Values are padded to an even length with a space, UIDs with a NUL
(PS3.5 6.2). A requested sequence is answered empty. Anything else (binary
VRs with a value, a character set other than ASCII, Latin-1 and UTF-8, Big
Endian or deflated syntaxes) goes through pydicom, so that the two paths
give the same bytes wherever both apply.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

logger = logging.getLogger(__name__)

# Text VRs whose values use SpecificCharacterSet (PS3.5 6.1.2.3), and those
# limited to the default repertoire; only these are written here.
_CHARSET_VRS = frozenset(["LO", "LT", "PN", "SH", "ST", "UC", "UT"])
_PLAIN_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"]
)
_TEXT_VRS = _CHARSET_VRS | _PLAIN_TEXT_VRS
_LONG_LENGTH_VRS = frozenset(
    ["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]
)
# Character sets whose values encode with one Python codec and no escape
# sequences.
_CODECS = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin_1"}
_INTEGER_VRS = frozenset(["US", "UL", "SS", "SL", "UV", "SV"])
_FLOAT_VRS = frozenset(["FL", "FD"])


_C_FIND_RSP = 0x8020
_C_STORE_RSP = 0x8001
_DATA_SET_PRESENT = 0x0001  # any value but 0x0101 (PS3.7 E.1)
_NO_DATA_SET = 0x0101
# PDV message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
_COMMAND_LAST = 0x03
_DATA_SET_LAST = 0x02
# A PDV item adds a length (4), the context ID (1) and its header (1).
_PDV_OVERHEAD = 6


@dataclass(frozen=True)
class Element:
    """One element of a response: its tag, VR and value as text.

    ``value`` is None or empty for an empty element; a sequence is always
    answered empty.
    """

    tag: int
    vr: str
    value: str | None


def encode_identifier(
    elements: list[Element], charset: str | None, syntax: UID
) -> bytes:
    """The identifier's bytes in ``syntax``; ``charset`` is the value of its
    SpecificCharacterSet, which must be among ``elements`` when not None."""
    if syntax.is_little_endian and not syntax.is_deflated:
        encoded = _encode_directly(elements, charset, syntax.is_implicit_VR)
        if encoded is not None:
            return encoded
    return _encode_with_pydicom(elements, syntax)


def _encode_directly(
    elements: list[Element], charset: str | None, implicit: bool
) -> bytes | None:
    """The bytes, or None when an element needs pydicom's writer."""
    parts: list[bytes] = []
    for element in sorted(elements, key=lambda e: e.tag):
        value = _value_bytes(element, charset)
        if value is None:
            return None
        parts.append(_header(element, len(value), implicit))
        parts.append(value)
    return b"".join(parts)


def _value_bytes(element: Element, charset: str | None) -> bytes | None:
    if len(element.vr) != 2:  # an ambiguous VR such as "US or SS"
        return None
    text = element.value
    if not text or element.vr == "SQ":
        return b""
    if element.vr not in _TEXT_VRS:
        return None

    if text.isascii():
        encoded = text.encode("ascii")
    elif element.vr in _CHARSET_VRS and charset in _CODECS:
        encoded = text.encode(_CODECS[charset])
    else:
        return None
    if len(encoded) % 2:
        encoded += b"\x00" if element.vr == "UI" else b" "
    return encoded


def _header(element: Element, length: int, implicit: bool) -> bytes:
    group, number = element.tag >> 16, element.tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, number, length)
    vr = element.vr.encode("ascii")
    if element.vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2s2xI", group, number, vr, length)
    return struct.pack("<HH2sH", group, number, vr, length)


def _encode_with_pydicom(elements: list[Element], syntax: UID) -> bytes:
    dataset = Dataset()
    for element in elements:
        if element.vr == "SQ":
            dataset.add_new(element.tag, "SQ", [])
        else:
            dataset.add_new(element.tag, element.vr, _typed(element))
    encoded = encode(
        dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
    )
    if encoded is None:
        raise ValueError("pydicom could not encode the response identifier")
    return encoded


def _typed(element: Element) -> object:
    """A text value converted to what pydicom expects for the element's VR."""
    if not element.value:
        return None
    parts = element.value.split("\\")
    try:
        if element.vr in _INTEGER_VRS:
            numbers: list[object] = [int(p) for p in parts]
        elif element.vr in _FLOAT_VRS:
            numbers = [float(p) for p in parts]
        else:
            return element.value
    except ValueError:
        return None
    return numbers[0] if len(numbers) == 1 else numbers


def command_set(
    sop_class_uid: str,
    message_id: int,
    status: int,
    has_identifier: bool,
    comment: str = "",
) -> bytes:
    """The C-FIND-RSP command set (PS3.7 9.3.2.2), Implicit VR Little Endian.

    ``comment`` becomes the Error Comment (0000,0902): one LO value in the
    ASCII command set, so other characters become "?", backslashes "/",
    and it is cut to 64.
    """
    uid = sop_class_uid.encode("ascii")
    body = _implicit(0x00000002, uid + b"\x00" * (len(uid) % 2))
    body += _implicit(0x00000100, struct.pack("<H", _C_FIND_RSP))
    body += _implicit(0x00000120, struct.pack("<H", message_id))
    data_set_type = _DATA_SET_PRESENT if has_identifier else _NO_DATA_SET
    body += _implicit(0x00000800, struct.pack("<H", data_set_type))
    body += _implicit(0x00000900, struct.pack("<H", status))
    if comment:
        text = comment.encode("ascii", "replace").replace(b"\\", b"/")[:64]
        body += _implicit(0x00000902, text + b" " * (len(text) % 2))

    group_length = _implicit(0x00000000, struct.pack("<I", len(body)))
    return group_length + body


def store_command_set(
    sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str
) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2) without optional
    elements, Implicit VR Little Endian."""
    body = _implicit(0x00000002, _uid_value(sop_class_uid))
    body += _implicit(0x00000100, struct.pack("<H", _C_STORE_RSP))
    body += _implicit(0x00000120, struct.pack("<H", message_id))
    body += _implicit(0x00000800, struct.pack("<H", _NO_DATA_SET))
    body += _implicit(0x00000900, struct.pack("<H", status))
    body += _implicit(0x00001000, _uid_value(sop_instance_uid))

    group_length = _implicit(0x00000000, struct.pack("<I", len(body)))
    return group_length + body


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" * (len(value) % 2)


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def p_data(
    context_id: int, command: bytes, identifier: bytes | None, max_pdu: int
) -> Iterator[P_DATA]:
    """The P-DATA requests that carry one message (PS3.8 9.3.5, E.2).

    A response that fits the peer's maximum PDU length goes as one PDU with
    two PDVs, command and identifier; larger ones are cut into fragments of
    one PDV per PDU. ``max_pdu`` 0 means no limit; a limit too small for
    any data still gets one byte per PDV.
    """
    room = max(1, max_pdu - _PDV_OVERHEAD)
    whole = len(command) + len(identifier or b"") + 2 * _PDV_OVERHEAD
    if not max_pdu or whole <= max_pdu:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append(
            (context_id, bytes([_COMMAND_LAST]) + command)
        )
        if identifier:
            primitive.presentation_data_value_list.append(
                (context_id, bytes([_DATA_SET_LAST]) + identifier)
            )
        yield primitive
        return

    yield from _fragments(context_id, command, room, last=_COMMAND_LAST)
    if identifier:
        yield from _fragments(context_id, identifier, room, last=_DATA_SET_LAST)


def _fragments(context_id: int, data: bytes, room: int, last: int) -> Iterator[P_DATA]:
    """``data`` cut into PDVs of at most ``room`` bytes, one per P-DATA."""
    more = last & ~0x02
    for start in range(0, len(data), room):
        chunk = data[start : start + room]
        header = last if start + room >= len(data) else more
        primitive = P_DATA()
        primitive.presentation_data_value_list.append(
            (context_id, bytes([header]) + chunk)
        )
        yield primitive
