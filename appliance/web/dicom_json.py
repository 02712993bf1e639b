"""The DICOM JSON model (PS3.18 F.2): catalog text to JSON attributes.

The catalog keeps attribute values as text, several values joined with a
backslash; JSON wants numbers for the numeric VRs and objects for person
names (PS3.18 F.2.3, F.2.2).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

logger = logging.getLogger(__name__)

_INTEGER_VRS = {"IS", "SL", "SS", "SV", "UL", "US", "UV"}
_DECIMAL_VRS = {"DS", "FL", "FD"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return int(tag)


def vr_of(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword)).split(" or ")[0]
    except KeyError:
        return "LO"


def attribute(keyword: str, text: str | None) -> tuple[str, dict[str, Any]]:
    """The JSON member (8 hex digits) and value object of one attribute."""
    vr = vr_of(keyword)
    member = f"{tag_of(keyword):08X}"
    values = _values(vr, text) if text else []
    if not values:
        return member, {"vr": vr}
    return member, {"vr": vr, "Value": values}


def row_object(keywords: list[str], row: dict[str, str | None]) -> dict[str, Any]:
    """One search result: the attributes ``keywords`` name, in tag order."""
    members = dict(attribute(keyword, row.get(keyword)) for keyword in keywords)
    return dict(sorted(members.items()))


def _values(vr: str, text: str) -> list[Any]:
    parts = text.split("\\")
    if vr == "PN":
        return [_person_name(part) for part in parts]
    if vr in _INTEGER_VRS:
        return [_number(part, int) for part in parts]
    if vr in _DECIMAL_VRS:
        return [_number(part, float) for part in parts]
    return [part if part else None for part in parts]


def _person_name(text: str) -> dict[str, str] | None:
    groups = {
        name: value
        for name, value in zip(_PN_GROUPS, text.split("="), strict=False)
        if value
    }
    return groups or None


def _number(text: str, kind: type) -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text) if kind is float else int(text)
    except ValueError:
        # A value the sender wrote badly: kept as the text it is.
        return text
    if not math.isfinite(value):
        return text
    if isinstance(value, float) and value.is_integer() and "." not in text:
        return int(value)
    return value
