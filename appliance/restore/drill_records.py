"""The results of restore drills, one JSON file each, in ``DATA_DIR/drills/``.

A file is named by the drill's start in UTC, so that names sort by time::

    drills/drill-20261201T040000Z.json

    {"date": "2026-12-01T04:00:00Z", "ok": false,
     "sample": ["1.2.826...1", ...], "instances": 212,
     "bytes": 104857600, "mirror_bytes": 98304000, "seconds": 12.5,
     "rate": 8388608.0,
     "failures": [{"study_uid": "...", "sop_instance_uid": "...",
                   "what": "SHA-256 differs from the catalog's"}]}

``bytes`` are those of the instances restored and verified, ``rate`` those
bytes per second; ``mirror_bytes`` what was read from the mirror.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.restore.drill import DrillResult
from appliance.storage import durable

logger = logging.getLogger(__name__)

_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class DrillRecord:
    """One drill's result as it was recorded."""

    date: str
    ok: bool
    studies: int
    instances: int
    bytes: int
    mirror_bytes: int
    seconds: float
    rate: float
    failures: int
    path: Path


def as_json(result: DrillResult) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.started)),
        "ok": result.ok,
        "sample": result.studies,
        "instances": result.instances,
        "bytes": result.bytes,
        "mirror_bytes": result.mirror_bytes,
        "seconds": round(result.seconds, 3),
        "rate": round(result.rate, 1),
        "failures": [
            {
                "study_uid": failure.study_uid,
                "sop_instance_uid": failure.sop_instance_uid,
                "what": failure.what,
            }
            for failure in result.failures
        ],
    }


def save(folder: Path, result: DrillResult) -> Path:
    """Write the result durably as ``folder/drill-<UTC start>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(_STAMP, time.gmtime(result.started))
    path = folder / f"drill-{stamp}.json"
    number = 1
    while path.exists():  # two drills in one second: the second one's name
        number += 1
        path = folder / f"drill-{stamp}-{number}.json"
    temporary = folder / f".{path.name}.tmp"
    try:
        temporary.write_text(json.dumps(as_json(result), indent=1) + "\n")
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise durable.translate_os_error(exc, f"cannot write {path}") from exc
    durable.move_into_place(temporary, path, folder)
    return path


def recent(folder: Path, count: int) -> list[DrillRecord]:
    """The last ``count`` drills recorded in ``folder``, oldest first; a file
    that does not read is left out with a warning."""
    found = []
    for path in sorted(folder.glob("drill-*.json"), key=_by_time)[-count:]:
        try:
            found.append(_record(path, json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("drill record %s does not read: %s", path, exc)
    return found


def _by_time(path: Path) -> tuple[str, int, str]:
    """drill-STAMP.json before drill-STAMP-2.json, whatever '-' and '.' sort."""
    return path.stem[6:22], len(path.stem), path.stem


def _record(path: Path, data: dict[str, Any]) -> DrillRecord:
    return DrillRecord(
        date=str(data["date"]),
        ok=bool(data["ok"]),
        studies=len(data["sample"]),
        instances=int(data["instances"]),
        bytes=int(data["bytes"]),
        mirror_bytes=int(data["mirror_bytes"]),
        seconds=float(data["seconds"]),
        rate=float(data["rate"]),
        failures=len(data["failures"]),
        path=path,
    )
