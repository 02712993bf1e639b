"""One prefetch run in a child process of the service.

A child, as migrations are: importing list files and recalls read and write
the catalog and the tiers, and a run that dies takes nothing else with it.
A lock file keeps two runs from overlapping when one outlasts
``prefetch.interval``. The listener process only looks: which list files
in the watched folder have settled, and whether anything is due at all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from appliance import logs
from appliance.children import die_with_parent, run_child
from appliance.config import Config
from appliance.prefetch.watch import Settling

logger = logging.getLogger(__name__)

PREFETCH_LOCK = "prefetch.lock"

# The listener's memory of the watched folder between two looks.
_SETTLING = Settling()


def check_and_run(config: Config) -> None:
    """Run the prefetch child only when there is something to do: list
    files that have settled in the watched folder, an appointment in the
    planner's window, pins to lift, or new studies to compare with the
    orders. Sites without a RIS feed never pay for a process."""
    folder = config.watch_folder
    files = _SETTLING.settled(folder) if folder is not None else []
    if files or _due(config):
        run_in_child(config, files)


def _due(config: Config) -> bool:
    from appliance.catalog.pins import pinned
    from appliance.catalog.store import peek
    from appliance.errors import ApplianceError
    from appliance.prefetch.appointments import appointments

    now = time.time()
    earliest = now - config.get("prefetch.grace_hours") * 3600
    latest = now + config.get("prefetch.horizon_days") * 86400
    try:
        with peek(config.catalog_path) as catalog:
            if any(
                a.active and a.start is not None and earliest < a.start <= latest
                for a in appointments(catalog)
            ):
                return True
            with catalog.read() as txn:
                if txn.stat(catalog.db["arrivals"])["entries"]:
                    return True
            # Pins of appointments cancelled since: a run lifts them.
            return bool(pinned(catalog, now))
    except ApplianceError as exc:
        logger.error("prefetch check: %s", exc)
        return False


def run_in_child(config: Config, files: list[Path] | None = None) -> int:
    """Run the prefetch work once in a child process; its exit code."""
    return run_child(run_prefetch, (config, files or []), "prefetch", background=True)


def run_prefetch(config: Config, files: list[Path]) -> None:
    """Import ``files``, then plan, pin and recall (the child's work)."""
    die_with_parent()
    logs.setup_service(config)
    from appliance.catalog.store import Catalog
    from appliance.hsm.recall import Recaller
    from appliance.hsm.tiers import open_tiers
    from appliance.prefetch.planner import Planner
    from appliance.prefetch.watch import import_files
    from appliance.restore.reasons import while_restoring
    from appliance.storage.lock import TierLock

    lock = TierLock(config.data_dir, PREFETCH_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        logger.info("prefetch run skipped: the previous one is still running")
        return
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        if files:
            import_files(catalog, files)
        # Priors a restore left on the mirror are prefetched from it.
        tiers = open_tiers(config, writer=True, mirror=True)
        noted = while_restoring(config.restore_folder)
        Planner(catalog, Recaller(catalog, tiers, failed=noted), config).run()
    finally:
        catalog.close()
        lock.release()
