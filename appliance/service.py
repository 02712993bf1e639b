"""The running appliance: a listener process and its DICOM worker processes.

The listener binds the DICOM port (and the DICOM over TLS port when
tls.enabled), accepts connections, sets TCP_NODELAY
(so that senders that leave Nagle's algorithm on are not held back by
delayed ACKs) and hands each connection to the worker with the fewest open
connections. Workers each open the catalog and the online tier and serve
associations with pynetdicom. A worker that dies is started again; SIGTERM
or SIGINT stops accepting, lets open associations finish, then exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance import audit, notify, tls
from appliance.audit import sender as audit_sender
from appliance.catalog.store import Catalog
from appliance.commitment.process import CommitmentSupervisor
from appliance.config import Config
from appliance.dicom.handoff import send_connection
from appliance.dicom.worker import STOP_GRACE, Load, run_worker
from appliance.errors import ApplianceError, ConfigError
from appliance.hsm import recall_notes, scheduler
from appliance.hsm.archive import archive_of
from appliance.hsm.tier_folders import online_tier, vet_tier_folders
from appliance.hsm.tiers import open_tiers
from appliance.metrics import folder as metrics_folder
from appliance.prefetch.hl7_process import HL7Service
from appliance.replication.supervisor import Supervisor
from appliance.restore import process as restore_process
from appliance.storage.lock import claim_catalog, claim_tier
from appliance.storage.online import OnlineTier
from appliance.web.process import WebService

logger = logging.getLogger(__name__)

# Seconds without a turn of the accept loop after which the listener counts
# as hung (it turns at least twice a second).
_LOOP_STALLED = 30.0

_QUICK_DEATH = 10
_RESTART_DELAY = 10
_MIN_OPEN_CONNECTIONS = 64
_CROWDED_LOG_EVERY = 60.0


@dataclass
class _Worker:
    index: int
    process: Any
    channel: socket.socket
    started: float = 0.0
    # Set when the worker died soon after starting: not before this time.
    restart_at: float = 0.0


def serve(config: Config) -> int:
    """Run the appliance until SIGTERM or SIGINT; returns the exit status."""
    # Before anything makes a folder or a catalog: a disk not mounted is
    # refused here rather than taken for an empty tier or a new archive.
    vet_tier_folders(config)
    online = online_tier(config)
    online.open()
    problems = tls.file_problems(config)
    if problems:
        raise ConfigError(problems)
    for caveat in tls.unchecked_bindings(config):
        logger.warning("%s", caveat)
    listener = _listen(config)
    secure = _listen(config, "tls.port") if config.get("tls.enabled") else None
    hl7 = HL7Service(config) if config.get("hl7.enabled") else None
    claim = claim_tier(config.online_path, wait_for_workers=STOP_GRACE + 10)
    web = None
    catalog_claim = None
    try:
        web = WebService(config) if config.get("web.enabled") else None
        restore_process.refuse_half_restored(config)
        online.discard_incoming()
        # The catalog's folder is made, then claimed for this service alone,
        # before what killed recalls left in the online tier is cleaned.
        Catalog(config.catalog_path, config.get("storage.catalog_max_size")).close()
        # The volumes read the archive id beside the catalog: a restored
        # catalog's comes back there before any worker opens the volumes.
        archive_of(config)
        catalog_claim = claim_catalog(config.catalog_path)
        clean_up_recalls(config, online)
        # Every tier opens (and the key store is made) before any worker
        # needs them, so that a wrong tier path stops the start with a reason.
        open_tiers(config)
        # Before any child starts: each reads the folder's name at its start.
        metrics_folder.prepare(config.data_dir)
        return _serve(config, listener, secure, hl7, web)
    finally:
        listener.close()
        if secure is not None:
            secure.close()
        if hl7 is not None:
            hl7.close()
        if web is not None:
            web.sock.close()
        if catalog_claim is not None:
            catalog_claim.release()
        claim.release()


def clean_up_recalls(config: Config, online: OnlineTier) -> None:
    """Before any worker recalls: remove the files of recalls killed
    before their copies were recorded (the catalog opens here first)."""
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        recall_notes.clean_up_or_warn(catalog, online)
    finally:
        catalog.close()


def _say_ready_once_serving(serving: str, web: WebService | None) -> None:
    """Tell systemd and the log that the service is ready, once the HTTP
    server answers too (its child takes seconds to start); DICOM is served
    meanwhile, whatever the HTTP server does."""

    def say_ready() -> None:
        if web is not None:
            web.wait_until_serving()
        notify.ready(serving)
        logger.info("ready: %s", serving)

    if web is None:
        say_ready()
        return
    threading.Thread(target=say_ready, name="ready", daemon=True).start()


def _serve(
    config: Config,
    listener: socket.socket,
    secure: socket.socket | None,
    hl7: HL7Service | None,
    web: WebService | None = None,
) -> int:
    context = multiprocessing.get_context("spawn")
    load = Load.shared(context, config.workers)
    workers = _start_workers(context, config, load)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    host, port = listener.getsockname()[:2]
    logger.info(
        "appliance %s listening on %s:%d with %d worker(s); data in %s",
        config.get("node.ae_title"),
        host,
        port,
        len(workers),
        config.data_dir,
    )
    migrations = replication = restore = commitment = None
    # The accept loop turns at least every half second; a loop that stops
    # turning withholds the watchdog heartbeat, and systemd restarts us.
    alive = notify.Liveness(max_age=_LOOP_STALLED)
    heartbeat = notify.Heartbeat(alive)
    # Audit messages go to the collector from this thread, never from the
    # workers that serve associations.
    audit_delivery = audit_sender.from_config(config)
    try:
        if audit_delivery is not None:
            audit_delivery.start()
        audit.application_started(config)
        migrations = scheduler.start(config)
        # Storage commitment reports that workers could not deliver.
        commitment = CommitmentSupervisor(config)
        commitment.start()
        if config.get("replication.enabled"):
            replication = Supervisor(config)
            replication.start()
        if restore_process.wanted(config):
            # The catalog is back: serve now, and restore the data meanwhile.
            restore = restore_process.RestoreSupervisor(config)
            restore.start()
        serving = f"serving DICOM on {host}:{port}"
        if secure is not None:
            serving += ", DICOM over TLS on {}:{}".format(*secure.getsockname())
        if hl7 is not None:
            hl7.start()
            serving += ", HL7 on {}:{}".format(*hl7.address)
            if hl7.secure_address is not None:
                serving += ", HL7 over TLS on {}:{}".format(*hl7.secure_address)
        if web is not None:
            web.start()
            protocol = "HTTPS" if web.scheme == "https" else "HTTP"
            serving += ", {} on {}:{}".format(protocol, *web.address)
        # The heartbeat says the accept loop turns; it must not wait for
        # the HTTP server, whose wait is as long as WatchdogSec.
        heartbeat.start()
        _say_ready_once_serving(serving, web)
        listeners = [listener] if secure is None else [listener, secure]
        _accept_loop(listeners, workers, load, stop, context, config, alive)
    finally:
        notify.stopping("finishing open associations")
        heartbeat.stop()
        if hl7 is not None:
            hl7.stop()
        if web is not None:
            web.stop()
        if replication is not None:
            replication.stop()
        if restore is not None:
            restore.stop()
        if commitment is not None:
            commitment.stop()
        if migrations is not None:
            # A running migration child is a daemon: it stops with us, and
            # its next run resumes (every step is idempotent).
            migrations.shutdown(wait=False)
        _stop_workers(workers)
        audit.application_stopped(config)
        if audit_delivery is not None:
            audit_delivery.stop()
    logger.info("appliance stopped")
    return 0


def _listen(config: Config, port_key: str = "node.port") -> socket.socket:
    address = config.get("node.bind_address")
    port = config.get(port_key)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, port))
    except OSError as exc:
        listener.close()
        raise ApplianceError(
            f"cannot listen on {address}:{port}: {exc.strerror} ({port_key})"
        ) from exc
    listener.listen(128)
    return listener


def _accept_loop(
    listeners: list[socket.socket],
    workers: list[_Worker],
    load: Load,
    stop: threading.Event,
    context: Any,
    config: Config,
    alive: notify.Liveness,
) -> None:
    """Accept on ``listeners`` (the plain port first, then the TLS port) and
    hand each connection over; TLS handshakes happen in the workers."""
    selector = selectors.DefaultSelector()
    for position, listener in enumerate(listeners):
        selector.register(listener, selectors.EVENT_READ, data=position > 0)
    # Connections that never become associations (a port scan, a stalled
    # sender) each hold a file descriptor in a worker until the ARTIM timer
    # runs out; beyond this many the listener closes new ones at once.
    pending_limit = max(_MIN_OPEN_CONNECTIONS, 4 * config.get("node.max_associations"))
    crowded = _Crowding(pending_limit)
    while not stop.is_set():
        alive.touch()
        ready = selector.select(timeout=0.5)
        if not ready:
            _restart_dead(workers, load, context, config, stop, alive.touch)
            continue
        for key, _events in ready:
            try:
                connection, address = key.fileobj.accept()  # type: ignore[union-attr]
            except OSError as exc:
                logger.warning("cannot accept a connection: %s", exc)
                continue
            with connection:
                if load.total_connections() >= pending_limit:
                    crowded.refused(address)
                    continue
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _hand_off(connection, workers, load, secure=key.data)


class _Crowding:
    """Connections closed at once because too many are open: logged once a
    minute with their count, not once each, so that a flood cannot fill the
    log."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.last_logged = -_CROWDED_LOG_EVERY

    def refused(self, address: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last_logged >= _CROWDED_LOG_EVERY:
            logger.warning(
                "%d connection(s) closed unanswered, the latest from %s: %d "
                "connections are open already, the most the workers are given",
                self.count,
                address[0],
                self.limit,
            )
            self.count = 0
            self.last_logged = now


def _hand_off(
    connection: socket.socket, workers: list[_Worker], load: Load, secure: bool
) -> None:
    alive = [w for w in workers if w.process.is_alive()]
    if not alive:
        logger.error("no worker is running; connection dropped")
        return
    chosen = load.hand_to_least_busy(alive)
    try:
        send_connection(chosen.channel, connection, secure)
    except OSError as exc:
        logger.error("cannot hand a connection to worker %d: %s", chosen.index, exc)
        load.closed(chosen.index, admitted=False)


def _restart_dead(
    workers: list[_Worker],
    load: Load,
    context: Any,
    config: Config,
    stop: threading.Event,
    waiting: Callable[[], None],
) -> None:
    now = time.monotonic()
    for position, worker in enumerate(workers):
        if worker.process.is_alive() or stop.is_set() or now < worker.restart_at:
            continue
        if not worker.restart_at and now - worker.started < _QUICK_DEATH:
            # A worker that dies at once would die again: wait, so that a
            # broken setup does not turn into a restart storm in the log.
            worker.restart_at = now + _RESTART_DELAY
            logger.error(
                "worker %d exited with status %s within %d s of starting; "
                "starting it again in %d s",
                worker.index,
                worker.process.exitcode,
                _QUICK_DEATH,
                _RESTART_DELAY,
            )
            continue
        if not worker.restart_at:
            logger.error(
                "worker %d exited with status %s; starting it again",
                worker.index,
                worker.process.exitcode,
            )
        worker.channel.close()
        load.reset(worker.index)
        metrics_folder.process_died(worker.process.pid)
        # What the dead worker was receiving will never be answered.
        OnlineTier(config.online_path).discard_incoming(worker.index)
        workers[position] = _start_worker(context, config, worker.index, load, waiting)


def _start_workers(context: Any, config: Config, load: Load) -> list[_Worker]:
    """Start every worker at once: each spends its start importing and
    opening in its own process, so that the starts overlap."""
    started = [_launch(context, config, i, load) for i in range(config.workers)]
    return [_ready(index, *launched) for index, launched in enumerate(started)]


def _start_worker(
    context: Any,
    config: Config,
    index: int,
    load: Load,
    waiting: Callable[[], None] = lambda: None,
) -> _Worker:
    """Start worker ``index``; ``waiting`` is called while it starts (the
    listener is busy, not hung: it keeps the watchdog heartbeat going)."""
    return _ready(index, *_launch(context, config, index, load), waiting)


def _launch(
    context: Any, config: Config, index: int, load: Load
) -> tuple[Any, socket.socket, Any]:
    """Worker ``index``'s process, started; its channel and ready event."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready = context.Event()
    process = context.Process(
        target=run_worker,
        args=(config, index, theirs, load, ready),
        name=f"appliance-worker-{index}",
        daemon=False,
    )
    process.start()
    theirs.close()
    return process, ours, ready


def _ready(
    index: int,
    process: Any,
    ours: socket.socket,
    ready: Any,
    waiting: Callable[[], None] = lambda: None,
) -> _Worker:
    """Wait until a started worker serves (60 s at most)."""
    deadline = time.monotonic() + 60
    while not ready.wait(timeout=0.1):
        waiting()
        if not process.is_alive():
            logger.error("worker %d exited while starting", index)
            break
        if time.monotonic() > deadline:
            logger.error("worker %d did not start in 60 s", index)
            break
    return _Worker(index, process, ours, started=time.monotonic())


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
    deadline = time.monotonic() + STOP_GRACE + 5
    for worker in workers:
        worker.process.join(max(0.1, deadline - time.monotonic()))
        if worker.process.is_alive():
            logger.error("worker %d did not stop in time; killing it", worker.index)
            worker.process.kill()
            worker.process.join()
        worker.channel.close()
