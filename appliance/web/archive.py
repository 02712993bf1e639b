"""The archive as the web child sees it: the catalog, the tiers, the one
ingest path, and recall of what is not online.

Everything here blocks (LMDB, files, recalls): the routes call it from the
thread pool, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.catalog import pins
from appliance.catalog.coercion import CorrectedPatients, coerced_bytes
from appliance.catalog.query import Query, find
from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import open_tiers
from appliance.ingest import Ingest
from appliance.restore.reasons import while_restoring
from appliance.storage.lock import WORKERS_LOCK, TierLock
from appliance.storage.online import TIER_NAME

logger = logging.getLogger(__name__)

# The online tier's incoming folder that STOW-RS receives into. DICOM
# workers use 0 to 63 (node.workers); the service empties every incoming
# folder before it starts, and the web child its own when it starts.
WEB_INCOMING = 1000


class NotFound(Exception):
    """Nothing in the catalog matches the UIDs asked for."""


class NotOnline(Exception):
    """Instances could not be brought online; ``volumes`` are those an
    operator was asked to load (empty when no copy could be read)."""

    def __init__(self, message: str, volumes: list[str]) -> None:
        super().__init__(message)
        self.volumes = volumes


@dataclass(frozen=True)
class Located:
    """One instance and its online file (None when not online)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: Path | None
    # The catalog's record of the patient when registration corrected it:
    # the instance is sent with its attributes (coerced), never as stored.
    patient: dict[str, Any] | None = None


def sent_bytes(item: Located) -> bytes:
    """The Part 10 bytes to send of an online instance of a corrected
    patient: the stored file with the catalog's patient attributes."""
    assert item.path is not None
    return coerced_bytes(item.path.read_bytes(), item.patient)


class Archive:
    """What the web child opens once and shares between requests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tiers = open_tiers(config, mirror=True)
        self.online = self.tiers.online
        self._in_use = TierLock(config.online_path, WORKERS_LOCK)
        self._in_use.acquire(exclusive=False, wait=60)
        # What a web child that died was receiving will never be answered.
        self.online.discard_incoming(WEB_INCOMING)
        self.incoming = self.online.incoming_for(WEB_INCOMING)
        self.catalog = Catalog(
            config.catalog_path, config.get("storage.catalog_max_size")
        )
        self.ingest = Ingest(
            self.catalog, self.online, config.get("storage.duplicate_policy")
        )
        self.recaller = Recaller(
            self.catalog, self.tiers, failed=while_restoring(config.restore_folder)
        )
        # The recaller keeps per-recall state: one recall at a time.
        self._recalling = threading.Lock()

    def close(self) -> None:
        self.ingest.close()
        self.catalog.close()
        self._in_use.release()

    def locate(
        self, study: str, series: str | None = None, instance: str | None = None
    ) -> list[Located]:
        """The instances of a study, series or one instance, in catalog order."""
        keys: dict[str, str | None] = {"StudyInstanceUID": study}
        if series is not None:
            keys["SeriesInstanceUID"] = series
        if instance is not None:
            keys["SOPInstanceUID"] = instance
        found = []
        corrected = CorrectedPatients(self.catalog)
        for row in find(self.catalog, Query("IMAGE", keys), lambda: False):
            uid = row.get("SOPInstanceUID") or ""
            with self.catalog.read() as txn:
                record = self.catalog.instance(txn, uid)
                patient = corrected.record(txn, record.patient) if record else None
            if record is None:
                continue
            copy = record.copy_on(TIER_NAME)
            found.append(
                Located(
                    sop_instance_uid=uid,
                    sop_class_uid=record.attributes.get("SOPClassUID", ""),
                    study_uid=record.study_uid,
                    series_uid=record.series_uid,
                    transfer_syntax=record.transfer_syntax,
                    path=self.online.path_of(copy.location) if copy else None,
                    patient=patient,
                )
            )
        return found

    def retrieve(
        self, study: str, series: str | None = None, instance: str | None = None
    ) -> list[Located]:
        """The instances asked for, all online: recalled first when some
        are not, as a C-MOVE would. Raises NotFound or NotOnline."""
        items = self.locate(study, series, instance)
        if not items:
            raise NotFound("no such study, series or instance")
        # Touched before anything is sent, so that a watermark release
        # running meanwhile takes other, less recently used studies.
        studies = {item.study_uid for item in items}
        self.catalog.touch_studies(studies)
        missing = {item.study_uid for item in items if item.path is None}
        pins.note_retrievals(self.catalog, studies, missing, time.time())
        if not missing:
            return items

        volumes: list[str] = []
        with self._recalling:
            for study_uid in sorted(missing):
                result = self.recaller.recall(
                    study_uid, why="a DICOMweb client retrieves the study"
                )
                volumes += [v for v in result.waiting_for if v not in volumes]
        items = self.locate(study, series, instance)
        if all(item.path is not None for item in items):
            return items
        if volumes:
            raise NotOnline(
                f"the study is on volume {', '.join(volumes)}, which is not "
                "loaded; the operator was asked to load it",
                volumes,
            )
        raise NotOnline("no readable copy of these instances", [])
