"""Request command sets with a value pynetdicom cannot take: answered with
a status and one log line, the association kept.

The Affected SOP Class UID of a C-ECHO, C-FIND, C-GET, C-MOVE or C-STORE
request says which SOP class it invokes. pynetdicom cannot hold one longer
than 64 characters in its request, and failed to decode the request, so
the association was aborted; a request without one (missing or empty) it
left unanswered, or aborted while writing the C-STORE's file meta; and one
naming a SOP class it has no service for it aborted too. Each is now
decoded without the UID and refused with 0x0122, Refused: SOP Class not
supported, a status every one of these services has (PS3.7 9.1.1.1.9,
9.1.2.1.6, 9.1.3.1.6, 9.1.4.1.7, 9.1.5.1.4). The response goes without the
UID, which each response may (U(=) in PS3.7 Tables 9.1-1 to 9.1-5):
echoed, it would fail the requester's decoding as it failed this end's.
A C-STORE goes on to the node's handler, which refuses it with the same
status and counts it; the others are answered here.

A SOP class invokes only its own service: a FIND class C-FIND, a MOVE
class C-MOVE, a GET class C-GET (PS3.4 C.4), a storage class C-STORE. The
appliance's Query/Retrieve service picks its C-FIND, C-MOVE or C-GET loop
by the request's kind, so a C-GET naming a FIND class was served as a
retrieve, and a C-STORE naming the class of the Verification,
Query/Retrieve or Storage Commitment context it came on reached ingest.
Each is refused 0x0122 as well.

The Move Originator AE title and Message ID of a C-STORE (PS3.7 9.1.1.1.7,
9.1.1.1.8) only say which C-MOVE the instance is sent for. When either
cannot be read, pynetdicom drops the title with an error line, or takes
the first of several IDs with a warning, neither naming the peer. Here
both are left out, the instance is stored, and one warning names the peer.
So is a Message ID Being Responded To that is not one number, which has
no place in a request at all (PS3.7 9.3), and a Priority that is not one
of LOW, MEDIUM, HIGH (PS3.7 9.1.1.1.3): it only advises, and this end
serves every request alike; pynetdicom aborted the association for it.
A C-MOVE's Move Destination of several AE titles, of which pynetdicom
took the first, is kept as the one text sent, which names no peer: the
retrieve service answers 0xA801 for it.

A request without a Message ID cannot be answered: no response could name
it. pynetdicom left it unanswered until the requester gave up; here its
association is aborted at once, with one warning. So is one whose Message
ID is not one number (US, VM 1, PS3.7 9.3): pynetdicom took the first of
several values, but no response can carry them all back, and a guess
could answer another request of the requester's.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.sop_class
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.utils import decode_bytes

from appliance.dicom import store_request

logger = logging.getLogger(__name__)

SOP_CLASS_NOT_SUPPORTED = store_request.SOP_CLASS_NOT_SUPPORTED
_REQUESTS = (C_ECHO_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ)
_C_STORE_RQ = 0x0001  # Command Field (PS3.7 E.1)
_AFFECTED_SOP_CLASS_UID = Tag(0x0000, 0x0002)
_MOVE_ORIGINATOR_AE_TITLE = Tag(0x0000, 0x1030)
_MOVE_ORIGINATOR_MESSAGE_ID = Tag(0x0000, 0x1031)
_MESSAGE_ID_BEING_RESPONDED_TO = Tag(0x0000, 0x0120)
_MESSAGE_ID = Tag(0x0000, 0x0110)
_MOVE_DESTINATION = Tag(0x0000, 0x0600)
_PRIORITY = Tag(0x0000, 0x0700)
_WITH_PRIORITY = (C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ)
_PRIORITIES = (0x0000, 0x0001, 0x0002)  # MEDIUM, HIGH, LOW (PS3.7 9.1.1.1.3)
_VERIFICATION = "1.2.840.10008.1.1"
# The SOP classes each request is served for: Verification, and each
# Patient Root (.1) and Study Root (.2) Query/Retrieve class (PS3.4 C.6.1,
# C.6.2) for its own request alone: FIND .1, MOVE .2, GET .3.
_SERVED = {
    "C-ECHO": frozenset([_VERIFICATION]),
    "C-FIND": frozenset(["1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"]),
    "C-MOVE": frozenset(["1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2"]),
    "C-GET": frozenset(["1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3"]),
}
# Where a primitive decoded without a value keeps the reason.
_SOP_CLASS_FAULT = "_appliance_sop_class_fault"
_ORIGINATOR_FAULT = "_appliance_originator_fault"
_RESPONSE_ID_FAULT = "_appliance_response_id_fault"
_MESSAGE_ID_FAULT = "_appliance_message_id_fault"
_PRIORITY_FAULT = "_appliance_priority_fault"


def install() -> None:
    """Decode requests without the values pynetdicom cannot take, and
    answer those without a SOP class before pynetdicom looks for a service."""
    _fill_missing_sop_class()
    original = DIMSEMessage.message_to_primitive

    def message_to_primitive(message: DIMSEMessage) -> Any:
        if not isinstance(message, _REQUESTS):
            return original(message)
        return _without_faults(message, original)

    # The wrapper takes any message; pynetdicom's signature is a method's.
    setattr(DIMSEMessage, "message_to_primitive", message_to_primitive)  # noqa: B010
    serve = Association._serve_request

    def serve_request(assoc: Association, msg: Any, context_id: int) -> None:
        if not _refused(assoc, msg, context_id):
            serve(assoc, msg, context_id)

    setattr(Association, "_serve_request", serve_request)  # noqa: B010


def sop_class_fault(request: Any) -> str:
    """Why the request's Affected SOP Class UID was left out; "" if it was not."""
    return str(getattr(request, _SOP_CLASS_FAULT, ""))


