"""Patient updates and merges: the catalog follows what registration says.

Three changes, each one write transaction that also writes the journal
entry the mirror replays on a restore:

* update: new patient attributes (name, birth date, sex, other IDs) for
  every study of the patient at once;
* merge: the studies of a retired patient move to the surviving one, and
  the retired key stays behind as a pointer (``merged`` database) so that
  later instances naming it are filed under the survivor; the pointers
  are indexed by the key they name (``idx.merged.into``), changed with
  them in the same transaction;
* identifier change: a merge into a patient the catalog does not hold yet.

A patient record changed this way carries ``corrected`` (the time), which
tells the senders of stored instances (C-GET, C-MOVE, WADO) to coerce the
attributes of :data:`MANAGED` to the catalog's values; the stored bytes
never change on any tier.

Identifiers are looked up with the issuer rule of :func:`choose`. Errors
raise :class:`PatientRecordError`, whose messages name no patient.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import lmdb

from appliance.catalog import answers
from appliance.catalog.records import patient_key
from appliance.catalog.store import (
    POINTERS_BY_TARGET,
    Catalog,
    append_journal,
    encode_key,
    keys_with_id,
    name_index_keys,
)
from appliance.errors import CatalogError, PatientRecordError

logger = logging.getLogger(__name__)

MERGED = "merged"
UPDATE_OP = "patient-update"
MERGE_OP = "patient-merge"
JOURNAL_OPS = (UPDATE_OP, MERGE_OP)
_REFERENCE_KEY = b"patient_reference_key"

# The patient attributes registration owns: after a correction, the
# catalog's value (or its absence) wins over the stored instance's.
MANAGED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDs",
)

# Attribute values: text, or None to clear the attribute.
Demographics = dict[str, str | None]
Identifier = tuple[str, str]  # PatientID, IssuerOfPatientID ("" if none)


@dataclass(frozen=True)
class Change:
    """What one update or merge did, for the log line and the audit."""

    action: str  # "updated", "merged", "identifier changed", "unchanged", ...
    patient: str  # the key of the patient the message is about (survivor)
    reference: str  # an opaque reference to it, for logs
    merged: str = ""  # the retired key, for a merge or identifier change
    studies: int = 0  # studies whose patient attributes changed or moved


# -- public operations -------------------------------------------------------


def update(
    catalog: Catalog,
    txn: lmdb.Transaction,
    identifiers: list[Identifier],
    demographics: Demographics,
) -> Change:
    """Set new attributes on the patient the first of ``identifiers`` that
    the catalog knows names. A retired identifier is refused; a patient the
    catalog does not hold changes nothing (registration tells every system
    of every patient)."""
    for index, (patient_id, issuer) in enumerate(identifiers):
        location = f"PID^1^3^{index + 1}"
        key = find(catalog, txn, patient_id, issuer, location)
        if key is None:
            continue
        if _is_retired(catalog, txn, key):
            raise PatientRecordError(
                "PID-3 names a retired patient identifier (merged into another "
                "patient); send the update with the surviving identifier",
                location,
            )
        return _apply_update(
            catalog, txn, key, _others(demographics, identifiers, index)
        )
    key = patient_key(*identifiers[0])
    return Change("not held: nothing to change", key, reference(catalog, txn, key))


def _others(
    demographics: Demographics, identifiers: list[Identifier], used: int
) -> Demographics:
    """``demographics`` with OtherPatientIDs made of the identifiers of
    PID-3 but the patient's own ID, the ``used``-th: the first repetition
    is another ID when a later one named the patient."""
    if "OtherPatientIDs" not in demographics:
        return demographics
    own = identifiers[used][0]
    others = dict.fromkeys(pid for pid, _issuer in identifiers if pid != own)
    changed = dict(demographics)
    if others:
        changed["OtherPatientIDs"] = "\\".join(others)
    else:
        del changed["OtherPatientIDs"]
    return changed


def merge(
    catalog: Catalog,
    txn: lmdb.Transaction,
    survivor: Identifier,
    retired: Identifier,
    demographics: Demographics,
    event: str,
    identifier_change: bool = False,
) -> Change:
    """Move the studies of ``retired`` to ``survivor`` and keep ``retired``
    as a pointer to it. With ``identifier_change`` (ADT A47) the survivor
    must not be a patient the catalog holds already: that is a merge."""
    if survivor == retired or (
        survivor[0] == retired[0] and "" in (survivor[1], retired[1])
    ):
        raise PatientRecordError(
            "MRG-1 and PID-3 name the same patient identifier",
            "MRG^1^1",
            unknown=False,
        )
    new_key, held = _survivor_key(catalog, txn, survivor)
    old_key = find(catalog, txn, *retired, "MRG^1^1") or patient_key(*retired)
    if old_key == new_key:
        raise PatientRecordError(
            "MRG-1 and PID-3 name the same patient in the catalog",
            "MRG^1^1",
            unknown=False,
        )
    if _is_retired(catalog, txn, old_key):
        pointer = catalog.get(txn, MERGED, old_key) or {}
        if pointer.get("into") == new_key:
            ref = reference(catalog, txn, new_key)
            return Change("merged already: nothing to change", new_key, ref)
        raise PatientRecordError(
            "MRG-1 names a patient identifier retired already (merged into "
            "another patient)",
            "MRG^1^1",
        )
    if held and identifier_change:
        raise PatientRecordError(
            "the new identifier in PID-3 is held by another patient already; "
            "a merge (A40) joins two patients",
            "PID^1^3",
            unknown=False,
        )
    studies = _apply_merge(catalog, txn, old_key, new_key, demographics, event)
    action = "identifier changed" if identifier_change else "merged"
    ref = reference(catalog, txn, new_key)
    return Change(action, new_key, ref, merged=old_key, studies=studies)


def replay(catalog: Catalog, entry: dict[str, Any]) -> None:
    """Apply a journal entry of this module again (a restore), and keep the
    ACK it carries for its message (the last entry of a message does).
    Idempotent: an entry whose change the catalog holds already changes
    nothing."""
    try:
        with catalog.env.begin(write=True) as txn:
            answers.replay(catalog, txn, entry)
            if entry["op"] == UPDATE_OP:
                if catalog.get(txn, "patients", entry["patient"]) is not None:
                    _apply_update(
                        catalog, txn, entry["patient"], entry["attrs"], whole=True
                    )
            elif entry["op"] == MERGE_OP and not _merged_already(catalog, txn, entry):
                _apply_merge(
                    catalog,
                    txn,
                    entry["merged"],
                    entry["into"],
                    entry["attrs"],
                    entry.get("event", ""),
                    whole=True,
                )
    except lmdb.Error as exc:
        raise CatalogError(f"cannot replay a patient change: {exc}") from exc


def _merged_already(
    catalog: Catalog, txn: lmdb.Transaction, entry: dict[str, Any]
) -> bool:
    """Whether the catalog holds this merge already: the retired key is a
    pointer (to the survivor, or to whom a later merge moved it on) and no
    patient record."""
    merged = entry["merged"]
    return (
        catalog.get(txn, MERGED, merged) is not None
        and catalog.get(txn, "patients", merged) is None
    )


def carry_over(work: Catalog, final: Catalog) -> int:
    """Copy the pointers of retired patients and the marks of corrected
    patient records from ``work`` into ``final`` (a rebuilt catalog whose
    instances were written with the corrected attributes); the pointers."""
    try:
        with work.read() as source, final.env.begin(write=True) as txn:
            pointers = 0
            if work.has(MERGED):
                for key, data in work.all_records(source, MERGED):
                    final._put(txn, MERGED, key, data)
                    _index(final, txn, POINTERS_BY_TARGET, str(data["into"]), key)
                    pointers += 1
            for key, data in work.all_records(source, "patients"):
                if "corrected" not in data:
                    continue
                patient = final.get(txn, "patients", key)
                if patient is not None:
                    patient["corrected"] = data["corrected"]
                    final._put(txn, "patients", key, patient)
            secret = source.get(_REFERENCE_KEY, db=work.db["meta"])
            if secret is not None:
                txn.put(_REFERENCE_KEY, bytes(secret), db=final.db["meta"])
    except lmdb.Error as exc:
        raise CatalogError(f"cannot copy the patient pointers: {exc}") from exc
    return pointers


def find(
    catalog: Catalog,
    txn: lmdb.Transaction,
    patient_id: str,
    issuer: str,
    location: str,
) -> str | None:
    """The key, live or retired, that ``patient_id`` of ``issuer`` names in
    the catalog; None when there is none. See :func:`choose`."""
    keys = keys_with_id(catalog, txn, "patients", patient_id)
    if catalog.has(MERGED):
        keys += keys_with_id(catalog, txn, MERGED, patient_id)
    return choose(keys, patient_id, issuer, location)


def choose(keys: list[str], patient_id: str, issuer: str, location: str) -> str | None:
    """Pick, among the catalog's keys with that PatientID, the one an HL7
    identifier names.

    With an issuer (PID-3.4): the key of that issuer, else the key recorded
    without one (the modalities did not say; no other issuer is mixed in).
    Without an issuer: the only key with that ID; several are ambiguous and
    refused, since they are patients of different issuers.
    """
    if issuer:
        for wanted in (patient_key(patient_id, issuer), patient_key(patient_id, "")):
            if wanted in keys:
                return wanted
        return None
    if len(keys) > 1:
        raise PatientRecordError(
            "the patient identifier is held under several issuers; name the "
            "assigning authority (component 4)",
            location,
            unknown=False,
        )
    return keys[0] if keys else None


def is_corrected(patient: dict[str, Any] | None) -> bool:
    """Whether instances of this patient record are sent coerced."""
    return patient is not None and "corrected" in patient


def reference(catalog: Catalog, txn: lmdb.Transaction, key: str) -> str:
    """An opaque, stable reference to a patient for ordinary logs: a keyed
    digest, so that a short ID cannot be found again by trying them all."""
    meta = catalog.db["meta"]
    secret = txn.get(_REFERENCE_KEY, db=meta)
    if secret is None:
        secret = os.urandom(16).hex().encode()
        txn.put(_REFERENCE_KEY, secret, db=meta)
    digest = hmac.new(bytes(secret), key.encode(), hashlib.sha256)
    return "patient-" + digest.hexdigest()[:12]


# -- the changes ---------------------------------------------------------------


def _survivor_key(
    catalog: Catalog, txn: lmdb.Transaction, survivor: Identifier
) -> tuple[str, bool]:
    """The survivor's key, and whether the catalog holds that patient."""
    key = find(catalog, txn, *survivor, "PID^1^3")
    if key is not None and _is_retired(catalog, txn, key):
        raise PatientRecordError(
            "PID-3 names a retired patient identifier (merged into another "
            "patient); it cannot survive a merge",
            "PID^1^3",
        )
    if key is None:
        return patient_key(*survivor), False
    return key, True


