"""Appointments as the RIS sent them, kept in the catalog.

One record per appointment (an SIU appointment ID or an order number),
overwritten by each later message about it: booked, rescheduled, modified,
cancelled. A cancelled appointment stays as a record in state "cancelled"
(or "deleted", "no-show", "discontinued"), so that a late message about it
is understood and the planner drops its recalls.

Every message applied is remembered by its sender and control ID together
with the ACK sent for it, in the same transaction as the change: a message
the RIS sends again (it never saw our ACK) gets the same ACK and changes
nothing, and a crash before the commit leaves neither, so the RIS's resend
is applied then. How the ACKs are kept, and which survive a restore:
:mod:`appliance.catalog.answers`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from appliance.catalog import answers
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.hl7.messages import BOOK, CANCEL, PatientIdentifier, ScheduleMessage

logger = logging.getLogger(__name__)

APPOINTMENTS = "appointments"


@dataclass
class Appointment:
    """The latest the RIS said about one appointment."""

    appointment_id: str
    state: str
    start: float | None
    patients: list[PatientIdentifier]
    procedure_code: str = ""
    procedure_text: str = ""
    modality: str = ""
    accession: str = ""
    requested_procedure_id: str = ""
    updated: float = field(default_factory=time.time)
    source: str = ""  # the last message applied: type and control ID

    @property
    def active(self) -> bool:
        return self.state in ("booked", "rescheduled", "modified")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = self.appointment_id
        data["patients"] = [[p.patient_id, p.issuer] for p in self.patients]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Appointment:
        data = dict(data)
        data.pop("key", None)
        data["patients"] = [PatientIdentifier(*pair) for pair in data["patients"]]
        return cls(**data)


def apply(
    catalog: Catalog, message: ScheduleMessage, ack: bytes, fingerprint: str = ""
) -> bytes:
    """Record what ``message`` says, and ``ack`` as its answer, in one
    durable transaction; the ACK to send. A message seen before returns the
    ACK sent for it then, and changes nothing; ``fingerprint`` (a digest of
    its bytes) tells a resend from another message under a reused ID."""
    seen = Seen(message.sender, message.control_id, message.message_type)
    return remember(
        catalog, seen, ack, fingerprint, lambda txn: _change(catalog, txn, message)
    )


@dataclass(frozen=True)
class Seen:
    """Who sent a message, under which control ID, and of which type."""

    sender: str
    control_id: str
    message_type: str


def remember(
    catalog: Catalog,
    message: Seen,
    ack: bytes,
    fingerprint: str,
    change: Callable[[lmdb.Transaction], None],
) -> bytes:
    """Make ``change`` and remember ``ack`` as the answer to ``message`` in
    one durable transaction; the ACK to send (the one sent before, with no
    change, for a message seen before). Whatever ``change`` raises undoes
    both."""
    seen_key = f"{message.sender}|{message.control_id}"
    try:
        with catalog.env.begin(write=True) as txn:
            seen = answers.recall(catalog, txn, seen_key)
            if seen is not None:
                _log_resend(message, seen.get("fingerprint", ""), fingerprint)
                return answers.ack_of(seen)
            since = answers.journal_mark(catalog, txn)
            change(txn)
            answer = answers.answer(ack, fingerprint, message.message_type)
            # With the change's journal entry, if it wrote one: a restore
            # that brings the change back brings its answer back too.
            answers.remember(catalog, txn, seen_key, answer, since)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record HL7 {message.control_id}: {exc}") from exc
    return ack


def _log_resend(message: Seen, before: str, now: str) -> None:
    if before and now and before != now:
        logger.warning(
            "HL7 %s control ID %s from %s was used before for another message; "
            "answered as then, and NOT applied: the sender must use new IDs",
            message.message_type,
            message.control_id,
            message.sender,
        )
        return
    logger.info(
        "HL7 %s %s from %s received again; answered as before",
        message.message_type,
        message.control_id,
        message.sender,
    )


def record(catalog: Catalog, messages: list[ScheduleMessage]) -> int:
    """Apply every message of a list file in one durable transaction: all
    of them or, on a failure, none. Returns how many were applied."""
    try:
        with catalog.env.begin(write=True) as txn:
            for message in messages:
                _change(catalog, txn, message)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record the appointments: {exc}") from exc
    return len(messages)


def _change(catalog: Catalog, txn: lmdb.Transaction, message: ScheduleMessage) -> None:
    existing = catalog.get(txn, APPOINTMENTS, message.appointment_id)
    if message.action == BOOK:
        appointment = Appointment(
            appointment_id=message.appointment_id,
            state=message.state,
            start=message.start,
            patients=list(message.patients),
            procedure_code=message.procedure_code,
            procedure_text=message.procedure_text,
            modality=message.modality,
            accession=message.accession,
            requested_procedure_id=message.requested_procedure_id,
        )
        _log_change(existing, appointment)
    elif message.action == CANCEL:
        # Kept, not deleted: the planner must see the cancellation.
        appointment = (
            Appointment.from_json(existing)
            if existing is not None
            else Appointment(message.appointment_id, "", None, list(message.patients))
        )
        appointment.state = message.state
        appointment.updated = time.time()
        logger.info("appointment %s %s", appointment.appointment_id, message.state)
    else:
        return
    appointment.source = f"{message.message_type} {message.control_id}"
    catalog._put(txn, APPOINTMENTS, appointment.appointment_id, appointment.as_json())


def _log_change(existing: dict[str, Any] | None, appointment: Appointment) -> None:
    when = (
        time.strftime("%Y-%m-%d %H:%M", time.localtime(appointment.start))
        if appointment.start is not None
        else "no time"
    )
    verb = "booked" if existing is None else appointment.state
    logger.info(
        "appointment %s %s for %s (%s)",
        appointment.appointment_id,
        verb,
        when,
        appointment.modality or appointment.procedure_code or "no procedure",
    )


def appointments(catalog: Catalog) -> list[Appointment]:
    """Every appointment recorded, earliest first (those without a time
    last)."""
    with catalog.read() as txn:
        found = [
            Appointment.from_json(data)
            for _key, data in catalog.all_records(txn, APPOINTMENTS)
        ]
    return sorted(found, key=lambda a: (a.start is None, a.start or 0.0))