def store_refusal(
    request: C_STORE, context_id: int, abstract_syntax: str
) -> tuple[str, str]:
    """Why a C-STORE on presentation context ``context_id`` (negotiated for
    ``abstract_syntax``) is refused 0x0122 before its data set is read: the
    reason for the log line and the Error Comment; ("", "") when it is not.

    Its SOP class cannot be read, is not its context's, or is the context's
    but a class of another service (Verification, Query/Retrieve, Storage
    Commitment), which has no instances to store. A class pynetdicom does
    not know may be a private or future storage class, and is stored.
    """
    fault = sop_class_fault(request)
    if fault:
        return fault, fault
    uid = str(request.AffectedSOPClassUID or "")
    wrong = store_request.context_mismatch(context_id, abstract_syntax, uid)
    if wrong:
        return wrong, store_request.SOP_CLASS_COMMENT
    service = pynetdicom.sop_class.uid_to_service_class(uid)
    if service is ServiceClass or issubclass(service, StorageServiceClass):
        return "", ""
    reason = f"SOP class {store_request.shown(uid)} has no C-STORE service"
    return reason, reason


def _fill_missing_sop_class() -> None:
    """Give a C-STORE command set without an Affected SOP Class UID an empty
    one: pynetdicom reads it to write the file meta before the request is
    decoded, and aborts when it is not there."""
    decode = pynetdicom.dimse_messages.decode

    def decode_command_set(*args: Any, **kwargs: Any) -> Dataset:
        command_set: Dataset = decode(*args, **kwargs)
        if (
            command_set.get("CommandField") == _C_STORE_RQ
            and _AFFECTED_SOP_CLASS_UID not in command_set
        ):
            command_set.AffectedSOPClassUID = ""
        return command_set

    pynetdicom.dimse_messages.decode = decode_command_set  # type: ignore[assignment]


def _without_faults(message: DIMSEMessage, original: Any) -> Any:
    """The request's primitive, decoded without the values it cannot take."""
    faults = _faults_of(message)
    if not faults:
        return original(message)

    command_set = message.command_set
    tags = [tag for fault in faults for tag in fault.tags]
    taken = [command_set.pop(tag) for tag in tags if tag in command_set]
    try:
        primitive = original(message)
    finally:
        for element in taken:
            command_set[element.tag] = element
    for fault in faults:
        setattr(primitive, fault.attribute, fault.value)
    if isinstance(primitive, C_STORE) and sop_class_fault(primitive):
        primitive = store_request.left_out(primitive, "AffectedSOPClassUID")
    return primitive


@dataclass(frozen=True)
class _Fault:
    """Command elements a request is decoded without, and what its
    primitive keeps instead in ``attribute``: mostly why they were left
    out."""

    tags: tuple[BaseTag, ...]
    attribute: str
    value: str


