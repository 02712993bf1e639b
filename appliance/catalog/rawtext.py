"""Element values as catalog text, read straight from their bytes.

Every stored instance has some fifty elements copied into the catalog.
pydicom turns each one into a Python value first (a UID, a PersonName, an
IS or DS number) through hooks and a character set lookup, and the catalog
then turns it back into text; for the plain values nearly every instance
carries that round trip gives back the bytes it started from. Those are
read here directly. Whatever might come out differently goes through
pydicom, so that both paths give the same text (the tests compare them):

* a value with a byte outside printable ASCII, or with spaces around one
  of its backslash-separated values (pydicom strips those for some VRs);
* an IS or DS number in a form pydicom rewrites, a person's name with
  component groups (``=``);
* text in a character set other than the default, Latin-1 or UTF-8;
* binary VRs other than US, and values pydicom has deferred or decoded.
"""

from __future__ import annotations

import re
import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# The value did not qualify; the caller asks pydicom.
UNDECIDED = object()

# Text VRs whose values use SpecificCharacterSet (PS3.5 6.1.2.3), and those
# limited to the default repertoire.
_CHARSET_VRS = frozenset(["LO", "LT", "PN", "SH", "ST", "UC", "UT"])
_PLAIN_VRS = frozenset(["AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"])
# Character sets in which printable ASCII bytes are those same characters.
_ASCII_CHARSETS = frozenset(
    ["", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO_IR 192"]
)
_PRINTABLE = frozenset(range(0x20, 0x7F))
# Numbers in the form pydicom keeps as written.
_NUMBERS = {
    "IS": re.compile(r"[+-]?[0-9]+\Z"),
    "DS": re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z"),
}
_CHARSET_TAG = 0x00080005


def text(dataset: Dataset, element: RawDataElement) -> str | object | None:
    """The element's value as the catalog keeps it (None when empty), or
    UNDECIDED when pydicom must decide."""
    vr = element.VR or _dictionary_vr(element.tag)
    value = element.value
    if not isinstance(value, bytes):
        return UNDECIDED
    if vr == "US":
        return _unsigned_shorts(value, element.is_little_endian)
    if vr in _CHARSET_VRS:
        if _charset(dataset) not in _ASCII_CHARSETS:
            return UNDECIDED
        if vr == "PN" and b"=" in value:
            # pydicom drops empty trailing component groups ("DOE^J=").
            return UNDECIDED
    elif vr not in _PLAIN_VRS:
        return UNDECIDED
    found = _plain_text(value)
    number = _NUMBERS.get(vr)
    # pydicom rewrites numbers it finds unusual (".1" becomes "0.1").
    if (
        isinstance(found, str)
        and number is not None
        and not all(number.match(part) for part in found.split("\\"))
    ):
        return UNDECIDED
    return found


def _plain_text(value: bytes) -> str | object | None:
    stripped = value.rstrip(b" \x00")
    if not stripped:
        return None
    if not _PRINTABLE.issuperset(stripped):
        return UNDECIDED
    result = stripped.decode("ascii")
    if " " in result and any(part != part.strip(" ") for part in result.split("\\")):
        return UNDECIDED
    return result


def _unsigned_shorts(value: bytes, little_endian: bool) -> str | object | None:
    if not value:
        return None
    if len(value) % 2 or not little_endian:
        return UNDECIDED
    numbers = struct.unpack(f"<{len(value) // 2}H", value)
    return "\\".join(str(number) for number in numbers)


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _charset(dataset: Dataset) -> str | None:
    """The data set's SpecificCharacterSet as written; None when it is
    anything but one plain value."""
    if _CHARSET_TAG not in dataset:
        return ""
    element = dataset.get_item(_CHARSET_TAG)
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    if isinstance(value, str):
        return value.strip(" \x00")
    return None
