"""What a pack's manifest says of an instance, gathered from the catalog.

Every pack (nearline, offline, the mirror's) records, for each instance, its
UIDs, checksums and the attributes of its patient, study and series, so
that a catalog can be rebuilt from packs alone.
"""

from __future__ import annotations

from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.storage.packs.manifest import InstanceMeta


class LevelAttributes:
    """Patient, study and series attributes, read once per record."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.cache: dict[tuple[str, str], dict[str, str]] = {}

    def of(self, database: str, key: str) -> dict[str, str]:
        if (database, key) not in self.cache:
            with self.catalog.read() as txn:
                found = self.catalog.get(txn, database, key)
            self.cache[(database, key)] = dict(found["attrs"]) if found else {}
        return self.cache[(database, key)]


def instance_meta(record: InstanceRecord, levels: LevelAttributes) -> InstanceMeta:
    """The manifest entry of one instance, from its catalog record."""
    return InstanceMeta(
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.attributes.get("SOPClassUID", ""),
        series_uid=record.series_uid,
        study_uid=record.study_uid,
        transfer_syntax=record.transfer_syntax,
        size=record.size,
        sha256=record.sha256,
        content_sha256=record.content_sha256,
        attributes={
            "patient": levels.of("patients", record.patient),
            "study": levels.of("studies", record.study_uid),
            "series": levels.of("series", record.series_uid),
            "instance": dict(record.attributes),
        },
        received=record.received,
    )
