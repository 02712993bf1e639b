"""Audit records owed for changes committed to the catalog.

The audit log is a file of its own, written once the catalog has
committed a change: a process killed between the two would leave the
change without its record. So a change whose record must not be lost (a
patient record updated or merged) also writes what that record will say
into the catalog (``audit.pending``), in the change's own transaction.
Once the change is committed, the record is written to the audit log and
the entry forgotten. Entries that a killed process left behind are
written when the process that owes them starts again, with the time of
the change: a record may so be written twice (the process killed after
writing it, before forgetting the entry), never not at all.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import lmdb

from appliance.audit import codes, events
from appliance.audit.events import Peer
from appliance.audit.messages import AuditMessage
from appliance.audit.trail import Trail
from appliance.catalog.store import Catalog, encode_key

logger = logging.getLogger(__name__)

DATABASE = "audit.pending"
_PATIENT_RECORD = "patient-record"


def owe_patient_record(
    catalog: Catalog,
    txn: lmdb.Transaction,
    patient_id: str,
    description: str,
    source: Peer,
    other_patient_ids: list[str] | None = None,
) -> str:
    """Note, in the change's transaction ``txn``, the record of a patient
    record updated (``other_patient_ids``: the identifiers merged into it);
    the key to :func:`settle` once committed."""
    key = f"{time.time_ns():020d}.{secrets.token_hex(4)}"
    entry = {
        "event": _PATIENT_RECORD,
        "time": time.time(),
        "patient_id": patient_id,
        "description": description,
        "source": [source.ae_title, source.address, source.account],
        "other_patient_ids": other_patient_ids,
    }
    catalog._put(txn, DATABASE, key, entry)
    return key


def settle(catalog: Catalog, trail: Trail, keys: Iterable[str]) -> None:
    """Write the records owed under ``keys`` to the audit log, then forget
    them."""
    wanted = list(keys)
    if not wanted:
        return
    with catalog.read() as txn:
        owed = [(key, catalog.get(txn, DATABASE, key)) for key in wanted]
    for _key, entry in owed:
        if entry is not None:
            trail.record(_message(trail, entry))
    _forget(catalog, wanted)


def settle_left_over(catalog: Catalog, trail: Trail) -> int:
    """Write the records a killed process owed, oldest first, and forget
    them; how many there were."""
    with catalog.read() as txn:
        keys = [key for key, _entry in catalog.all_records(txn, DATABASE)]
    if keys:
        logger.warning(
            "%d audit record(s) of changes committed before a stop written now",
            len(keys),
        )
    settle(catalog, trail, keys)
    return len(keys)


def _message(trail: Trail, entry: dict[str, Any]) -> AuditMessage:
    ae_title, address, account = entry["source"]
    message = events.patient_record_changed(
        trail.ae_title,
        codes.UPDATE,
        entry["patient_id"],
        description=entry["description"],
        source=Peer(ae_title, address, account=account),
        other_patient_ids=entry["other_patient_ids"],
    )
    message.time = datetime.fromtimestamp(entry["time"], UTC)
    return message


def _forget(catalog: Catalog, keys: list[str]) -> None:
    """Forget entries whose records were written. A failure is logged, not
    raised: the change is committed and answered for already, and the
    entries are only written again at the next start."""
    try:
        with catalog.env.begin(write=True, db=catalog.db[DATABASE]) as txn:
            for key in keys:
                txn.delete(encode_key(key))
    except lmdb.Error as exc:
        logger.error(
            "cannot forget %d audit record(s) written: %s; they are written "
            "again at the next start",
            len(keys),
            exc,
        )