def _apply_update(
    catalog: Catalog,
    txn: lmdb.Transaction,
    key: str,
    demographics: Demographics,
    whole: bool = False,
) -> Change:
    patient = catalog.get(txn, "patients", key)
    assert patient is not None
    before = dict(patient["attrs"])
    after = _present(dict(demographics) if whole else _changed(before, demographics))
    ref = reference(catalog, txn, key)
    if after == before:
        return Change("unchanged", key, ref)
    studies = _set_attributes(catalog, txn, patient, after)
    append_journal(
        catalog, txn, {"op": UPDATE_OP, "patient": key, "attrs": patient["attrs"]}
    )
    return Change("updated", key, ref, studies=studies)


def _apply_merge(
    catalog: Catalog,
    txn: lmdb.Transaction,
    old_key: str,
    new_key: str,
    demographics: Demographics | None,
    event: str,
    whole: bool = False,
) -> int:
    old = catalog.get(txn, "patients", old_key)
    new = catalog.get(txn, "patients", new_key)
    if new is None and old is None:
        # Neither is held: only the pointer, for instances still to come.
        _point(catalog, txn, old_key, new_key, event)
        _journal_merge(catalog, txn, old_key, new_key, None, event)
        return 0
    if new is None:
        new = {"key": new_key, "attrs": dict(old["attrs"]) if old else {}}
        new.update(studies=0, series=0, instances=0)
    old_names: set[str] = set()
    if old is not None:
        old_names = name_index_keys(old["attrs"].get("PatientName"))
        for counter in ("studies", "series", "instances"):
            new[counter] += old.get(counter, 0)
        for name in old_names:
            _unindex(catalog, txn, "idx.patient.name", name, old_key)
        txn.delete(encode_key(old_key), db=catalog.db["patients"])
    moved = _move_studies(catalog, txn, old_key, new_key)
    given = demographics or {}
    attrs = dict(given) if whole else _changed(new["attrs"], given)
    patient_id, _, issuer = new_key.partition("\x00")
    attrs["PatientID"] = patient_id
    attrs["IssuerOfPatientID"] = issuer or None
    kept = _present(attrs)
    _set_attributes(catalog, txn, new, kept, moved, old_names)
    _point(catalog, txn, old_key, new_key, event)
    _journal_merge(catalog, txn, old_key, new_key, new["attrs"], event)
    return len(moved)


