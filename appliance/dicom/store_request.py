"""What a C-STORE request must agree with before ingest looks at its data set.

pynetdicom serves every C-STORE by the storage service, whichever
presentation context it comes on, so an instance of one SOP class would be
stored from a context negotiated for another (Verification, say):
:func:`context_mismatch` says when the request's SOP class is not its
context's. And pynetdicom cannot hold an Affected SOP Instance UID longer
than 64 characters in its request, so such a request used to abort the
association where the sender is owed a status: :func:`install` has it
decoded without that UID, and ingest refuses the instance by the UID its
data set and file meta carry (PS3.7 9.1.1.1.9, 0x0117). So is one with
several values, which pynetdicom cannot hold either: the file meta carries
them as sent, which is no data set's UID (0xA900).
"""

from __future__ import annotations

from typing import Any, cast

from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE

# Refused: SOP Class not supported (PS3.7 9.1.1.1.9 b): the request names a
# SOP class this end does not store on that presentation context. Not
# 0xA900, which says the data set does not match the SOP class (it may
# match the one named perfectly); nor 0x0212 Mistyped argument, which is
# for a parameter not agreed on the association (the class may well be
# agreed on another of its contexts).
SOP_CLASS_NOT_SUPPORTED = 0x0122
SOP_CLASS_COMMENT = "SOP class is not the presentation context's abstract syntax"

_AFFECTED_SOP_INSTANCE_UID = Tag(0x0000, 0x1000)


def context_mismatch(context_id: int, abstract_syntax: str, sop_class: str) -> str:
    """Why a C-STORE for ``sop_class`` is refused on presentation context
    ``context_id``, negotiated for ``abstract_syntax``; "" when they agree.

    A presentation context carries the messages of its abstract syntax
    (PS3.8 7.1.1.13), and a storage SOP class is negotiated as an abstract
    syntax of its own. The appliance accepts no SOP Class Common Extended
    Negotiation (pynetdicom's default), so no context stands for related
    general classes either.
    """
    if str(sop_class) == str(abstract_syntax):
        return ""
    return (
        f"SOP class {_named(sop_class)} on presentation context {context_id}, "
        f"negotiated for {_named(abstract_syntax)}"
    )


def install() -> None:
    """Have pynetdicom decode a C-STORE request whose Affected SOP Instance
    UID it refuses (longer than 64 characters) without that UID, instead of
    failing: the request is then served, and answered with a status."""
    original = DIMSEMessage.message_to_primitive

    def message_to_primitive(message: DIMSEMessage) -> Any:
        command_set = message.command_set
        if not isinstance(message, C_STORE_RQ) or not _refused_by_pynetdicom(
            command_set.get(_AFFECTED_SOP_INSTANCE_UID)
        ):
            return original(message)
        element = command_set.pop(_AFFECTED_SOP_INSTANCE_UID)
        try:
            primitive = original(message)
        finally:
            command_set[_AFFECTED_SOP_INSTANCE_UID] = element
        return left_out(cast(C_STORE, primitive), "AffectedSOPInstanceUID")

    # The wrapper takes any message; pynetdicom's signature is a method's.
    setattr(DIMSEMessage, "message_to_primitive", message_to_primitive)  # noqa: B010


def left_out(primitive: C_STORE, keyword: str) -> C_STORE:
    """``primitive``, a C-STORE request decoded without the parameter
    ``keyword`` because pynetdicom could not hold its value, made to count
    as a valid request all the same, so that pynetdicom serves it."""
    primitive.__class__ = _IncompleteRequest
    incomplete = cast(_IncompleteRequest, primitive)
    incomplete.left_out = incomplete.left_out | {keyword}
    return incomplete


class _IncompleteRequest(C_STORE):
    """A C-STORE request decoded without parameters pynetdicom could not hold.

    Served all the same: the data set's file meta still carries the
    Affected SOP Instance UID as sent, for ingest to judge; a request
    without its Affected SOP Class UID is refused by the node. The response
    goes without what was left out, which PS3.7 9.1.1.1.4 allows (U(=) in
    Table 9.1-1): echoed, it would fail the requester's decoding as it
    failed this end's.
    """

    left_out: frozenset[str] = frozenset()

    @property
    def is_valid_request(self) -> bool:
        return all(
            getattr(self, keyword) is not None
            for keyword in self.REQUEST_KEYWORDS
            if keyword not in self.left_out
        )


def _refused_by_pynetdicom(element: Any) -> bool:
    """Whether pynetdicom's request refuses the value of ``element``.

    An empty value is left alone: the file meta cannot be written without
    it, and that aborts the association before the request is decoded.
    """
    value = getattr(element, "value", None)
    if not value:
        return False
    try:
        C_STORE().AffectedSOPInstanceUID = value
    except (TypeError, ValueError):  # TypeError: several values
        return True
    return False


def shown(uid: str) -> str:
    """``uid`` as a log line or Error Comment gives it, each control
    character a "?": it comes from the requester, and a line break in it
    would forge log lines. Not escaped with a backslash, which would split
    the Error Comment (LO) into two values."""
    return "".join(c if c.isprintable() and c != "\\" else "?" for c in uid)


def _named(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else shown(uid)
