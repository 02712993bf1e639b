"""The final report of a restore: every instance restored, missing or
corrupt, by UID, from the catalog as it stands.

An instance is *restored* once it has a verified online copy (or nearline
copy, for a study the configuration sends there); it is *left on the
mirror* when it belongs to an old study the configuration leaves there
until asked for. One that has neither is *corrupt* when the mirror (or a
volume) holds its pack but the pack failed to give it (recall then stopped
counting that copy), *missing* when the pack is not there, could not be
read, or the instance never reached the mirror, and *waiting* when its
pack was not tried yet (an interrupted run, or a volume on the shelf: run
it again).

Why a pack failed to give an instance is what the run that tried it noted
(:mod:`.reasons`): its pack does not open, its member is damaged, past the
end of a pack cut short, not in the manifest, or decodes to other bytes
than the catalog's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.catalog.store import Catalog
from appliance.hsm import failures
from appliance.hsm.tiers import NEARLINE, ONLINE
from appliance.restore.mirror import MirrorContents
from appliance.restore.reasons import Noted
from appliance.storage import durable

logger = logging.getLogger(__name__)

# A copy that stopped counting with no reason noted: a recall outside the
# restore (a retrieval while it ran in the background) found it so, or a
# run stopped between the two.
_UNNOTED = "its pack did not give it back intact (no reason was noted)"


@dataclass(frozen=True)
class Problem:
    """An instance that is not back online, and why."""

    sop_instance_uid: str
    study_uid: str
    reason: str
    pack_id: str = ""
    # What went wrong, as a word a program can test: a kind of
    # :mod:`appliance.hsm.failures`, or one of the kinds below.
    cause: str = ""


# Causes the report itself finds.
NO_COPY = "no-copy"  # the catalog knows no copy where the restore reads
PACK_NOT_THERE = "pack-not-there"  # its pack is not on the mirror (volumes)
NEVER_REACHED = "never-reached"  # stored after the last upload
NOT_TRIED = "not-tried"  # an interrupted run, a volume on the shelf
PACK_UNKNOWN = "pack-unknown"  # a pack whose manifest cannot be read
UNNOTED = "unnoted"  # its copy stopped counting, no reason noted


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
    noted: Mapping[str, Noted] | None = None,
) -> Report:
    """Classify every instance of the catalog, and those that never reached
    the mirror (``note["lost"]``, from the rebuild); ``left_on_mirror``
    are the studies left there on purpose, ``noted`` why instances failed
    (:class:`.reasons.FailureLog`)."""
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
                problem = Problem(
                    uid, record.study_uid, f"no copy on {where}", cause=NO_COPY
                )
                report.missing.append(problem)
                continue
            pack_id = held.location.partition("/")[0]
            if held.verified and record.study_uid in left:
                report.left_on_mirror.append(uid)
            elif held.verified:
                problem = Problem(
                    uid, record.study_uid, "not tried yet", pack_id, NOT_TRIED
                )
                report.waiting.append(problem)
            elif pack_id in contents.packs:
                _failed(report, record.study_uid, uid, pack_id, (noted or {}).get(uid))
            else:
                problem = Problem(
                    uid,
                    record.study_uid,
                    f"its pack is not on {where}",
                    pack_id,
                    PACK_NOT_THERE,
                )
                report.missing.append(problem)
    for lost in note.get("lost", []):
        report.missing.append(
            Problem(
                lost["sop_instance_uid"],
                lost["study"],
                "never reached the mirror",
                cause=NEVER_REACHED,
            )
        )
    # A pack whose manifest cannot be read hides which instances it holds:
    # unless the journal named them, they are not in the catalog at all, so
    # the pack itself is reported, and the restore is not a success.
    for pack_id, why in sorted(note.get("unreadable_packs", {}).items()):
        reason = f"pack unreadable, the instances it holds are unknown: {why}"
        unknown = Problem("(unknown)", "(unknown)", reason, pack_id, PACK_UNKNOWN)
        report.missing.append(unknown)
    return report


def _failed(
    report: Report, study_uid: str, uid: str, pack_id: str, noted: Noted | None
) -> None:
    """An instance whose pack is there but did not give it: corrupt, or
    missing when the pack could not be read at all."""
    if noted is None or noted.pack_id != pack_id:
        report.corrupt.append(Problem(uid, study_uid, _UNNOTED, pack_id, UNNOTED))
        return
    failure = noted.failure
    problem = Problem(uid, study_uid, failure.describe(), pack_id, failure.kind)
    if failure.kind == failures.PACK_UNREAD:
        report.missing.append(problem)
    else:
        report.corrupt.append(problem)
