"""The final report of a restore: every instance restored, missing or
corrupt, by UID, from the catalog as it stands.

An instance is *restored* once it has a verified online copy (or nearline
copy, for a study the configuration sends there); it is *left on the
mirror* when it belongs to an old study the configuration leaves there
until asked for. One that has neither is *corrupt* when the mirror (or a
volume) holds its pack but the pack failed to give it (recall then stopped
counting that copy), *missing* when the pack is not there or the instance
never reached the mirror, and *waiting* when its pack was not tried yet
(an interrupted run, or a volume on the shelf: run it again).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.catalog.store import Catalog
from appliance.hsm.tiers import NEARLINE, ONLINE
from appliance.restore.mirror import MirrorContents
from appliance.storage import durable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """An instance that is not back online, and why."""

    sop_instance_uid: str
    study_uid: str
    reason: str
    pack_id: str = ""


@dataclass
class Report:
    """What a restore achieved, instance by instance."""

    source: str
    restored: list[str] = field(default_factory=list)
    missing: list[Problem] = field(default_factory=list)
    corrupt: list[Problem] = field(default_factory=list)
    waiting: list[Problem] = field(default_factory=list)
    restored_bytes: int = 0
    left_on_mirror: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.waiting)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def save(self, folder: Path) -> Path:
        """Write the report as JSON in ``folder``; its path."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = folder / f"report-{stamp}.json"
        temporary = folder / f".{path.name}.tmp"
        temporary.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        durable.move_into_place(temporary, path, folder)
        return path


def final_report(
    catalog: Catalog,
    contents: MirrorContents,
    note: dict[str, Any],
    left_on_mirror: Collection[str] = (),
) -> Report:
    """Classify every instance of the catalog, and those that never reached
    the mirror (``note["lost"]``, from the rebuild); ``left_on_mirror``
    are the studies left there on purpose."""
    report = Report(str(note.get("source", "")))
    left = set(left_on_mirror)
    tier, where = contents.tier, contents.where
    with catalog.read() as txn:
        for uid, _data in catalog.all_records(txn, "instances"):
            record = catalog.instance(txn, uid)
            assert record is not None
            local = record.copy_on(ONLINE) or record.copy_on(NEARLINE)
            if local is not None:
                report.restored.append(uid)
                report.restored_bytes += record.size
                continue
            held = next((c for c in record.copies if c.tier == tier), None)
            if held is None:
                problem = Problem(uid, record.study_uid, f"no copy on {where}")
                report.missing.append(problem)
                continue
            pack_id = held.location.partition("/")[0]
            if held.verified and record.study_uid in left:
                report.left_on_mirror.append(uid)
            elif held.verified:
                problem = Problem(uid, record.study_uid, "not tried yet", pack_id)
                report.waiting.append(problem)
            elif pack_id in contents.packs:
                problem = Problem(uid, record.study_uid, "damaged in its pack", pack_id)
                report.corrupt.append(problem)
            else:
                problem = Problem(
                    uid, record.study_uid, f"its pack is not on {where}", pack_id
                )
                report.missing.append(problem)
    for lost in note.get("lost", []):
        report.missing.append(
            Problem(lost["sop_instance_uid"], lost["study"], "never reached the mirror")
        )
    # A pack whose manifest cannot be read hides which instances it holds:
    # unless the journal named them, they are not in the catalog at all, so
    # the pack itself is reported, and the restore is not a success.
    for pack_id, why in sorted(note.get("unreadable_packs", {}).items()):
        reason = f"pack unreadable, the instances it holds are unknown: {why}"
        report.missing.append(Problem("(unknown)", "(unknown)", reason, pack_id))
    return report
