"""A note of the online files a study's restore is writing, so that files
a killed run left behind are removed by the next one.

Recall writes each instance under a fresh online key and records the
study's copies in one transaction at the end; a run killed in between
leaves files no catalog record counts. The note names the study first,
then each key before its file is written::

    study 1.2.826.0.1.3680043.10.1009.7
    5f0c2b7e9a1d4c3b8e6f7a2d1c0b9e8f
    ...

At the next start, keys of the noted study that the catalog does not
count are removed (the same test as for every recall's own note,
:mod:`appliance.hsm.recall_notes`). This note also covers the files a
salvage writes outside the recall. Keys are flushed to it one by one, not
synced: a power cut may leave a salvaged file unnoted, which counts for
nothing and only takes room (a recall's own keys are synced to its note).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

from appliance.catalog.store import Catalog
from appliance.hsm.recall_notes import remove_uncounted
from appliance.storage import durable
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

_STUDY = "study "


class StagingNote:
    """The note file of the study being restored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def begin(self, study_uid: str) -> None:
        self.end()
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        self._file.write(f"{_STUDY}{study_uid}\n")
        self._file.flush()
        durable.fsync_file(self.path)
        durable.fsync_directory(self.path.parent)

    def add(self, key: str) -> None:
        if self._file is not None:
            self._file.write(key + "\n")
            self._file.flush()

    def close(self) -> None:
        """Stop writing to the note; it stays for the next run to read."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def end(self) -> None:
        """The study's copies are recorded (or none will be): forget it."""
        self.close()
        self.path.unlink(missing_ok=True)

    def clean_up(self, catalog: Catalog, online: OnlineTier) -> int:
        """Remove the files of a killed run that the catalog does not
        count; how many were removed."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines()
        removed = 0
        if lines and lines[0].startswith(_STUDY):
            study_uid = lines[0][len(_STUDY) :]
            keys = [key for key in lines[1:] if key]
            removed = remove_uncounted(catalog, online, study_uid, keys)
        if removed:
            logger.info("removed %d file(s) an interrupted restore left", removed)
        self.end()
        return removed


class NotedOnlineTier(OnlineTier):
    """The online tier, noting every new key before a file is written."""

    def __init__(self, root: Path, reserved_bytes: int, note: StagingNote) -> None:
        super().__init__(root, reserved_bytes)
        self.note = note

    # The tier's key maker is static; recall calls it on the tier it is
    # given, so an instance method here sees every key.
    def new_key(self, beside: str | None = None) -> str:  # type: ignore[override]
        key = OnlineTier.new_key(beside)
        self.note.add(key)
        return key
