"""C-FIND SCP: turn a request identifier into a catalog query and answer it.

Responses carry each requested key (empty when unknown), the
SpecificCharacterSet actually used, QueryRetrieveLevel and RetrieveAETitle,
and nothing else (PS3.4 C.4.1.1.3.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from appliance.catalog.query import Query, Row, find
from appliance.catalog.records import text_of
from appliance.catalog.store import Catalog

logger = logging.getLogger(__name__)

PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_LEVELS_BY_MODEL = {
    PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE"),
}
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
_INTEGER_VRS = {"US", "UL", "SS", "SL", "UV", "SV"}
_FLOAT_VRS = {"FL", "FD"}

Answer = tuple[int | Dataset, Dataset | None]


def query_from_identifier(identifier: Dataset, sop_class: str) -> Query:
    """The catalog query an identifier asks for; ValueError when it is invalid."""
    level = (text_of(identifier, "QueryRetrieveLevel") or "").strip()
    allowed = _LEVELS_BY_MODEL.get(sop_class, ("PATIENT", "STUDY", "SERIES", "IMAGE"))
    if level not in allowed:
        raise ValueError(
            f"QueryRetrieveLevel {level!r} is not one of {', '.join(allowed)}"
        )

    keys: dict[str, str | None] = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _NOT_KEYS or element.VR == "SQ":
            continue
        keys[keyword] = text_of(identifier, keyword)
    return Query(level=level, keys=keys)


def answer_find(
    catalog: Catalog,
    identifier: Dataset,
    sop_class: str,
    ae_title: str,
    is_cancelled: callable,  # type: ignore[valid-type]
    combined_datetime: bool = False,
) -> Iterator[Answer]:
    """Yield (status, identifier) pairs for a C-FIND, as pynetdicom expects."""
    is_cancelled = _latched(is_cancelled)
    try:
        query = query_from_identifier(identifier, sop_class)
        query.combined_datetime = combined_datetime
    except ValueError as exc:
        logger.warning("C-FIND refused: %s", exc)
        yield _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        return
    except Exception as exc:  # pydicom could not decode an element's bytes
        logger.warning("C-FIND refused: cannot decode the identifier: %s", exc)
        yield _failure(UNABLE_TO_PROCESS, "cannot decode the identifier"), None
        return

    charset = _requested_charset(identifier)
    for row in find(catalog, query, is_cancelled):
        if is_cancelled():
            yield CANCELLED, None
            return
        yield PENDING, _response(identifier, query, row, ae_title, charset)
    if is_cancelled():
        yield CANCELLED, None


def _latched(is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
    """``is_cancelled`` that stays True once it has been True.

    pynetdicom's ``Event.is_cancelled`` reports a C-CANCEL only once (it
    deletes the request when asked), but the search and the final status
    each need to see it.
    """
    seen = False

    def cancelled() -> bool:
        nonlocal seen
        seen = seen or bool(is_cancelled())
        return seen

    return cancelled


def _response(
    identifier: Dataset, query: Query, row: Row, ae_title: str, charset: str | None
) -> Dataset:
    response = Dataset()
    values: list[str] = []
    for element in identifier:
        keyword = element.keyword or keyword_for_tag(element.tag)
        if keyword in _NOT_KEYS:
            continue
        if element.VR == "SQ":
            response.add_new(element.tag, "SQ", [])
            continue
        value = row.get(keyword) if keyword else None
        if value:
            values.append(value)
        response.add_new(element.tag, element.VR, _typed(element.VR, value))

    response.QueryRetrieveLevel = query.level
    response.RetrieveAETitle = ae_title
    used = _charset_for(values, charset)
    if used is not None:
        response.SpecificCharacterSet = used
    return response


def _typed(vr: str, value: str | None) -> object:
    """A text value converted to what pydicom expects for ``vr``."""
    if value is None or value == "":
        return None
    parts = value.split("\\")
    try:
        if vr in _INTEGER_VRS:
            numbers: list[object] = [int(p) for p in parts]
        elif vr in _FLOAT_VRS:
            numbers = [float(p) for p in parts]
        else:
            return value
    except ValueError:
        return None
    return numbers[0] if len(numbers) == 1 else numbers


def _requested_charset(identifier: Dataset) -> str | None:
    """The requester's SpecificCharacterSet as one text value, or None."""
    value = identifier.get("SpecificCharacterSet")
    if not value:
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item) for item in value) or None
    return str(value).strip() or None


def _charset_for(values: list[str], requested: str | None) -> str | None:
    """The character set to answer in: the requester's if it can carry every
    value, else UTF-8 (ISO_IR 192)."""
    if all(v.isascii() for v in values):
        return requested
    if requested and "2022" not in requested:
        from pydicom.charset import python_encoding

        codec = python_encoding.get(requested.strip())
        if codec:
            try:
                for value in values:
                    value.encode(codec)
                return requested
            except UnicodeEncodeError:
                pass
    return "ISO_IR 192"


def _failure(status: int, text: str) -> Dataset:
    """A failure status with its ErrorComment (PS3.7 C.4.1.1.4).

    The comment goes in the command set, which is ASCII, and is one LO value:
    other characters become '?', backslashes '/', and it is cut to 64.
    """
    dataset = Dataset()
    dataset.Status = status
    comment = text.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    dataset.ErrorComment = comment[:64]
    return dataset
