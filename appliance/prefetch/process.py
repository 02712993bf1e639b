"""One prefetch run in a child process of the service.

A child, as migrations are: recalls read packs and write the online tier,
and a run that dies takes nothing else with it. A lock file keeps two runs
from overlapping when one outlasts ``prefetch.interval``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from appliance import logs
from appliance.children import die_with_parent, run_child
from appliance.config import Config

logger = logging.getLogger(__name__)

PREFETCH_LOCK = "prefetch.lock"


def check_and_run(config: Config) -> None:
    """Import the list files of the watched folder, then run the planner in
    a child only when some appointment is in its window or new studies wait
    to be compared with the orders: sites without a RIS feed never pay for
    a process."""
    from appliance.catalog.store import Catalog
    from appliance.errors import ApplianceError
    from appliance.prefetch.appointments import appointments

    folder = config.watch_folder
    if folder is not None:
        _import_watched(config, folder)
    now = time.time()
    earliest = now - config.get("prefetch.grace_hours") * 3600
    latest = now + config.get("prefetch.horizon_days") * 86400
    try:
        catalog = Catalog(config.catalog_path, readonly=True)
    except ApplianceError as exc:
        logger.error("prefetch check: %s", exc)
        return
    try:
        due = any(
            a.active and a.start is not None and earliest < a.start <= latest
            for a in appointments(catalog)
        )
        with catalog.read() as txn:
            due = due or txn.stat(catalog.db["arrivals"])["entries"] > 0
    finally:
        catalog.close()
    if due:
        run_in_child(config)


def _import_watched(config: Config, folder: Path) -> None:
    from appliance.catalog.store import Catalog
    from appliance.errors import ApplianceError
    from appliance.prefetch.watch import import_dropped

    if not folder.is_dir():
        logger.error("prefetch.watch_folder %s is not a folder", folder)
        return
    try:
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    except ApplianceError as exc:
        logger.error("watched folder: %s", exc)
        return
    try:
        import_dropped(catalog, folder)
    except (ApplianceError, OSError) as exc:
        logger.error("watched folder %s: %s", folder, exc)
    finally:
        catalog.close()


def run_in_child(config: Config) -> int:
    """Run the planner once in a child process; its exit code."""
    return run_child(run_prefetch, (config,), "prefetch")


def run_prefetch(config: Config) -> None:
    """Plan, pin and recall once (the child process's work)."""
    die_with_parent()
    logs.setup(config.get("logging.level"), config.get("logging.format"))
    from appliance.catalog.store import Catalog
    from appliance.hsm.recall import Recaller
    from appliance.hsm.tiers import open_tiers
    from appliance.prefetch.planner import Planner
    from appliance.storage.lock import TierLock

    lock = TierLock(config.data_dir, PREFETCH_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        logger.info("prefetch run skipped: the previous one is still running")
        return
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        tiers = open_tiers(config, writer=True)
        Planner(catalog, Recaller(catalog, tiers), config).run()
    finally:
        catalog.close()
        lock.release()
