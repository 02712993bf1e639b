"""The Storage Commitment Push Model messages (PS3.4 J.3): reading an
N-ACTION's Action Information, writing an N-EVENT-REPORT's Event
Information.

Request (action type 1)::

    Transaction UID (0008,1195)
    Referenced SOP Sequence (0008,1199)
      > Referenced SOP Class UID (0008,1150)
      > Referenced SOP Instance UID (0008,1155)

Report: event type 1 when every instance is committed, 2 otherwise; the
Transaction UID, the Referenced SOP Sequence of the committed instances
(each with the appliance's AE title as Retrieve AE Title) and, for event
type 2, the Failed SOP Sequence with a Failure Reason per instance
(PS3.3 C.14.1.1).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.catalog.commitments import Transaction

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
# The well-known SOP Instance every request and report addresses.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1
ALL_COMMITTED = 1
SOME_FAILED = 2

# N-ACTION statuses (PS3.7 10.1.4.1.10).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_INSTANCE = 0x0112
INVALID_ARGUMENT = 0x0115
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124
RESOURCE_LIMITATION = 0x0213

# Failure Reasons (PS3.3 C.14.1.1).
FAILED_PROCESSING = 0x0110
FAILED_NO_SUCH_INSTANCE = 0x0112
FAILED_CLASS_CONFLICT = 0x0119

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# The most bytes one reference takes in an encoded Action Information: an
# item header and delimiter, and two UI elements of 64 characters with
# their 8-byte headers (explicit or implicit VR, PS3.5 7.1 and 7.5).
_LARGEST_REFERENCE = 8 + 8 + 2 * (8 + 64)
# The Transaction UID, the sequence's header and delimiter, and room for
# an element or two more.
_LARGEST_REST = 1024


class BadRequest(Exception):
    """An N-ACTION the appliance cannot accept: its status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    """What a storage commitment request asks for."""

    transaction_uid: str
    # (SOP Class UID, SOP Instance UID) pairs, in the order received.
    references: list[list[str]]


def is_uid(value: object) -> bool:
    """A UID as PS3.5 9.1 has it: digits and dots, at most 64 characters."""
    text = str(value) if value is not None else ""
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def check_size(encoded: bytes, deflated: bool, max_references: int) -> None:
    """BadRequest (0x0213) when the encoded Action Information is longer
    than ``max_references`` references can be, before it is decoded: a
    list of a million references holds a worker for minutes and takes
    gigabytes once decoded. A deflated one is inflated only that far."""
    limit = max_references * _LARGEST_REFERENCE + _LARGEST_REST
    size = len(encoded)
    if deflated:
        try:
            size = len(
                zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded, limit + 1)
            )
        except zlib.error:
            return  # decoding says what is wrong with it
    if size > limit:
        raise BadRequest(
            RESOURCE_LIMITATION,
            f"more than {max_references} references (commitment.max_references)",
        )


def check_count(request: Request, max_references: int) -> None:
    """BadRequest (0x0213) for a request naming more instances than
    ``max_references``."""
    count = len(request.references)
    if count > max_references:
        raise BadRequest(
            RESOURCE_LIMITATION,
            f"{count} references, over commitment.max_references ({max_references})",
        )


def read_request(action_information: Dataset) -> Request:
    """The request in an N-ACTION's Action Information; BadRequest when a
    Transaction UID or a reference is missing or not a UID."""
    transaction = action_information.get("TransactionUID")
    if transaction is None or not str(transaction):
        raise BadRequest(INVALID_ARGUMENT, "no Transaction UID")
    if not is_uid(transaction):
        raise BadRequest(INVALID_ARGUMENT, f"Transaction UID {transaction!r} invalid")
    items = action_information.get("ReferencedSOPSequence")
    if not items:
        raise BadRequest(INVALID_ARGUMENT, "no Referenced SOP Sequence items")
    references = []
    for number, item in enumerate(items, start=1):
        sop_class = item.get("ReferencedSOPClassUID")
        sop_instance = item.get("ReferencedSOPInstanceUID")
        if not (is_uid(sop_class) and is_uid(sop_instance)):
            raise BadRequest(
                INVALID_ARGUMENT,
                f"Referenced SOP Sequence item {number} lacks a valid "
                "SOP Class UID or SOP Instance UID",
            )
        references.append([str(sop_class), str(sop_instance)])
    return Request(str(transaction), references)


def event_type(transaction: Transaction) -> int:
    return SOME_FAILED if transaction.failed else ALL_COMMITTED


def event_information(transaction: Transaction, ae_title: str) -> Dataset:
    """The Event Information of the report of a decided transaction."""
    report = Dataset()
    report.TransactionUID = transaction.uid
    if transaction.committed:
        report.RetrieveAETitle = ae_title
        report.ReferencedSOPSequence = Sequence(
            [_reference(sop_class, uid) for sop_class, uid in transaction.committed]
        )
    if transaction.failed:
        failed = []
        for sop_class, uid, reason in transaction.failed:
            item = _reference(sop_class, uid)
            item.FailureReason = int(reason, 16)
            failed.append(item)
        report.FailedSOPSequence = Sequence(failed)
    return report


def _reference(sop_class: str, uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    return item