def _journal_merge(
    catalog: Catalog,
    txn: lmdb.Transaction,
    old_key: str,
    new_key: str,
    attrs: dict[str, str] | None,
    event: str,
) -> None:
    entry: dict[str, Any] = {"op": MERGE_OP, "merged": old_key, "into": new_key}
    entry.update(attrs=attrs, event=event)
    append_journal(catalog, txn, entry)


def _changed(before: dict[str, str], demographics: Demographics) -> Demographics:
    """``before`` with the message's values over it (None clears one)."""
    after: Demographics = dict(before)
    after.update(demographics)
    return after


def _present(attrs: Demographics) -> dict[str, str]:
    """The attributes that have a value (None clears one)."""
    return {k: v for k, v in attrs.items() if v is not None}


def _set_attributes(
    catalog: Catalog,
    txn: lmdb.Transaction,
    patient: dict[str, Any],
    attrs: dict[str, str],
    moved: list[str] | None = None,
    moved_names: set[str] | None = None,
) -> int:
    """Give ``patient`` new attributes and file its studies under its new
    name; ``moved`` are studies that came from another patient, filed under
    that one's name (``moved_names``) until now. The studies touched."""
    key = patient["key"]
    old_names = name_index_keys(patient["attrs"].get("PatientName"))
    new_names = name_index_keys(attrs.get("PatientName"))
    for name in old_names - new_names:
        _unindex(catalog, txn, "idx.patient.name", name, key)
    for name in new_names:
        _index(catalog, txn, "idx.patient.name", name, key)
    studies = _values(catalog, txn, "idx.study.patient", key)
    came = set(moved or ())
    for uid in studies:
        before = (moved_names or set()) if uid in came else old_names
        for name in before - new_names:
            _unindex(catalog, txn, "idx.study.name", name, uid)
        for name in new_names - before:
            _index(catalog, txn, "idx.study.name", name, uid)
    patient["attrs"] = attrs
    patient["corrected"] = time.time()
    catalog._put(txn, "patients", key, patient)
    return len(studies)


