"""A scrub run from the configuration: by command, or on the service's
schedule in a child process, a share of each tier at a time.

One run at a time holds ``scrub.lock`` in the data directory. The catalog
is opened for writing (a repair records copies); the tiers are opened as a
reader, and a pack repair takes the migration lock like any pack writer.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from appliance import logs
from appliance.catalog.copies import pack_counts
from appliance.catalog.store import Catalog
from appliance.children import die_with_parent, run_child
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.hsm.tier_folders import vet_tier_folders
from appliance.hsm.tiers import open_tiers
from appliance.replication.bandwidth import Limiter, parse_timetable
from appliance.scrub import state
from appliance.scrub.repair import Repairer
from appliance.scrub.scrubber import TIERS, PassReport, Progress, Scrubber
from appliance.storage.lock import TierLock

logger = logging.getLogger(__name__)

SCRUB_LOCK = "scrub.lock"


class ScrubBusy(ApplianceError):
    """Another scrub run holds the lock."""


def perform(
    config: Config,
    tiers: tuple[str, ...] = TIERS,
    study_uid: str | None = None,
    shares: bool = False,
    progress: Progress | None = None,
) -> list[PassReport]:
    """Scrub ``tiers``: one study's copies, each tier's share of the cycle
    (``shares``, the scheduled run) or the rest of each tier's pass."""
    # Before any tier is opened: the empty mount point of a disk that is not
    # mounted would get a new layout, and every copy on it would be lost.
    vet_tier_folders(config)
    lock = TierLock(config.data_dir, SCRUB_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        raise ScrubBusy("another scrub is running")
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    limiter = Limiter(
        parse_timetable(f"{config.get('scrub.rate_mb_per_s')}MB"), purpose="scrub"
    )
    try:
        opened = open_tiers(config, mirror=True)
        repairer = Repairer(
            catalog, opened, config.data_dir, config.get("migration.min_copies")
        )
        scrubber = Scrubber(
            catalog,
            opened,
            state.folder_of(config.data_dir),
            repairer,
            limiter,
            # A volume not read within a cycle is asked for.
            overdue=config.get("scrub.cycle_days") * 86400.0,
        )
        reports = []
        for tier in tiers:
            if study_uid is not None:
                reports.append(scrubber.run_study(study_uid, tier))
                continue
            budget = share(config, catalog, tier) if shares else None
            reports.append(scrubber.run_tier(tier, budget, progress))
        return reports
    finally:
        limiter.close()
        catalog.close()
        lock.release()


def share(config: Config, catalog: Catalog, tier: str) -> int:
    """How many copies of ``tier`` one scheduled run checks, so that the
    runs of ``scrub.cycle_days`` cover the whole tier."""
    every = _seconds_between_runs(config.get("scrub.schedule"))
    runs = max(1.0, config.get("scrub.cycle_days") * 86400 / every)

    # The tier's own copies: a pass skips the packs of the other tiers.
    sizes = state.pass_sizes(catalog.counts()["instances"], pack_counts(catalog))
    total = sizes[tier]
    return max(1, math.ceil(total / runs))


def _seconds_between_runs(schedule: str) -> float:
    trigger = CronTrigger.from_crontab(schedule)
    now = datetime.now().astimezone()
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    if first is None or second is None:
        return 86400.0
    return max(60.0, (second - first).total_seconds())


def schedule(scheduler: BackgroundScheduler, config: Config) -> None:
    """Add the scrub's scheduled runs to the service's scheduler."""
    scheduler.add_job(
        run_in_child,
        CronTrigger.from_crontab(config.get("scrub.schedule")),
        args=(config,),
        id="scrub",
        max_instances=1,
        coalesce=True,
    )
    logger.info(
        "scrub scheduled at %r: every copy checked within %d days at %g MB/s",
        config.get("scrub.schedule"),
        config.get("scrub.cycle_days"),
        config.get("scrub.rate_mb_per_s"),
    )


def run_in_child(config: Config) -> int:
    """One scheduled run in a child process; its exit code."""
    return run_child(run_scheduled, (config,), "scrub", background=True)


def run_scheduled(config: Config) -> None:
    """The child's work: each tier's share of the cycle."""
    die_with_parent()
    logs.setup_service(config)
    try:
        perform(config, shares=True)
    except ScrubBusy:
        logger.info("scrub skipped: another one is running")
