"""C-FIND SCP: turn a request identifier into a catalog query and answer it.

Responses carry each requested key (empty when unknown), the
SpecificCharacterSet actually used, QueryRetrieveLevel and RetrieveAETitle,
and nothing else (PS3.4 C.4.1.1.3.2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.service_class import QueryRetrieveServiceClass

from appliance import part10
from appliance.audit import dicom as audit_dicom
from appliance.catalog.query import Query, Row, find
from appliance.catalog.records import text_of
from appliance.catalog.store import Catalog
from appliance.dicom.responses import Element, command_set, encode_identifier, p_data

if TYPE_CHECKING:
    from appliance.dicom.node import Node

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
NOT_AUTHORISED = 0x0124

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_ALL_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# The levels of each information model (PS3.4 C.6.1.1, C.6.2.1), by the
# UID root its FIND, MOVE and GET SOP classes share.
_LEVELS_BY_MODEL = {
    PATIENT_ROOT_FIND.rsplit(".", 1)[0]: _ALL_LEVELS,
    STUDY_ROOT_FIND.rsplit(".", 1)[0]: ("STUDY", "SERIES", "IMAGE"),
}
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
_SPECIFIC_CHARACTER_SET = 0x00080005
_QUERY_RETRIEVE_LEVEL = 0x00080052
_RETRIEVE_AE_TITLE = 0x00080054

# (status, encoded identifier or None, error comment)
Answer = tuple[int, bytes | None, str]

# Answers waiting in pynetdicom's outgoing queue before the search pauses.
_QUEUED_ANSWERS = 8


def serve(
    service: QueryRetrieveServiceClass, node: Node, req: C_FIND, context: Any
) -> None:
    """Answer one C-FIND request on its association (PS3.4 C.4.1.3)."""
    syntax = context.transfer_syntax[0]
    message_id = int(req.MessageID or 0)
    if not node.may_query(service.assoc):
        # A caller that may only store has no Query/Retrieve context, but
        # pynetdicom serves a request by the SOP class it names, on any
        # context the caller has.
        logger.warning(
            "C-FIND from %s refused: caller not allowed to query",
            node.describe(service.assoc),
        )
        comment = "not authorised to query"
        _respond(service, req, context, NOT_AUTHORISED, None, comment)
        _audit(node, service.assoc, req, syntax, None, comment)
        return
    node.count_query(service.assoc)
    try:
        identifier = decode_identifier(req, syntax)
    except ValueError as exc:
        logger.warning(
            "C-FIND from %s refused: cannot decode the identifier: %s",
            node.describe(service.assoc),
            exc,
        )
        _respond(service, req, context, UNABLE_TO_PROCESS, None, "cannot decode")
        _audit(node, service.assoc, req, syntax, None, "cannot decode")
        return

    answers = answer_find(
        node.catalog,
        identifier,
        str(req.AffectedSOPClassUID),
        node.ae_title,
        lambda: service.is_cancelled(message_id),
        syntax,
        caller=node.describe(service.assoc),
    )
    failure = ""
    for status, encoded, comment in answers:
        if not service.assoc.is_established:
            failure = "association ended before the last response"
            break
        _respond(service, req, context, status, encoded, comment)
        _wait_until_sent(service.assoc)
        if status not in (SUCCESS, PENDING, 0xFF01, CANCELLED):
            failure = comment or f"status 0x{status:04X}"
    _audit(node, service.assoc, req, syntax, identifier, failure)


def _audit(
    node: Node,
    assoc: Association,
    req: C_FIND,
    syntax: UID,
    identifier: Dataset | None,
    failure: str,
) -> None:
    raw = req.Identifier.getvalue() if req.Identifier else b""
    caller = audit_dicom.peer_of(assoc)
    sop_class = str(req.AffectedSOPClassUID)
    audit_dicom.query_answered(
        node.audit, caller, sop_class, raw, str(syntax), identifier, failure
    )


def decode_identifier(req: C_FIND | C_GET | C_MOVE, syntax: UID) -> Dataset:
    """The request's identifier; ValueError when it cannot be read."""
    raw = req.Identifier.getvalue() if req.Identifier else b""
    try:
        # pydicom reads a value cut short without complaint, so the
        # structure is checked on the bytes as received.
        part10.check_encoded(raw, syntax)
        return decode(
            BytesIO(raw),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
    except Exception as exc:
        raise ValueError(str(exc)) from exc


def _respond(
    service: QueryRetrieveServiceClass,
    req: C_FIND,
    context: Any,
    status: int,
    encoded: bytes | None,
    comment: str,
) -> None:
    """Queue one response for pynetdicom's network thread to send."""
    command = command_set(
        str(req.AffectedSOPClassUID),
        int(req.MessageID or 0),
        status,
        encoded is not None,
        comment,
    )
    context_id = int(context.context_id or 0)
    for primitive in p_data(
        context_id, command, encoded, service.dimse.maximum_pdu_size
    ):
        service.assoc.dul.send_pdu(primitive)


def _wait_until_sent(assoc: Association, limit: float = 5.0) -> None:
    """Let pynetdicom's network thread catch up when answers pile up.

    That thread either sends or reads in each turn, sending first; a search
    that queues answers faster than they go out keeps it from ever reading,
    and a C-CANCEL from the requester would wait until the last answer. So
    once a few answers are queued, the search waits until all have gone.
    """
    outgoing = assoc.dul.to_provider_queue
    if outgoing.qsize() < _QUEUED_ANSWERS:
        return
    deadline = time.monotonic() + limit
    while not outgoing.empty() and time.monotonic() < deadline:
        time.sleep(0.0002)


def query_from_identifier(identifier: Dataset, sop_class: str) -> Query:
    """The catalog query an identifier asks for; ValueError when it is invalid."""
    level = (text_of(identifier, "QueryRetrieveLevel") or "").strip()
    allowed = levels_of(sop_class)
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


def levels_of(sop_class: str) -> tuple[str, ...]:
    """The Query/Retrieve levels of the model a FIND, MOVE or GET SOP class
    belongs to."""
    return _LEVELS_BY_MODEL.get(sop_class.rsplit(".", 1)[0], _ALL_LEVELS)


def answer_find(
    catalog: Catalog,
    identifier: Dataset,
    sop_class: str,
    ae_title: str,
    is_cancelled: Callable[[], bool],
    syntax: UID,
    combined_datetime: bool = False,
    caller: str = "?",
) -> Iterator[Answer]:
    """Yield the responses to a C-FIND: pending ones with their identifier
    encoded in ``syntax``, then the final status (PS3.4 C.4.1.1.4).
    ``caller`` names the requester in the log line of a refusal."""
    is_cancelled = _latched(is_cancelled)
    try:
        query = query_from_identifier(identifier, sop_class)
        query.combined_datetime = combined_datetime
    except ValueError as exc:
        logger.warning("C-FIND from %s refused: %s", caller, exc)
        yield IDENTIFIER_DOES_NOT_MATCH, None, str(exc)
        return
    except Exception as exc:  # pydicom could not decode an element's bytes
        logger.warning(
            "C-FIND from %s refused: cannot decode the identifier: %s", caller, exc
        )
        yield UNABLE_TO_PROCESS, None, "cannot decode the identifier"
        return

    charset = _requested_charset(identifier)
    for row in find(catalog, query, is_cancelled):
        if is_cancelled():
            yield CANCELLED, None, ""
            return
        elements, used = _response(identifier, query, row, ae_title, charset)
        yield PENDING, encode_identifier(elements, used, syntax), ""
    yield (CANCELLED if is_cancelled() else SUCCESS), None, ""


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
) -> tuple[list[Element], str | None]:
    """The elements of one pending response and the character set they use."""
    elements: list[Element] = []
    values: list[str] = []
    for element in identifier:
        keyword = element.keyword or keyword_for_tag(element.tag)
        if keyword in _NOT_KEYS:
            continue
        value = row.get(keyword) if keyword and element.VR != "SQ" else None
        if value:
            values.append(value)
        elements.append(Element(int(element.tag), element.VR, value))

    elements.append(Element(_QUERY_RETRIEVE_LEVEL, "CS", query.level))
    elements.append(Element(_RETRIEVE_AE_TITLE, "AE", ae_title))
    used = _charset_for(values, charset)
    if used is not None:
        elements.append(Element(_SPECIFIC_CHARACTER_SET, "CS", used))
    return elements, used


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