def _faults_of(message: DIMSEMessage) -> list[_Fault]:
    """What the request is to be decoded without."""
    command_set = message.command_set
    faults = [
        _Fault(
            (_AFFECTED_SOP_CLASS_UID,),
            _SOP_CLASS_FAULT,
            _sop_class_problem(command_set),
        ),
        # Left out, the request is one without a Message ID, and aborted.
        _Fault(
            (_MESSAGE_ID,), _MESSAGE_ID_FAULT, _us_problem(command_set, _MESSAGE_ID)
        ),
        # A response's parameter, no request's (PS3.7 9.3): pynetdicom
        # reads it all the same, the first of several values with a line
        # that names no peer.
        _Fault(
            (_MESSAGE_ID_BEING_RESPONDED_TO,),
            _RESPONSE_ID_FAULT,
            _us_problem(command_set, _MESSAGE_ID_BEING_RESPONDED_TO),
        ),
    ]
    if isinstance(message, C_STORE_RQ):
        originator = (_MOVE_ORIGINATOR_AE_TITLE, _MOVE_ORIGINATOR_MESSAGE_ID)
        problem = _originator_problem(command_set)
        faults.append(_Fault(originator, _ORIGINATOR_FAULT, problem))
    if isinstance(message, _WITH_PRIORITY):
        problem = _priority_problem(command_set.get(_PRIORITY))
        faults.append(_Fault((_PRIORITY,), _PRIORITY_FAULT, problem))
    if isinstance(message, C_MOVE_RQ):
        # pynetdicom would move to the first of several; all of them
        # together name no peer, and the C-MOVE is refused 0xA801.
        several = _several_values(command_set.get(_MOVE_DESTINATION))
        faults.append(_Fault((_MOVE_DESTINATION,), "MoveDestination", several))
    return [fault for fault in faults if fault.value]


def _sop_class_problem(command_set: Dataset) -> str:
    """Why the request's Affected SOP Class UID cannot be taken, or ""."""
    element = command_set.get(_AFFECTED_SOP_CLASS_UID)
    value = element.value if element is not None else None
    if isinstance(value, bytes):
        value = decode_bytes(value)
    if not value:
        return "no Affected SOP Class UID"
    if not isinstance(value, str):
        return f"Affected SOP Class UID has {len(value)} values"
    return _uid_problem(value)


@functools.lru_cache(maxsize=256)
def _uid_problem(value: str) -> str:
    """Why pynetdicom cannot take ``value`` as a SOP Class UID, or "".
    Every C-STORE asks, mostly for a handful of classes: the answer is
    remembered rather than a primitive made and checked each time."""
    try:
        C_ECHO().AffectedSOPClassUID = value
    except (TypeError, ValueError):
        if len(value) > 64:
            return f"Affected SOP Class UID is {len(value)} characters long, over 64"
        return f"Affected SOP Class UID {value!r} is not a UID"
    return ""


def _originator_problem(command_set: Dataset) -> str:
    """Why a C-STORE's Move Originator cannot be taken, or ""."""
    title = command_set.get(_MOVE_ORIGINATOR_AE_TITLE)
    value = title.value if title is not None else None
    if isinstance(value, bytes):
        value = decode_bytes(value)
    if value and not _config.VALIDATORS["AE"](str(value).strip())[0]:
        text = str(value).strip()
        if len(text) > 16:
            return f"Move Originator AE title is {len(text)} characters long, over 16"
        return f"Move Originator AE title {text!r} is not an AE title"
    message_id = command_set.get(_MOVE_ORIGINATOR_MESSAGE_ID)
    if message_id is not None and not _one_us(message_id):
        return "Move Originator Message ID is not one US value"
    return ""


def _us_problem(command_set: Dataset, tag: BaseTag) -> str:
    """Why a US element of the command set cannot be taken, or ""."""
    element = command_set.get(tag)
    if element is None or _one_us(element):
        return ""
    return "not one US value"


def _several_values(element: Any) -> str:
    """The values of a text element of several, joined as sent; "" for one."""
    if element is None or element.VM < 2:
        return ""
    return "\\".join(str(value) for value in element.value)


def _priority_problem(element: Any) -> str:
    """Why a request's Priority cannot be taken, or "" (none is no fault of
    the request's here: pynetdicom serves it at LOW, as before)."""
    if element is None:
        return ""
    if not _one_us(element):
        return "not one US value"
    value = element.value
    if value is None or value == "":
        return "empty"
    if value not in _PRIORITIES:
        return f"0x{value:04X} is not LOW, MEDIUM or HIGH"
    return ""


def _one_us(element: Any) -> bool:
    """Whether a US element of the command set holds one value, or none."""
    try:
        value = element.value
    except Exception:  # pydicom cannot convert the bytes
        return False
    return value is None or value == "" or (element.VM == 1 and type(value) is int)


