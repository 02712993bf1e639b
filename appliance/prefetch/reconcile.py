"""Arriving studies compared with the RIS's orders.

A study that arrives on a site whose RIS sends appointments is expected to
match one: by accession number, with the same patient, or, when it has no
accession known to the RIS, by the patient alone. Two kinds of study are
flagged, with a warning in the log and a record that ``appliance prefetch
mismatches`` lists:

- one whose accession number the RIS scheduled for another patient: the
  modality may have picked the wrong worklist entry, and the images may be
  filed under the wrong patient;
- one that matches no appointment at all: an unscheduled exam, or one
  whose patient ID was typed by hand.

New studies are queued by the catalog as they are recorded (``arrivals``);
each prefetch run compares and drains that queue. Nothing is changed in
the studies themselves: correcting them is for a person.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import lmdb

from appliance.catalog.store import Catalog, encode_key
from appliance.errors import CatalogError
from appliance.prefetch import appointments
from appliance.prefetch.appointments import Appointment

logger = logging.getLogger(__name__)

ARRIVALS = "arrivals"
MISMATCHES = "mismatches"
_BATCH = 1000


@dataclass(frozen=True)
class Mismatch:
    study_uid: str
    patient_id: str
    issuer: str
    accession: str
    reason: str
    found: float


def reconcile(catalog: Catalog) -> list[Mismatch]:
    """Compare every study that arrived since the last call with the
    appointments, record and log the mismatches; those found now."""
    known = appointments.appointments(catalog)
    found: list[Mismatch] = []
    while True:
        batch = _next_arrivals(catalog)
        if not batch:
            return found
        mismatches = [
            m for m in (_compare(catalog, uid, known) for _k, uid in batch) if m
        ]
        _record(catalog, [key for key, _uid in batch], mismatches)
        for mismatch in mismatches:
            # The reason names patients: it stays out of the log, which is no
            # place for patient data; the mismatches command shows it.
            logger.warning(
                "study %s does not match the RIS schedule; see appliance "
                "prefetch mismatches",
                mismatch.study_uid,
            )
        found += mismatches


def mismatches(catalog: Catalog) -> list[Mismatch]:
    """Every study flagged so far, oldest first."""
    with catalog.read() as txn:
        found = [
            Mismatch(**{k: v for k, v in data.items() if k != "key"})
            for _key, data in catalog.all_records(txn, MISMATCHES)
        ]
    return sorted(found, key=lambda m: m.found)


def _next_arrivals(catalog: Catalog) -> list[tuple[bytes, str]]:
    with catalog.read() as txn:
        cursor = txn.cursor(db=catalog.db[ARRIVALS])
        batch = []
        for key, value in cursor:
            batch.append((bytes(key), bytes(value).decode()))
            if len(batch) >= _BATCH:
                break
    return batch


def _compare(
    catalog: Catalog, study_uid: str, known: list[Appointment]
) -> Mismatch | None:
    with catalog.read() as txn:
        study = catalog.get(txn, "studies", study_uid)
    if study is None:
        return None  # deleted since it arrived
    patient_id, _, issuer = str(study["patient"]).partition("\x00")
    accession = str(study.get("attrs", {}).get("AccessionNumber") or "").strip()

    def mismatch(reason: str) -> Mismatch:
        return Mismatch(study_uid, patient_id, issuer, accession, reason, time.time())

    scheduled = [a for a in known if accession and a.accession == accession]
    if scheduled:
        if any(_same_patient(a, patient_id, issuer) for a in scheduled):
            return None
        others = ", ".join(
            sorted({p.patient_id for a in scheduled for p in a.patients})
        )
        return mismatch(
            f"accession {accession} is scheduled for patient {others} in the RIS, "
            f"the study names patient {patient_id}"
        )
    if any(_same_patient(a, patient_id, issuer) for a in known):
        return None
    return mismatch(
        f"matches no scheduled order (patient {patient_id}, "
        f"accession {accession or 'none'})"
    )


def _same_patient(appointment: Appointment, patient_id: str, issuer: str) -> bool:
    """The same ID, and the same issuer where both name one."""
    return any(
        p.patient_id == patient_id
        and (not p.issuer or not issuer or p.issuer == issuer)
        for p in appointment.patients
    )


def _record(catalog: Catalog, drained: list[bytes], found: list[Mismatch]) -> None:
    try:
        with catalog.env.begin(write=True) as txn:
            for key in drained:
                txn.delete(key, db=catalog.db[ARRIVALS])
            for m in found:
                data = {"key": m.study_uid, **m.__dict__}
                catalog._put(txn, MISMATCHES, m.study_uid, data)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record the arrivals compared: {exc}") from exc


def forget(catalog: Catalog, study_uid: str) -> bool:
    """Drop a study from the mismatches (a person has dealt with it)."""
    with catalog.env.begin(write=True) as txn:
        return bool(txn.delete(encode_key(study_uid), db=catalog.db[MISMATCHES]))