def _move_studies(
    catalog: Catalog, txn: lmdb.Transaction, old_key: str, new_key: str
) -> list[str]:
    """File every study of ``old_key``, and their instances, under
    ``new_key``; the studies moved."""
    moved = _values(catalog, txn, "idx.study.patient", old_key)
    for uid in moved:
        study = catalog.get(txn, "studies", uid)
        if study is None:
            continue
        study["patient"] = new_key
        catalog._put(txn, "studies", uid, study)
        _unindex(catalog, txn, "idx.study.patient", old_key, uid)
        _index(catalog, txn, "idx.study.patient", new_key, uid)
        _move_instances(catalog, txn, uid, new_key)
    return moved


def _move_instances(
    catalog: Catalog, txn: lmdb.Transaction, study_uid: str, new_key: str
) -> None:
    for series_uid in list(_values(catalog, txn, "idx.series.study", study_uid)):
        for uid in list(_values(catalog, txn, "idx.instance.series", series_uid)):
            data = catalog.get(txn, "instances", uid)
            if data is not None and data.get("patient") != new_key:
                data["patient"] = new_key
                catalog._put(txn, "instances", uid, data)


def _point(
    catalog: Catalog, txn: lmdb.Transaction, old_key: str, new_key: str, event: str
) -> None:
    """Keep ``old_key`` as a pointer to ``new_key``; pointers that named
    ``old_key`` name ``new_key`` now, so that every pointer is one step.
    The index of pointers by the key they name changes with them: it finds
    those to move on without reading every pointer of the archive."""
    for retired in _values(catalog, txn, POINTERS_BY_TARGET, old_key):
        _unindex(catalog, txn, POINTERS_BY_TARGET, old_key, retired)
        data = catalog.get(txn, MERGED, retired)
        if data is None or data.get("into") != old_key:
            continue  # an entry no pointer matches: dropped
        catalog._put(txn, MERGED, retired, {**data, "into": new_key})
        _index(catalog, txn, POINTERS_BY_TARGET, new_key, retired)

    earlier = catalog.get(txn, MERGED, old_key)
    if earlier is not None:
        # Only a replay points a key again; its old entry goes.
        _unindex(catalog, txn, POINTERS_BY_TARGET, str(earlier["into"]), old_key)
    pointer = {"key": old_key, "into": new_key, "time": time.time(), "event": event}
    catalog._put(txn, MERGED, old_key, pointer)
    _index(catalog, txn, POINTERS_BY_TARGET, new_key, old_key)


def _is_retired(catalog: Catalog, txn: lmdb.Transaction, key: str) -> bool:
    return catalog.has(MERGED) and catalog.get(txn, MERGED, key) is not None


def _values(catalog: Catalog, txn: lmdb.Transaction, index: str, key: str) -> list[str]:
    return list(catalog.index_values(txn, index, key))


def _unindex(
    catalog: Catalog, txn: lmdb.Transaction, index: str, key: str, value: str
) -> None:
    txn.delete(encode_key(key), encode_key(value), db=catalog.db[index])


def _index(
    catalog: Catalog, txn: lmdb.Transaction, index: str, key: str, value: str
) -> None:
    txn.put(encode_key(key), encode_key(value), db=catalog.db[index], dupdata=True)