def _refused(assoc: Association, msg: Any, context_id: int) -> bool:
    """Whether the request was answered here: a C-ECHO, C-FIND, C-GET or
    C-MOVE without a SOP class this end serves. A C-STORE goes on to the
    node's handler, its Move Originator fault said here."""
    caller = _caller(assoc)
    if not isinstance(msg, C_ECHO | C_FIND | C_GET | C_MOVE | C_STORE):
        return False
    if getattr(msg, _MESSAGE_ID_FAULT, "") or (
        msg.MessageID is None and msg.MessageIDBeingRespondedTo is None
    ):
        return _abort_without_message_id(assoc, msg, caller)
    _say_left_out(msg, caller)
    if msg.MessageID is None or isinstance(msg, C_STORE):
        return False  # a response, or the node's: pynetdicom's path
    reason = sop_class_fault(msg) or _not_served(msg)
    if not reason:
        return False
    response = _response_to(msg)
    name = type(response).__name__.replace("_", "-")
    logger.warning("%s from %s refused: %s", name, caller, reason)
    response.MessageIDBeingRespondedTo = msg.MessageID
    response.Status = SOP_CLASS_NOT_SUPPORTED
    response.ErrorComment = reason[:64]
    assoc.dimse.send_msg(response, context_id)
    return True


def _abort_without_message_id(assoc: Association, msg: Any, caller: str) -> bool:
    """Abort the association of a request without a Message ID, or with
    one that is not one number: no response could name it (Message ID Being
    Responded To is mandatory, PS3.7 9.3), and pynetdicom would leave it
    unanswered until the requester gives up, or answer the first of its
    values. A C-STORE's data set is removed unread."""
    name = type(_response_to(msg)).__name__.replace("_", "-")
    if fault := getattr(msg, _MESSAGE_ID_FAULT, ""):
        what = f"whose Message ID is {fault}"
    else:
        what = "without a Message ID"
    logger.warning("aborting association with %s: %s request %s", caller, name, what)
    path = getattr(msg, "_dataset_path", None)
    if path is not None:
        path.unlink(missing_ok=True)
    assoc.abort()
    return True


def _say_left_out(msg: Any, caller: str) -> None:
    """One warning for what a request was decoded without but is served
    all the same."""
    faults = [
        f"{what} left out: {reason}"
        for what, reason in (
            ("Move Originator", getattr(msg, _ORIGINATOR_FAULT, "")),
            ("Message ID Being Responded To", getattr(msg, _RESPONSE_ID_FAULT, "")),
            ("Priority", getattr(msg, _PRIORITY_FAULT, "")),
        )
        if reason
    ]
    if not faults:
        return
    name = type(_response_to(msg)).__name__.replace("_", "-")
    instance = ""
    if isinstance(msg, C_STORE):
        instance = f" of instance {msg.AffectedSOPInstanceUID or '(unknown)'}"
    logger.warning("%s%s from %s: %s", name, instance, caller, "; ".join(faults))


def _not_served(msg: C_ECHO | C_FIND | C_GET | C_MOVE) -> str:
    """Why the request's SOP class, a UID, has no service for the request.

    Verification alone serves C-ECHO; each Patient Root and Study Root
    Query/Retrieve class serves its own one of C-FIND, C-MOVE and C-GET.
    pynetdicom would hand any other class to whatever service it knows for
    it, or abort when it knows none; its other query services (Modality
    Worklist, Hanging Protocol, ...) raise when handed a Query/Retrieve
    context, and the request would go unanswered. The appliance's
    Query/Retrieve service goes by the request's kind alone, so a FIND
    class would be retrieved from and a GET class queried.
    """
    uid = str(msg.AffectedSOPClassUID)
    name = type(_response_to(msg)).__name__.replace("_", "-")
    if uid in _SERVED[name]:
        return ""
    return f"SOP class {store_request.shown(uid)} has no {name} service"


def _response_to(msg: Any) -> Any:
    """An empty response primitive of the request's kind (the C-MOVE
    request is the retrieve module's subclass, which pynetdicom does not
    encode)."""
    for kind in (C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE):
        if isinstance(msg, kind):
            return kind()
    raise TypeError(type(msg).__name__)


def _caller(assoc: Association) -> str:
    node = getattr(assoc.ae, "node", None)
    if node is not None:
        return str(node.describe(assoc))
    requestor = assoc.requestor
    return f"{(requestor.ae_title or '').strip() or '?'}@{requestor.address}"
