"""A restore drill run from the configuration: by ``appliance dr drill``,
and by the service on ``drills.schedule``, each scheduled run in a child
process of its own.

A drill takes no lock of the archive's (it runs while the appliance
serves): it opens the catalog read-only and writes only under
``DATA_DIR/drills/``, where ``drill.lock`` keeps two drills from running
at once and each drill's scratch folder is removed when it ends.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from datetime import datetime
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from appliance import audit, logs
from appliance.catalog.store import Catalog, catalog_exists
from appliance.children import die_with_parent, run_child
from appliance.config import Config
from appliance.errors import ApplianceError, DrillError, TransportError
from appliance.replication.bandwidth import Limiter, parse_timetable
from appliance.replication.process import open_mirror
from appliance.restore import drill_records
from appliance.restore.drill import Drill, DrillResult, Progress, choose_sample
from appliance.restore.mirror import Fetcher, survey
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.lock import TierLock

logger = logging.getLogger(__name__)

DRILL_LOCK = "drill.lock"
_SCRATCH = "scratch"


def drills_folder(config: Config) -> Path:
    """Where drills keep their records (and, while one runs, its scratch)."""
    return config.data_dir / "drills"


def perform(
    config: Config,
    studies: int,
    progress: Progress | None = None,
    chance: random.Random | None = None,
) -> tuple[DrillResult, Path]:
    """Run one drill of ``studies`` studies and record it: the result and
    the record's path. DrillError when no drill can run."""
    if not catalog_exists(config.catalog_path):
        raise DrillError(f"no catalog at {config.catalog_path}: nothing to drill")
    folder = drills_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    lock = TierLock(folder, DRILL_LOCK)
    if not lock.acquire(exclusive=True):
        raise DrillError("another restore drill is running")
    scratch = folder / _SCRATCH
    try:
        # A drill killed half way left its scratch folder: nobody else uses it.
        shutil.rmtree(scratch, ignore_errors=True)
        keys = KeyStore.load(key_store_path(config.data_dir))
        catalog = Catalog(
            config.catalog_path, config.get("storage.catalog_max_size"), readonly=True
        )
        try:
            sample = choose_sample(catalog, studies, chance or random.SystemRandom())
            result = _restore(config, catalog, keys, scratch, sample, progress)
            audit.restore_finished(
                config,
                "drill",
                "mirror",
                f"{result.instances} instance(s) of {len(result.studies)} "
                "studies restored from the mirror and checked",
                f"{len(result.failures)} problem(s)" if result.failures else "",
                catalog,
                result.studies,
            )
        finally:
            catalog.close()
            shutil.rmtree(scratch, ignore_errors=True)
        return result, drill_records.save(folder, result)
    finally:
        lock.release()


def _restore(
    config: Config,
    catalog: Catalog,
    keys: KeyStore,
    scratch: Path,
    sample: list[str],
    progress: Progress | None,
) -> DrillResult:
    """The sample restored from the mirror, within restore.timetable."""
    timetable = parse_timetable(config.get("restore.timetable"))
    if timetable.rate_at(datetime.now()) == 0:
        raise DrillError(
            "restore.timetable pauses reading the mirror now; the drill did not run"
        )
    limiter = Limiter(timetable, purpose="drill")
    try:
        with open_mirror(config) as transport:
            contents = survey(transport)
            if not contents.packs:
                return _empty_mirror(sample)
            drill = Drill(
                catalog,
                Fetcher(transport, limiter),
                contents,
                keys,
                scratch,
                config.get("storage.reserved_bytes"),
            )
            return drill.run(sample, progress)
    except TransportError as exc:
        # What a disaster would meet: recorded as a failed drill, so that the
        # report does not go on showing the last one that passed.
        return _unreadable_mirror(sample, exc)
    finally:
        limiter.close()


def _unreadable_mirror(sample: list[str], exc: TransportError) -> DrillResult:
    """A failed drill: the mirror could not be reached or read."""
    result = DrillResult(time.time(), sample)
    for study_uid in sample:
        result.fail(study_uid, "", f"the mirror cannot be read: {exc}")
    return result


def _empty_mirror(sample: list[str]) -> DrillResult:
    """A failed drill: the catalog counts copies on a mirror that holds none."""
    result = DrillResult(time.time(), sample)
    for study_uid in sample:
        result.fail(
            study_uid, "", "the mirror holds no pack at all (is it the right one?)"
        )
    return result


def summary(result: DrillResult) -> str:
    """One line on a drill, for the log and the command line."""
    outcome = "passed" if result.ok else f"FAILED ({len(result.failures)} problems)"
    return (
        f"restore drill {outcome}: {len(result.studies)} studies, "
        f"{result.instances} instances in the sample, {result.bytes / 1e6:.1f} MB "
        "restored and verified in "
        f"{result.seconds:.1f} s ({result.rate / 1e6:.1f} MB/s), "
        f"{result.mirror_bytes / 1e6:.1f} MB read from the mirror"
    )


# -- the scheduled drill ----------------------------------------------------


def schedule(scheduler: BackgroundScheduler, config: Config) -> None:
    """Add the drill to the service's scheduler at ``drills.schedule``."""
    scheduler.add_job(
        run_in_child,
        CronTrigger.from_crontab(config.get("drills.schedule")),
        args=(config,),
        id="drill",
        max_instances=1,
        coalesce=True,
    )
    logger.info("restore drills scheduled at %r", config.get("drills.schedule"))


def run_in_child(config: Config) -> int:
    """Run one scheduled drill in a child process; its exit code."""
    return run_child(_child, (config,), "drill", background=True)


def scheduled_drill(config: Config) -> bool:
    """One drill of ``drills.studies`` studies, logged in one line; whether
    it passed."""
    try:
        result, path = perform(config, config.get("drills.studies"))
    except ApplianceError as exc:
        logger.error("restore drill did not run: %s", exc)
        return False
    if result.ok:
        logger.info("%s; recorded in %s", summary(result), path)
    else:
        first = result.failures[0]
        logger.error(
            "%s; first: study %s: %s; recorded in %s",
            summary(result),
            first.study_uid,
            first.what,
            path,
        )
    return result.ok


def _child(config: Config) -> None:
    """The child process's work: the drill, with the service's logging."""
    die_with_parent()
    logs.setup_service(config)
    # The per-instance warnings would bury the one line that matters.
    logging.getLogger("appliance.restore.drill").setLevel(logging.ERROR)
    logging.getLogger("appliance.restore.mirror").setLevel(logging.WARNING)
    scheduled_drill(config)
