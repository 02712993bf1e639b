"""Restore from offline volumes, the data phase: every instance recalled
from its volume, newest studies first.

Each study is recalled as any study is (:class:`~appliance.hsm.recall.Recaller`
over the offline tier): its packs are read from their volumes, every
instance is extracted, checked against the manifest and the catalog's
SHA-256, written durably under a new online key, and the study's online
copies are recorded in one transaction. The files of a study a killed run
was writing are removed by the next one (:mod:`.staging`).

The offline tier reads in *salvage* mode: a pack whose bytes differ from
its record (found so in the catalog phase) still gives every instance that
checks out. Those instances then keep their offline copy, no longer
counted as verified: the bytes on the volume are not the ones verified
when the pack was written, so the migration rules copy them again.

An instance whose volume is on the shelf stays where it is: recall asks
for the volume (an operator request), and the next run restores it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.catalog import copies
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.hsm.recall import Recaller, RecallResult
from appliance.hsm.tiers import OFFLINE, ONLINE, Tiers
from appliance.restore.data import share_progress
from appliance.restore.mirror import MirrorContents, RemoteFile
from appliance.restore.reasons import FailureLog, Noted
from appliance.restore.report import Problem, Report, final_report
from appliance.restore.staging import NotedOnlineTier, StagingNote
from appliance.storage.keys import KeyStore
from appliance.storage.offline import OfflineTier
from appliance.storage.volumes import VolumeLibrary

logger = logging.getLogger(__name__)

# Called with (bytes restored so far, bytes to restore, what happens now).
Progress = Callable[[int, int, str], None]

_WHY = "a restore from volumes needs it"


@dataclass
class VolumePlan:
    """The studies to restore, newest first, and their size."""

    studies: list[str] = field(default_factory=list)
    instances: int = 0
    bytes: int = 0


class VolumeDataRestore:
    """Brings every instance that is not online back from its volume."""

    def __init__(
        self,
        catalog: Catalog,
        online_root: Path,
        reserved_bytes: int,
        keys: KeyStore,
        offline: OfflineTier,
        state_folder: Path,
        damaged: set[str],
    ) -> None:
        self.catalog = catalog
        self.damaged = damaged
        self.note = StagingNote(state_folder / "staging")
        self.failures = FailureLog(state_folder)
        self.online = NotedOnlineTier(online_root, reserved_bytes, self.note)
        self.online.open()
        tiers = Tiers(self.online, {OFFLINE: offline}, keys)
        self.recaller = Recaller(catalog, tiers, failed=self._note_failures)
        # Volumes recall waited for: they are on the shelf.
        self.waiting_for: list[str] = []
        # Whether the last run was stopped before its last study.
        self.stopped = False

    def plan(self) -> VolumePlan:
        """What is left to restore, after tidying an interrupted run."""
        self.online.discard_incoming()
        self.note.clean_up(self.catalog, self.online)
        plan = VolumePlan()
        dates: dict[str, tuple[str, float]] = {}
        with self.catalog.read() as txn:
            for uid, _data in self.catalog.all_records(txn, "instances"):
                record = self.catalog.instance(txn, uid)
                if record is None or record.copy_on(ONLINE) is not None:
                    continue
                if record.copy_on(OFFLINE) is None:
                    continue  # no verified copy on a volume: reported
                plan.instances += 1
                plan.bytes += record.size
                if record.study_uid not in dates:
                    study = self.catalog.get(txn, "studies", record.study_uid) or {}
                    date = study.get("attrs", {}).get("StudyDate", "")
                    dates[record.study_uid] = (date, study.get("received", 0.0))
        plan.studies = sorted(dates, key=dates.__getitem__, reverse=True)
        self._distrust_damaged(self._online_from_damaged())
        return plan

    def run(
        self,
        plan: VolumePlan,
        progress: Progress | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> int:
        """Restore the planned studies until done or ``stopping()`` (asked
        between two studies); the instances staged online."""
        done_bytes = 0
        staged = 0
        self.stopped = False
        for number, study_uid in enumerate(plan.studies, 1):
            if stopping():
                self.stopped = True
                break
            records = [
                r
                for r in copies.instances_of(self.catalog, study_uid)
                if r.copy_on(ONLINE) is None and r.copy_on(OFFLINE) is not None
            ]
            size = sum(r.size for r in records)
            what = f"study {number} of {len(plan.studies)}"
            # Stop before a full disk makes recall take good packs for bad.
            self.online.check_room(size)
            self.note.begin(study_uid)
            try:
                result = self.recaller.recall(
                    study_uid,
                    share_progress(progress, done_bytes, size, plan.bytes, what),
                    _WHY,
                )
            finally:
                self.note.close()
            self.note.end()
            staged += result.staged
            done_bytes += size
            self._distrust_damaged(records)
            for volume in result.waiting_for:
                if volume not in self.waiting_for:
                    self.waiting_for.append(volume)
            if progress is not None:
                progress(done_bytes, plan.bytes, what)
        return staged

    def _note_failures(self, result: RecallResult) -> None:
        """Keep why each instance failed, for the report."""
        self.failures.note_recall(result)

    def _online_from_damaged(self) -> list[InstanceRecord]:
        """Online instances whose verified offline copy is in a damaged
        pack (restored before the catalog was rebuilt again)."""
        found = []
        with self.catalog.read() as txn:
            for uid, _data in self.catalog.all_records(txn, "instances"):
                record = self.catalog.instance(txn, uid)
                copy = record.copy_on(OFFLINE) if record is not None else None
                if record is None or copy is None or not record.copy_on(ONLINE):
                    continue
                if copy.location.partition("/")[0] in self.damaged:
                    found.append(record)
        return found

    def _distrust_damaged(self, records: list[InstanceRecord]) -> None:
        """Instances restored from a damaged pack: their copy there no
        longer counts as verified (see the module)."""
        by_pack: dict[str, list[str]] = {}
        for record in records:
            copy = record.copy_on(OFFLINE)
            pack_id = copy.location.partition("/")[0] if copy else ""
            if pack_id in self.damaged:
                by_pack.setdefault(pack_id, []).append(record.sop_instance_uid)
        for pack_id, uids in by_pack.items():
            with self.catalog.read() as txn:
                back = [
                    uid
                    for uid in uids
                    if (found := self.catalog.instance(txn, uid)) is not None
                    and found.copy_on(ONLINE) is not None
                ]
            changed = copies.mark_unverified(self.catalog, pack_id, back)
            if not changed:
                continue
            logger.warning(
                "pack %s is damaged: %d instance(s) restored from it; their "
                "copies there no longer count as verified",
                pack_id,
                changed,
            )


def final_volume_report(
    catalog: Catalog,
    note: dict[str, Any],
    unread: list[str],
    library: VolumeLibrary,
    noted: dict[str, Noted] | None = None,
) -> Report:
    """The restore's report (:mod:`.report`), naming the volumes on the
    shelf that instances wait for, and those whose packs were not read;
    ``noted`` says why instances failed."""
    contents = MirrorContents(tier=OFFLINE)
    with catalog.read() as txn:
        for pack_id, data in catalog.all_records(txn, "packs"):
            if data.get("tier") == OFFLINE:
                contents.packs[pack_id] = RemoteFile(data["location"], data["size"])
    report = final_report(catalog, contents, note, (), noted)
    shelved = {
        volume.label for volume in library.list_volumes() if not volume.reachable
    }
    report.waiting = [_on_the_shelf(p, contents, shelved) for p in report.waiting]
    for volume in unread:
        reason = (
            f"volume {volume} was not read (on the shelf): the instances it "
            "holds are unknown; load it and run the restore again"
        )
        report.waiting.append(Problem("(unknown)", "(unknown)", reason))
    return report


def _on_the_shelf(
    problem: Problem, contents: MirrorContents, shelved: set[str]
) -> Problem:
    remote = contents.packs.get(problem.pack_id)
    volume = remote.name.partition("/")[0] if remote is not None else ""
    if volume not in shelved:
        return problem
    return replace(problem, reason=f"waiting for volume {volume} to be loaded")
