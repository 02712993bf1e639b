"""The replication process of the service, and what opens its parts.

The listener starts one child process that runs the replicator until the
service stops; if it dies, the listener starts it again. Everything it
needs comes from the configuration: the mirror's transport, the bandwidth
timetable (and the runtime override file), the tiers and the keys.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import audit, logs
from appliance.audit import codes
from appliance.children import die_with_parent
from appliance.config import Config
from appliance.errors import ApplianceError, HostKeyError
from appliance.replication.bandwidth import Limiter, parse_timetable
from appliance.replication.health import Health
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports import Transport, open_transport

if TYPE_CHECKING:
    from appliance.catalog.store import Catalog

logger = logging.getLogger(__name__)

RATE_OVERRIDE = "replication-rate.json"
REPLICATION_LOCK = "replication.lock"
# Seconds a new replication process waits for an old one to finish.
_LOCK_WAIT = 60.0
# Seconds before a replication process that cannot reach the mirror ends
# (its supervisor starts it again).
_RETRY_START = 30.0


def override_path(config: Config) -> Path:
    """The file ``appliance replication rate`` writes and the replicator reads."""
    return config.data_dir / RATE_OVERRIDE


def mirror_settings(config: Config) -> dict[str, Any]:
    """The ``[mirror]`` keys without the section name; the default mirror
    is a folder in the data directory, made on first use."""
    settings = config.mirror_settings()
    if config.get("mirror.kind") == "directory" and not config.get("mirror.path"):
        Path(settings["path"]).mkdir(parents=True, exist_ok=True)
    return settings


def open_mirror(config: Config) -> Transport:
    """The transport to the configured mirror."""
    return open_transport(config.get("mirror.kind"), mirror_settings(config))


def mirror_place(config: Config) -> str:
    """Where the configured mirror is, for messages: a folder or user@host."""
    settings = config.mirror_settings()
    if config.get("mirror.kind") == "directory":
        return f"the folder {settings['path']}"
    where = f"{settings['user']}@{settings['host']}:{settings['port']}"
    return f"{where} {settings['remote_path']}"


def limiter(config: Config, stop: threading.Event | None = None) -> Limiter:
    """The bandwidth limiter of the configured timetable and override."""
    sleep = stop.wait if stop is not None else None
    options: dict[str, Any] = {"override_path": override_path(config)}
    if sleep is not None:
        options["sleep"] = sleep
    return Limiter(parse_timetable(config.get("replication.timetable")), **options)


def settings(config: Config) -> Settings:
    return Settings(
        batch_bytes=config.get("replication.batch_bytes"),
        batch_seconds=config.get("replication.batch_seconds"),
        snapshot_seconds=config.get("replication.snapshot_interval"),
        verify_after_upload=config.get("replication.verify_after_upload"),
        audit_days=config.get("replication.audit_days"),
        compression_level=config.get("replication.compression_level"),
    )


def run_replication(config: Config) -> None:
    """Replicate until SIGTERM (the child process's work)."""
    die_with_parent()
    logs.setup_service(config)
    from appliance.catalog.store import Catalog
    from appliance.storage.lock import TierLock

    # One replicator per archive: a second one (a service restarted while
    # the old child still finishes a step) waits for the first.
    lock = TierLock(config.data_dir, REPLICATION_LOCK)
    if not lock.acquire(exclusive=True, wait=_LOCK_WAIT):
        logger.warning("another replication process still runs; not starting")
        return
    stop = threading.Event()
    bandwidth = limiter(config, stop)

    def finish(*_: Any) -> None:
        stop.set()
        bandwidth.close()  # a wait for bandwidth ends at once

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        _replicate(config, catalog, stop, bandwidth)
    finally:
        catalog.close()
        lock.release()


def open_mirrors(config: Config) -> tuple[Transport, Transport | None]:
    """The transport for uploads, and one for read-backs (a second
    connection, so that a pack is read back while the next one uploads)
    when ``replication.verify_after_upload`` is on."""
    transport = open_mirror(config)
    if not config.get("replication.verify_after_upload"):
        return transport, None
    try:
        return transport, open_mirror(config)
    except BaseException:
        transport.close()
        raise


def _replicate(
    config: Config, catalog: Catalog, stop: threading.Event, bandwidth: Limiter
) -> None:
    from appliance.hsm.tiers import open_tiers

    # Kept in the catalog: a process started again after a failure to
    # open the mirror does not log the same cause once more.
    health = Health(catalog, alert=functools.partial(_alert_host_key, config))
    try:
        transport, verifier = open_mirrors(config)
    except ApplianceError as exc:
        health.failed(exc)
        stop.wait(_RETRY_START)
        return
    try:
        replicator = Replicator(
            catalog,
            open_tiers(config),
            transport,
            config.data_dir / "spool" / "mirror",
            settings(config),
            throttle=bandwidth.acquire,
            verifier=verifier,
            paused=bandwidth.paused,
            health=health,
        )
        logger.info("replication to the %s mirror started", config.get("mirror.kind"))
        replicator.run(stop)
    finally:
        transport.close()
        if verifier is not None:
            verifier.close()


def _alert_host_key(config: Config, problem: BaseException) -> None:
    """A security alert for a new host key problem (:class:`Health` calls
    this once per cause, not once per retry)."""
    if not isinstance(problem, HostKeyError):
        return
    mirror = audit.Peer("", config.get("mirror.host"))
    audit.security_alert(
        config, f"mirror host key: {problem}", mirror, outcome=codes.SERIOUS_FAILURE
    )
