"""One run of a restore's data phase, the same from ``appliance restore``
and from the service, which restores in the background while it serves.

The run plans, restores for a while, and plans again, so that patients the
RIS books meanwhile move to the front; it ends when every planned study
was tried, writes the final report and clears the pending mark, even when
a stop was asked for during the last study. Stopped early, it leaves the
mark, and the next run (the command again, or the service) continues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from appliance import audit
from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.errors import StorageError
from appliance.hsm.tiers import NEARLINE, ONLINE, Tiers
from appliance.replication.bandwidth import Limiter
from appliance.restore.cache import PackCache
from appliance.restore.data import DataRestore, Placement, Plan
from appliance.restore.export import rebuilt_note
from appliance.restore.mirror import MirrorContents
from appliance.restore.progress import Tracker, clear_pending
from appliance.restore.reasons import FailureLog
from appliance.restore.report import Report, final_report
from appliance.storage.keys import KeyStore

logger = logging.getLogger(__name__)

# Seconds between two plans of one run.
REPLAN_EVERY = 300.0


def restore_folder(config: Config) -> Path:
    return config.restore_folder


def placement(config: Config) -> Placement:
    return Placement(
        config.get("restore.online_days"), config.get("restore.older_studies")
    )


def run_data_phase(
    config: Config,
    catalog: Catalog,
    keys: KeyStore,
    cache: PackCache,
    contents: MirrorContents,
    tracker: Tracker,
    stopping: Callable[[], bool] = lambda: False,
    before_fetch: Callable[[], None] | None = None,
    replan_every: float = REPLAN_EVERY,
    limiter: Limiter | None = None,
) -> Report | None:
    """Restore until every planned study was tried; the final report, or
    None when ``stopping()`` ended the run first. With ``limiter`` (the
    rate packs are fetched at), a paused timetable is shown as such."""
    folder = restore_folder(config)

    def fetching() -> None:
        if limiter is not None:
            _say_if_paused(limiter, tracker)
        if before_fetch is not None:
            before_fetch()

    restorer = DataRestore(
        catalog,
        config.online_path,
        config.get("storage.reserved_bytes"),
        keys,
        cache,
        contents,
        folder,
        placement(config),
        to_nearline=NearlineMover(config, catalog, keys).move,
        before_fetch=fetching,
    )
    while True:
        plan = restorer.plan()
        tracker.planned(
            len(plan.studies), plan.bytes, plan.expected, len(plan.left_on_mirror)
        )
        _log_plan(plan)
        tried = restorer.run(
            plan,
            lambda done, _total, what: tracker.advanced(done, what),
            _until(stopping, time.monotonic() + replan_every),
        )
        # A stop asked for during the last study came too late to leave
        # anything undone: the restore is over, and its mark goes with it.
        if tried == len(plan.studies):
            break
        if stopping():
            tracker.state("stopped", "run the restore again to continue")
            return None

    report = final_report(
        catalog,
        contents,
        rebuilt_note(catalog) or {},
        plan.left_on_mirror,
        FailureLog(folder).read(),
    )
    path = report.save(folder)
    clear_pending(folder)
    tracker.snapshot.report = str(path)
    tracker.state("done")
    _log_report(report, path)
    problems = len(report.missing) + len(report.corrupt) + len(report.waiting)
    audit.restore_finished(
        config,
        "restore",
        report.source,
        f"{len(report.restored)} instance(s) restored",
        f"{problems} instance(s) missing, corrupt or waiting" if problems else "",
    )
    return report


class NearlineMover:
    """Packs a restored study onto the nearline tier and releases its online
    copies, as a migration would (it waits for a running one to finish)."""

    def __init__(self, config: Config, catalog: Catalog, keys: KeyStore) -> None:
        self.config = config
        self.catalog = catalog
        self.keys = keys

    def move(self, study_uid: str) -> None:
        from appliance.hsm.migrator import Migrator
        from appliance.hsm.scheduler import MIGRATION_LOCK
        from appliance.hsm.tier_folders import nearline_tier, online_tier
        from appliance.storage.lock import TierLock

        lock = TierLock(self.config.data_dir, MIGRATION_LOCK)
        if not lock.acquire(exclusive=True, wait=3600.0):
            logger.warning("study %s stays online: a migration runs on", study_uid)
            return
        try:
            online = online_tier(self.config)
            nearline = nearline_tier(self.config)
            nearline.open(writer=True)
            tiers = Tiers(online, {NEARLINE: nearline}, self.keys)
            outcomes = Migrator(self.catalog, tiers).move(study_uid, ONLINE, NEARLINE)
        except StorageError as exc:
            logger.error("study %s stays online: %s", study_uid, exc)
            return
        finally:
            lock.release()
        for outcome in outcomes:
            if not outcome.ok:
                logger.error(
                    "study %s: %s to %s: %s",
                    study_uid,
                    outcome.action,
                    outcome.tier,
                    outcome.problem,
                )


def _say_if_paused(limiter: Limiter, tracker: Tracker) -> None:
    """Show a paused timetable in the numbers, with when it ends."""
    status = limiter.status()
    if status["rate"] != 0.0:
        return
    until = status["until"] or ""
    when = f" until {until[11:16]}" if len(until) >= 16 else ""
    tracker.state("paused", f"paused by restore.timetable{when}")


def _until(stopping: Callable[[], bool], deadline: float) -> Callable[[], bool]:
    """Stop when asked to, or at ``deadline`` to plan again."""
    return lambda: stopping() or time.monotonic() > deadline


def _log_plan(plan: Plan) -> None:
    logger.info(
        "restore plan: %d studies (%d of patients expected soon), %d instances, "
        "%d bytes; %d studies left on the mirror",
        len(plan.studies),
        plan.expected,
        plan.instances,
        plan.bytes,
        len(plan.left_on_mirror),
    )


def _log_report(report: Report, path: Path) -> None:
    level = logging.INFO if report.ok else logging.ERROR
    logger.log(
        level,
        "restore over: %d instances restored and verified, %d left on the mirror, "
        "%d missing, %d corrupt; report %s",
        len(report.restored),
        len(report.left_on_mirror),
        len(report.missing),
        len(report.corrupt),
        path,
    )
