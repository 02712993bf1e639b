"""When background jobs run inside the service: the migration rules on their
schedule, the watermarks every few minutes, the prefetch planner at its
interval, restore drills and the scrub on theirs.

Each run is a child process, so that compressing packs never slows the
DICOM workers' share of the machine beyond the I/O rate cap, and so that a
run that dies takes nothing else with it. A lock file keeps the service's
runs and ``appliance migrate --now`` from overlapping.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from appliance import logs
from appliance.children import die_with_parent, run_child
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.prefetch import process as prefetch_process

logger = logging.getLogger(__name__)

MIGRATION_LOCK = "migration.lock"


def start(config: Config) -> BackgroundScheduler | None:
    """Start the migration, prefetch, drill and scrub schedules, or None
    when all are disabled."""
    migration = config.get("migration.enabled")
    prefetch = config.get("prefetch.enabled")
    drills = bool(config.get("drills.schedule"))
    scrub = bool(config.get("scrub.schedule"))
    if not migration:
        logger.info("migration is disabled (migration.enabled = false)")
    if not migration and not prefetch and not drills and not scrub:
        return None
    # APScheduler logs every run at INFO; the runs log what they do.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = BackgroundScheduler(timezone=datetime.now().astimezone().tzinfo)
    if migration:
        _schedule_migration(scheduler, config)
    if prefetch:
        # The first run soon after start: appointments may be due today.
        scheduler.add_job(
            prefetch_process.check_and_run,
            IntervalTrigger(seconds=config.get("prefetch.interval")),
            args=(config,),
            id="prefetch",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC) + timedelta(seconds=5),
        )
        logger.info("prefetch planned every %g s", config.get("prefetch.interval"))
    if drills:
        from appliance.restore import drill_job

        drill_job.schedule(scheduler, config)
    if scrub:
        from appliance.scrub import job as scrub_job

        scrub_job.schedule(scheduler, config)
    scheduler.start()
    return scheduler


def _schedule_migration(scheduler: BackgroundScheduler, config: Config) -> None:
    scheduler.add_job(
        run_in_child,
        CronTrigger.from_crontab(config.get("migration.schedule")),
        args=(config, False),
        id="migration",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        check_watermarks,
        IntervalTrigger(seconds=config.get("migration.watermark_interval")),
        args=(config,),
        id="watermarks",
        max_instances=1,
        coalesce=True,
    )
    logger.info(
        "migration scheduled: rules at %r, watermarks every %g s",
        config.get("migration.schedule"),
        config.get("migration.watermark_interval"),
    )


def check_watermarks(config: Config) -> None:
    """Release studies, in a child process, only when a tier is above its
    high watermark: the check itself reads two counters and is cheap
    enough to run every few seconds."""
    from appliance.catalog.store import peek
    from appliance.hsm.jobs import above_high_watermark

    try:
        with peek(config.catalog_path) as catalog:
            above = above_high_watermark(config, catalog.counts())
    except ApplianceError as exc:
        logger.error("watermark check: %s", exc)
        return
    if above:
        logger.info("above the high watermark: %s; releasing", ", ".join(above))
        run_in_child(config, watermarks_only=True)


def run_in_child(config: Config, watermarks_only: bool) -> int:
    """Run one migration in a child process; its exit code."""
    return run_child(
        run_migration, (config, watermarks_only), "migration", background=True
    )


def run_migration(config: Config, watermarks_only: bool) -> None:
    """Plan and carry out one migration (the child process's work)."""
    die_with_parent()
    logs.setup_service(config)
    from appliance.catalog.store import Catalog
    from appliance.hsm.jobs import MigrationJob
    from appliance.hsm.tiers import open_tiers
    from appliance.storage.lock import TierLock

    lock = TierLock(config.data_dir, MIGRATION_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        logger.info("migration skipped: another one is running")
        return
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        job = MigrationJob(catalog, open_tiers(config, writer=True), config)
        plan = job.plan(datetime.now(UTC), watermarks_only=watermarks_only)
        for warning in plan.warnings:
            logger.warning("migration: %s", warning)
        if plan.actions:
            job.run(plan)
    finally:
        catalog.close()
        lock.release()
