"""Studies as audit messages name them, looked up in the catalog: the
patient, the accession number, and the instances per SOP class."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

import lmdb

from appliance.audit.events import StudyRef
from appliance.catalog import copies
from appliance.catalog.store import Catalog


def studies_of_instances(
    catalog: Catalog, sop_instance_uids: Iterable[str]
) -> list[StudyRef]:
    """The studies the instances belong to, each with the instances' count
    per SOP class; instances the catalog does not know are left out."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    with catalog.read() as txn:
        for uid in sop_instance_uids:
            record = catalog.instance(txn, uid)
            if record is not None:
                sop_class = record.attributes.get("SOPClassUID", "")
                counts[record.study_uid][sop_class] += 1
    return studies_with_counts(catalog, counts)


def studies_with_counts(
    catalog: Catalog, counts: dict[str, Counter[str]] | dict[str, dict[str, int]]
) -> list[StudyRef]:
    """A StudyRef per study UID, with the given counts per SOP class."""
    refs = []
    with catalog.read() as txn:
        for study_uid in sorted(counts):
            ref = _describe(catalog, txn, study_uid)
            ref.sop_classes = dict(counts[study_uid])
            refs.append(ref)
    return refs


def study(catalog: Catalog, study_uid: str) -> StudyRef:
    """The study with every instance the catalog holds of it."""
    found = Counter(
        r.attributes.get("SOPClassUID", "")
        for r in copies.instances_of(catalog, study_uid)
    )
    with catalog.read() as txn:
        ref = _describe(catalog, txn, study_uid)
    ref.sop_classes = dict(found)
    return ref


def _describe(catalog: Catalog, txn: lmdb.Transaction, study_uid: str) -> StudyRef:
    ref = StudyRef(study_uid)
    record = catalog.get(txn, "studies", study_uid)
    if record is None:
        return ref
    ref.accession = record.get("attrs", {}).get("AccessionNumber", "")
    patient = catalog.get(txn, "patients", str(record.get("patient", "")))
    if patient is not None:
        attributes = patient.get("attrs", {})
        ref.patient_id = attributes.get("PatientID", "")
        ref.patient_name = attributes.get("PatientName", "")
    return ref
