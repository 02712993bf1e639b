"""The ACK sent for each HL7 message applied, kept to answer a resend.

Database ``hl7``: ``sender | control ID`` -> ``{"ack": base64 of the
ACK, "time", "fingerprint": SHA-256 of the message, "type": "ADT^A40"}``.
It is written in the transaction of the message's change; when that change
wrote journal entries, the last of them carries the answer too (under
``hl7``, with its key), so that the mirror has it exactly when it has the
change (a journal segment never splits a transaction, and the last entry
is the one that completes the message).

A restore keeps the answers whose changes it keeps: those of ADT messages
(patient updates and merges are in the snapshot and the journal, which
give the answers back with them). Appointments and orders are the lost
appliance's own state, dropped by a restore; their answers go too, so that
the RIS's resend of one is applied again rather than answered and lost.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import lmdb

from appliance.catalog import codec
from appliance.catalog.store import Catalog, sequence_key
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

DATABASE = "hl7"
# The field of a journal entry that carries the answer.
JOURNAL_FIELD = "hl7"
_JOURNAL_NEXT = b"journal.next"
# Message types whose changes a restore brings back.
_RESTORED = ("ADT",)

# Answers looked at per write transaction while pruning: a long one would
# hold back every other writer of the catalog (C-STOREs among them).
_PRUNED_AT_ONCE = 1000


def recall(catalog: Catalog, txn: lmdb.Transaction, key: str) -> dict[str, Any] | None:
    """The answer remembered under ``key`` (``sender|control ID``), if any."""
    return catalog.get(txn, DATABASE, key)


def ack_of(answer: dict[str, Any]) -> bytes:
    """The bytes of the ACK an answer holds."""
    return base64.b64decode(answer["ack"])


def journal_mark(catalog: Catalog, txn: lmdb.Transaction) -> int:
    """The number the next journal entry will take: before a change, what
    :func:`remember` needs to find the entries the change writes."""
    return int(txn.get(_JOURNAL_NEXT, b"1", db=catalog.db["meta"]))


def remember(
    catalog: Catalog,
    txn: lmdb.Transaction,
    key: str,
    answer: dict[str, Any],
    since: int,
) -> None:
    """Keep ``answer`` under ``key``, and put it into the last journal entry
    numbered ``since`` or above (those the message's change wrote in this
    transaction), if there is one."""
    catalog._put(txn, DATABASE, key, answer)
    last = journal_mark(catalog, txn) - 1
    if last < since:
        return
    journal = catalog.db["journal"]
    raw = txn.get(sequence_key(last), db=journal)
    if raw is None:
        return
    entry = codec.loads(raw)
    entry[JOURNAL_FIELD] = {"key": key, **answer}
    txn.put(sequence_key(last), codec.dumps(entry), db=journal)


def answer(ack: bytes, fingerprint: str, message_type: str) -> dict[str, Any]:
    """The record of ``ack`` sent for a message of ``message_type`` whose
    bytes have the digest ``fingerprint``."""
    return {
        "ack": base64.b64encode(ack).decode(),
        "time": time.time(),
        "fingerprint": fingerprint,
        "type": message_type,
    }


def replay(catalog: Catalog, txn: lmdb.Transaction, entry: dict[str, Any]) -> None:
    """Keep the answer a journal entry carries (a restore); an entry
    without one, or whose answer is kept already, changes nothing."""
    carried = entry.get(JOURNAL_FIELD)
    if not carried:
        return
    record = dict(carried)
    key = record.pop("key")
    if recall(catalog, txn, key) is None:
        catalog._put(txn, DATABASE, key, record)


def restored(raw: bytes | memoryview) -> bool:
    """Whether a restore keeps this stored answer: its message's change
    is one a restore brings back."""
    record = codec.loads(raw)
    message_type = record.get("type") or _type_acknowledged(record["ack"])
    return message_type.partition("^")[0] in _RESTORED


def _type_acknowledged(ack: str) -> str:
    """The message type of an answer kept without one (before types were
    kept): the ACK's MSH-9 echoes the trigger event, and ADT events are
    A01 to A62 (SIU ones S12 to S26, orders O01 and O23)."""
    try:
        header = base64.b64decode(ack).decode("utf-8").split("\r", 1)[0]
        fields = header.split(header[3])
        event = fields[8].split(fields[1][0])[1]
    except (ValueError, IndexError):
        return ""
    return "ADT^" + event if event[:1] == "A" else "?^" + event


def prune(catalog: Catalog, older_than: float) -> int:
    """Delete the answers kept since before ``older_than`` (a time): a
    resend comes within minutes or hours, and the database would otherwise
    grow by some 300 bytes per message for good; how many were deleted.
    A few short transactions rather than one long one."""
    deleted = 0
    start = b""
    while True:
        try:
            with catalog.env.begin(write=True) as txn:
                start, dropped = _prune_some(catalog, txn, start, older_than)
        except lmdb.Error as exc:
            raise CatalogError(f"cannot prune the HL7 answers: {exc}") from exc
        deleted += dropped
        if not start:
            return deleted


def _prune_some(
    catalog: Catalog, txn: lmdb.Transaction, start: bytes, older_than: float
) -> tuple[bytes, int]:
    """Look at up to ``_PRUNED_AT_ONCE`` answers from key ``start`` on;
    the key to go on from (b"" at the end) and how many were deleted."""
    cursor = txn.cursor(db=catalog.db[DATABASE])
    found = cursor.set_range(start) if start else cursor.first()
    dropped = 0
    for _ in range(_PRUNED_AT_ONCE):
        if not found:
            return b"", dropped
        if codec.loads(cursor.value()).get("time", 0.0) < older_than:
            # delete() moves the cursor on to the next record, if any.
            cursor.delete()
            found = bool(cursor.key())
            dropped += 1
        else:
            found = cursor.next()
    return (bytes(cursor.key()) if found else b""), dropped


def drop_unrestored(catalog: Catalog, txn: lmdb.Transaction) -> int:
    """Delete, from a catalog being rebuilt, the answers a restore does
    not keep; how many."""
    cursor = txn.cursor(db=catalog.db[DATABASE])
    dropped = 0
    found = cursor.first()
    while found:
        if restored(cursor.value()):
            found = cursor.next()
            continue
        # delete() moves the cursor on to the next record, if there is one
        # (no key then: LMDB keys are never empty).
        cursor.delete()
        found = bool(cursor.key())
        dropped += 1
    return dropped


def carry_over(work: Catalog, final: Catalog) -> int:
    """Copy the answers a restore keeps from ``work`` into ``final`` (a
    rebuilt catalog, written anew); how many."""
    kept = 0
    try:
        with work.read() as source, final.env.begin(write=True) as txn:
            target = final.db[DATABASE]
            for key, raw in source.cursor(db=work.db[DATABASE]):
                if restored(raw):
                    txn.put(bytes(key), bytes(raw), db=target, append=True)
                    kept += 1
    except lmdb.Error as exc:
        raise CatalogError(f"cannot copy the HL7 answers: {exc}") from exc
    return kept
