"""The final report of an export: what the receiver accepted, what it
refused (with its status) and what was not sent, and why.

Saved as JSON beside the destination's state, one file per run
(``report-YYYYmmddTHHMMSS.json``, in UTC); statuses are written in hex, 0xA700.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.storage import durable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refused:
    """An instance the receiver answered with a failure status."""

    sop_instance_uid: str
    study_uid: str
    status: int
    comment: str = ""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = hex_status(self.status)
        return data


@dataclass(frozen=True)
class NotSent:
    """Instances that did not go, and why: one instance (its SOP Instance
    UID), or ``instances`` of a study (``sop_instance_uid`` empty)."""

    study_uid: str
    reason: str
    sop_instance_uid: str = ""
    instances: int = 1
    # Volumes to load before the study can be recalled.
    volumes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """One run of an export to one destination."""

    destination: str
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    sent: int = 0
    sent_bytes: int = 0
    sent_before: int = 0
    warnings: int = 0
    refused: list[Refused] = field(default_factory=list)
    not_sent: list[NotSent] = field(default_factory=list)
    # Why the run stopped before the end ("" when it went through).
    stopped: str = ""

    @property
    def not_sent_count(self) -> int:
        return sum(entry.instances for entry in self.not_sent)

    @property
    def ok(self) -> bool:
        return not (self.refused or self.not_sent or self.stopped)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["refused"] = [entry.as_json() for entry in self.refused]
        data["ok"] = self.ok
        return data

    def save(self, folder: Path) -> Path:
        """Write the report as JSON in ``folder``; its path."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started))
        path = folder / f"report-{stamp}.json"
        # Two runs within a second keep both reports (the export's lock
        # keeps other runs out meanwhile).
        number = 1
        while path.exists():
            number += 1
            path = folder / f"report-{stamp}-{number}.json"
        temporary = folder / f".{path.name}.tmp"
        try:
            temporary.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot write {path}") from exc
        durable.move_into_place(temporary, path, folder)
        return path


def hex_status(status: int) -> str:
    """A DICOM status as people and the standard write it: 0xA700."""
    return f"0x{status:04X}"
