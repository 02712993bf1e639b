"""The second phase of a restore: the instances, back online.

Studies are restored in the order of :mod:`.order` (patients expected
soon first, then newest first), and some are left on the mirror or packed
onto nearline as the configuration says. For each, the packs holding its
instances are fetched into the pack cache, then the study is recalled like
any other: every instance is extracted, checked against the manifest and
the catalog's SHA-256, written durably under a new online key, and the
study's online copies are recorded in one transaction. A pack is dropped
from the cache once every instance it holds for the restore was tried.

Run again after an interruption, it skips the studies already online and
removes the files the interrupted study left (:mod:`.staging`): nothing is
restored twice. Instances keep their off-site copies and nothing is queued,
so replication sends none of them again.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.catalog import copies, replication
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError
from appliance.hsm.recall import Progress as RecallProgress
from appliance.hsm.recall import Recaller, RecallResult
from appliance.hsm.tiers import NEARLINE, ONLINE, Tiers
from appliance.restore.ahead import FetchAhead, FetchJob, abandon_if
from appliance.restore.cache import MirrorTier, PackCache
from appliance.restore.mirror import MirrorContents, Received
from appliance.restore.order import (
    MIRROR_TARGET,
    StudyFacts,
    facts_of,
    order,
    upcoming_patients,
)
from appliance.restore.reasons import FailureLog
from appliance.restore.salvage import salvage
from appliance.restore.staging import NotedOnlineTier, StagingNote
from appliance.storage.keys import KeyStore
from appliance.storage.packs import PackReader

logger = logging.getLogger(__name__)

# Called with (bytes restored so far, bytes to restore, what happens now).
Progress = Callable[[int, int, str], None]

# Instances of a pack extracted at once. Decoding takes the cores there
# are; most of the rest is the wait for each file's fsync, and the disk
# serves several of those in one journal commit.
EXTRACT_THREADS = 8


@dataclass(frozen=True)
class Placement:
    """Where studies go (see :mod:`.order`)."""

    online_days: int = 0
    older_studies: str = MIRROR_TARGET


@dataclass
class Plan:
    """The studies to restore, first first, and what they need."""

    studies: list[str] = field(default_factory=list)
    instances: int = 0
    bytes: int = 0
    # pack id -> instances still to restore from it
    packs: Counter[str] = field(default_factory=Counter)
    to_nearline: set[str] = field(default_factory=set)
    left_on_mirror: list[str] = field(default_factory=list)
    expected: int = 0  # studies of patients with an upcoming appointment


class DataRestore:
    """Brings every instance that is not online back from the mirror."""

    def __init__(
        self,
        catalog: Catalog,
        online_root: Path,
        reserved_bytes: int,
        keys: KeyStore,
        cache: PackCache,
        contents: MirrorContents,
        state_folder: Path,
        placement: Placement | None = None,
        to_nearline: Callable[[str], None] | None = None,
        before_fetch: Callable[[], None] | None = None,
    ) -> None:
        """``to_nearline`` moves a restored study to the nearline tier;
        ``before_fetch`` is called before each study's packs are waited
        for, and before each pack is fetched, in the fetch thread (a
        recall someone waits for goes first)."""
        self.catalog = catalog
        self.keys = keys
        self.placement = placement or Placement()
        self.to_nearline = to_nearline
        self.before_fetch = before_fetch
        self.cache = cache
        self.contents = contents
        self.note = StagingNote(state_folder / "staging")
        self.failures = FailureLog(state_folder)
        self.online = NotedOnlineTier(online_root, reserved_bytes, self.note)
        self.online.open()
        tiers = Tiers(self.online, {OFFSITE: MirrorTier(cache)}, keys)
        self.recaller = Recaller(
            catalog, tiers, EXTRACT_THREADS, failed=self._note_failures
        )
        self._fetch_hook = threading.Lock()

    def plan(self) -> Plan:
        """What is left to restore, after tidying an interrupted run."""
        self.online.discard_incoming()
        self.note.clean_up(self.catalog, self.online)
        facts: dict[str, StudyFacts] = {}
        needed: dict[str, list[InstanceRecord]] = {}
        with self.catalog.read() as txn:
            for uid, _data in self.catalog.all_records(txn, "instances"):
                record = self.catalog.instance(txn, uid)
                if record is None or record.copy_on(ONLINE) is not None:
                    continue
                if record.copy_on(NEARLINE) is not None:
                    continue  # restored onto nearline by an earlier run
                if _pack_of(record) is None:
                    continue  # no verified copy on the mirror: reported
                needed.setdefault(record.study_uid, []).append(record)
                if record.study_uid not in facts:
                    study = self.catalog.get(txn, "studies", record.study_uid) or {}
                    facts[record.study_uid] = facts_of(record.study_uid, study)
        chosen = order(
            list(facts.values()),
            upcoming_patients(self.catalog),
            self.placement.online_days,
            self.placement.older_studies,
        )
        plan = Plan(
            studies=chosen.studies,
            to_nearline=chosen.to_nearline,
            left_on_mirror=chosen.left_on_mirror,
            expected=chosen.expected,
        )
        for study_uid in plan.studies:
            for record in needed[study_uid]:
                plan.instances += 1
                plan.bytes += record.size
                plan.packs[_pack_of(record) or ""] += 1
        # Packs fetched by an earlier run that no instance needs any more.
        self.cache.drop_all(keep=plan.packs)
        return plan

    def run(
        self,
        plan: Plan,
        progress: Progress | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> int:
        """Restore the planned studies until done or ``stopping()``; how
        many studies were tried. The next study's packs are fetched while
        a study is extracted (:mod:`.ahead`)."""
        ahead = FetchAhead()
        try:
            with self.recaller.kept_threads():
                return self._run(plan, ahead, progress, stopping)
        finally:
            ahead.close()

    def _run(
        self,
        plan: Plan,
        ahead: FetchAhead,
        progress: Progress | None,
        stopping: Callable[[], bool],
    ) -> int:
        done_bytes = 0
        tried = 0
        for number, study_uid in enumerate(plan.studies, 1):
            if stopping():
                break
            records = self._missing(study_uid)
            size = sum(r.size for r in records)
            what = f"study {number} of {len(plan.studies)}"
            # Stop before a full disk makes recall take good packs for bad.
            self.online.check_room(size)
            if progress is not None:
                progress(done_bytes, plan.bytes, f"{what}: fetching its packs")
            self._before_fetch()
            needed = _packs_of(records)
            ahead.ask(study_uid, self._fetch_job(needed, needed))
            ahead.wait(study_uid)
            if number < len(plan.studies):
                following = plan.studies[number]
                later = _packs_of(self._missing(following))
                ahead.ask(following, self._fetch_job(later, needed | later))
            self.note.begin(study_uid)
            try:
                self.recaller.recall(
                    study_uid,
                    share_progress(progress, done_bytes, size, plan.bytes, what),
                )
                self._salvage(study_uid, records)
            finally:
                self.note.close()
            self.note.end()
            tried += 1
            done_bytes += size
            self._send_again(records)
            self._forget_packs(records, plan)
            if study_uid in plan.to_nearline and self.to_nearline is not None:
                self.to_nearline(study_uid)
            if progress is not None:
                progress(done_bytes, plan.bytes, what)
        return tried

    def _missing(self, study_uid: str) -> list[InstanceRecord]:
        """The study's instances neither online nor on nearline."""
        return [
            r
            for r in copies.instances_of(self.catalog, study_uid)
            if r.copy_on(ONLINE) is None and r.copy_on(NEARLINE) is None
        ]

    def _before_fetch(self) -> None:
        # Called from both threads; one at a time (it may take a lock file).
        if self.before_fetch is not None:
            with self._fetch_hook:
                self.before_fetch()

    def _fetch_job(self, needed: set[str], keep: set[str]) -> FetchJob:
        """A fetch of the packs in ``needed`` that makes room in the cache
        without dropping those in ``keep`` (being read, or about to be)."""

        def job(abandoned: Callable[[], bool]) -> None:
            self._fetch_packs(needed, keep, abandon_if(abandoned))

        return job

    def _fetch_packs(
        self, needed: set[str], keep: set[str], received: Received
    ) -> None:
        """Fetch the packs the study's instances are in, if the mirror has
        them; a recall someone waits for goes before each pack."""
        for pack_id in sorted(needed):
            remote = self.contents.packs.get(pack_id)
            if remote is None:
                logger.error("pack %s is not on the mirror", pack_id)
                continue
            if not self.cache.holds(pack_id):
                self._before_fetch()
            with self.catalog.read() as txn:
                pack = self.catalog.get(txn, "packs", pack_id) or {}
            self.cache.fetch(
                pack_id, remote, pack.get("sha256"), received, keep, flush=False
            )

    def _salvage(self, study_uid: str, records: list[InstanceRecord]) -> None:
        """Instances recall could not give, taken out of their cached pack
        member by member when its manifest is lost (a pack cut short)."""
        online = {
            r.sop_instance_uid
            for r in copies.instances_of(self.catalog, study_uid)
            if r.copy_on(ONLINE) is not None
        }
        by_pack: dict[str, list[InstanceRecord]] = {}
        for record in records:
            pack_id = _pack_of(record)
            if pack_id and record.sop_instance_uid not in online:
                by_pack.setdefault(pack_id, []).append(record)
        for pack_id, left in by_pack.items():
            if not self.cache.holds(pack_id) or not _manifest_lost(
                self.cache.path_of(pack_id), self.keys
            ):
                continue
            with self.catalog.read() as txn:
                data = self.catalog.get(txn, "packs", pack_id)
            if data is not None:
                salvaged = salvage(
                    self.catalog,
                    self.online,
                    self.keys,
                    self.cache.path_of(pack_id),
                    PackRecord.from_json(data),
                    left,
                )
                self.failures.add(pack_id, salvaged.failures)

    def _note_failures(self, result: RecallResult) -> None:
        """Keep why each instance failed, for the report (see :mod:`.reasons`)."""
        self.failures.note_recall(result)

    def _send_again(self, records: list[InstanceRecord]) -> None:
        """Instances restored from a pack whose bytes on the mirror differ
        from its record lose that off-site copy and are queued for the
        mirror again: the copy is not what was verified, and would count
        for min_copies until the rolling audit came round to it."""
        by_pack: dict[str, list[str]] = {}
        for record in records:
            pack_id = _pack_of(record)
            if pack_id in self.cache.damaged:
                by_pack.setdefault(pack_id, []).append(record.sop_instance_uid)
        for pack_id, uids in by_pack.items():
            with self.catalog.read() as txn:
                data = self.catalog.get(txn, "packs", pack_id)
                back = [
                    uid
                    for uid in uids
                    if (found := self.catalog.instance(txn, uid)) is not None
                    and found.copy_on(ONLINE) is not None
                ]
            if data is None or not back:
                continue
            queued = replication.requeue(self.catalog, PackRecord.from_json(data), back)
            logger.warning(
                "pack %s on the mirror is damaged: %d instance(s) restored from "
                "it are queued to be sent again",
                pack_id,
                queued,
            )

    def _forget_packs(self, records: list[InstanceRecord], plan: Plan) -> None:
        """Count the study's instances as tried; drop packs done with."""
        for record in records:
            pack_id = _pack_of(record)
            if pack_id is None:
                continue
            plan.packs[pack_id] -= 1
            if plan.packs[pack_id] <= 0:
                del plan.packs[pack_id]
                self.cache.drop(pack_id)


def _packs_of(records: list[InstanceRecord]) -> set[str]:
    return {p for r in records if (p := _pack_of(r))}


def _manifest_lost(path: Path, keys: KeyStore) -> bool:
    """Whether the pack at ``path`` opens but its manifest cannot be read."""
    try:
        with PackReader.open(path, keys) as reader:
            reader.manifest()
    except ApplianceError:
        return True
    return False


def _pack_of(record: InstanceRecord) -> str | None:
    """The pack of the instance's verified off-site copy."""
    copy = record.copy_on(OFFSITE)
    return copy.location.partition("/")[0] if copy is not None else None


def share_progress(
    progress: Progress | None, base: int, size: int, total: int, what: str
) -> RecallProgress | None:
    """A recall's progress (instances of one study) as restore progress."""
    if progress is None:
        return None

    def report(done: int, count: int) -> None:
        progress(base + size * done // max(count, 1), total, what)

    return report
