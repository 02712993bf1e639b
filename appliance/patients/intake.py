"""From an ADT message to a changed patient record and the ACK to send.

The ACK says AA only after the change and its journal entry are committed.
An A40 with several PID/MRG pairs makes every merge, in order, in the one
transaction that also remembers the ACK: all of them or, when one pair is
refused, none (the ERR names that pair's segments, ``MRG^2^1``).
A message that names a retired (merged) identifier, an identifier held
under several issuers, or an A47 whose new identifier another patient
holds, gets AE with an ERR segment (HL7 table 0357: 204 unknown key
identifier, 205 duplicate key identifier) and changes nothing. A message
the RIS sends again (same sender and control ID) gets the ACK sent for it
before, as appointments do.

One log line per message, naming the patients by opaque references only.
"""

from __future__ import annotations

import hashlib
import logging

import hl7
import lmdb

from appliance import audit
from appliance.audit import owed as owed_records
from appliance.audit.offenders import host_of
from appliance.audit.trail import Trail
from appliance.catalog import patients
from appliance.catalog.store import Catalog
from appliance.errors import PatientRecordError
from appliance.hl7 import acks, adt
from appliance.hl7.adt import PatientChange, PatientMessage
from appliance.hl7.messages import (
    DUPLICATE_KEY_IDENTIFIER,
    UNKNOWN_KEY_IDENTIFIER,
    MessageError,
    header,
)
from appliance.prefetch.appointments import Seen, remember

logger = logging.getLogger(__name__)

# What a change did (patients.Change.action), for the audit trail.
_UPDATED = "updated"
_MERGED = "merged"
_IDENTIFIER_CHANGED = "identifier changed"
_RECORDED = (_UPDATED, _MERGED, _IDENTIFIER_CHANGED)


def handle(
    catalog: Catalog,
    parsed: hl7.Message,
    raw: bytes,
    peer: str,
    trail: Trail | None = None,
) -> bytes:
    """Apply one parsed ADT message; its ACK. Raises MessageError for a
    message that cannot be applied, and CatalogError when the catalog
    fails (the caller answers both). A change is recorded in ``trail``."""
    message = adt.read(parsed, *header(parsed))
    digest = hashlib.sha256(raw).hexdigest()
    outcome: list[patients.Change] = []
    owed: list[str] = []

    def change(txn: lmdb.Transaction) -> None:
        for each in message.changes:
            done = _apply(catalog, txn, message, each)
            outcome.append(done)
            if trail is not None and done.action in _RECORDED:
                owed.append(_owe(catalog, txn, done, message, peer))

    seen = Seen(message.sender, message.control_id, message.message_type)
    sent = remember(catalog, seen, acks.accept(parsed), digest, change)
    if trail is not None:
        owed_records.settle(catalog, trail, owed)
    if outcome:
        logger.info(
            "HL7 %s control ID %s from %s: %s",
            message.message_type,
            message.control_id,
            peer,
            "; ".join(_described(done) for done in outcome),
        )
    return sent


def _described(done: patients.Change) -> str:
    plural = "study" if done.studies == 1 else "studies"
    moved = f", {done.studies} {plural}" if done.studies else ""
    return f"{done.reference} {done.action}{moved}"


def _owe(
    catalog: Catalog,
    txn: lmdb.Transaction,
    done: patients.Change,
    message: PatientMessage,
    peer: str,
) -> str:
    """Note in the change's transaction the record of a patient record
    updated (A08, A31) or merged (A40, A47), written to the audit log once
    committed; a message that changed nothing leaves no record. The
    requestor is the sending application (MSH-3^MSH-4) on its host: the
    network access point is an address without the port (PS3.15 A.5.2)."""
    patient_id = done.patient.partition("\x00")[0]
    merged = [done.merged.partition("\x00")[0]] if done.merged else None
    return owed_records.owe_patient_record(
        catalog,
        txn,
        patient_id,
        f"HL7 {message.message_type}: patient record {done.action}",
        audit.Peer(_application(message), host_of(peer), account=True),
        merged,
    )


def _application(message: PatientMessage) -> str:
    """MSH-3^MSH-4, or '' when the message names neither."""
    return message.sender if message.sender.strip("^") else ""


def _apply(
    catalog: Catalog,
    txn: lmdb.Transaction,
    message: PatientMessage,
    change: PatientChange,
) -> patients.Change:
    identifiers = [(i.patient_id, i.issuer) for i in change.identifiers]
    try:
        if message.action == adt.UPDATE:
            return patients.update(catalog, txn, identifiers, change.demographics)
        assert change.prior is not None
        return patients.merge(
            catalog,
            txn,
            identifiers[0],
            (change.prior.patient_id, change.prior.issuer),
            change.demographics,
            message.message_type.partition("^")[2],
            identifier_change=message.action == adt.CHANGE_ID,
        )
    except PatientRecordError as exc:
        code = UNKNOWN_KEY_IDENTIFIER if exc.unknown else DUPLICATE_KEY_IDENTIFIER
        location = _of_pair(exc.location, change.number)
        raise MessageError("AE", code, location, _in_pair(str(exc), change)) from exc


def _of_pair(location: str, number: int) -> str:
    """``location`` (``MRG^1^1``: the catalog names the fields of a message
    with one pair) in the ``number``-th PID/MRG pair."""
    parts = location.split("^")
    if len(parts) >= 2:
        parts[1] = str(number)
    return "^".join(parts)


def _in_pair(reason: str, change: PatientChange) -> str:
    return reason if change.number == 1 else f"pair {change.number}: {reason}"
