"""The restore's data phase as a child process of the service.

``appliance restore --from mirror --background`` rebuilds the catalog and
leaves the data to the service: while ``DATA_DIR/restore/pending`` is
there, the service serves at once (C-FIND for the whole archive, C-STORE
of new studies, C-MOVE and C-GET recalling from the mirror what is not
back yet) and this child restores the rest, within ``restore.timetable``,
giving way to any recall from the mirror that someone waits for. It exits
with status 0 once every study was tried; any other exit, the service
starts it again, and it continues where it stopped.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from appliance import logs
from appliance.children import ChildSupervisor, die_with_parent
from appliance.config import Config
from appliance.errors import ApplianceError, LimiterClosed
from appliance.restore.progress import is_pending

if TYPE_CHECKING:
    from appliance.replication.bandwidth import Limiter

logger = logging.getLogger(__name__)

# The restore finishes the instance it writes; a pack fetch is cut off.
_STOP_GRACE = 30.0


class RestoreSupervisor(ChildSupervisor):
    """Runs the restore child until the data phase is over."""

    def __init__(self, config: Config) -> None:
        super().__init__(
            run_restore,
            (config,),
            "restore",
            _STOP_GRACE,
            until_success=True,
            background=True,
        )


def wanted(config: Config) -> bool:
    """Whether a restore's data phase waits for the service."""
    return is_pending(config.restore_folder)


def refuse_half_restored(config: Config) -> None:
    """Stop the service from starting on a restore cut short in its catalog
    phase: it would serve (and replicate) an empty archive."""
    from appliance.restore import swap

    if wanted(config) and swap.note_of(config.catalog_path) is None:
        raise ApplianceError(
            "a restore from the mirror stopped before its catalog was in place: "
            "run appliance restore --from mirror again before serving"
        )


def run_restore(config: Config) -> None:
    """Restore in the background until done or SIGTERM (the child's work)."""
    from appliance.replication.bandwidth import Limiter, parse_timetable

    die_with_parent()
    logs.setup_service(config)
    stop = threading.Event()
    limiter = Limiter(
        parse_timetable(config.get("restore.timetable")),
        sleep=stop.wait,
        purpose="restore",
    )

    def stopping(*_: Any) -> None:
        stop.set()
        limiter.close()  # a wait for bandwidth ends at once

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        done = _restore(config, stop, limiter)
    except LimiterClosed:
        done = False
    except ApplianceError as exc:
        logger.error("restore stopped: %s; it starts again shortly", exc)
        sys.exit(1)
    sys.exit(0 if done else 1)


def _restore(config: Config, stop: threading.Event, limiter: Limiter) -> bool:
    from appliance.catalog.store import Catalog
    from appliance.hsm.mirror import wait_for_recalls
    from appliance.replication.process import open_mirror
    from appliance.restore.cache import PackCache
    from appliance.restore.export import rebuilt_note
    from appliance.restore.mirror import Fetcher, survey
    from appliance.restore.progress import Tracker
    from appliance.restore.run import restore_folder, run_data_phase
    from appliance.storage.keys import KeyStore, key_store_path

    folder = restore_folder(config)
    if not is_pending(folder):
        return True
    tracker = Tracker(folder, "service")
    keys = KeyStore.load(key_store_path(config.data_dir))
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    if rebuilt_note(catalog) is None:
        catalog.close()
        logger.error(
            "a restore is marked pending, but the catalog was not rebuilt: run "
            "appliance restore --from mirror again"
        )
        return True
    recalls = config.restore_folder / "recall"
    recalls.mkdir(parents=True, exist_ok=True)
    try:
        with open_mirror(config) as transport:
            contents = survey(transport)
            cache = PackCache(
                folder / "packs",
                Fetcher(transport, limiter),
                int(config.get("restore.cache_gb") * 1e9),
            )
            report = run_data_phase(
                config,
                catalog,
                keys,
                cache,
                contents,
                tracker,
                stop.is_set,
                lambda: wait_for_recalls(recalls, stop.is_set),
                limiter=limiter,
            )
    finally:
        catalog.close()
    return report is not None
