"""A worker process: serves the DICOM associations the listener hands it.

The listener (``appliance.service``) starts these with the ``spawn`` start
method, so each imports this module afresh: it holds only what a worker
needs, so that a worker starts (and the appliance listens) sooner, without
the listener's own supervisors, schedulers and web server.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any, Protocol, TypeVar

from appliance import logs, tls
from appliance.catalog.store import Catalog
from appliance.children import die_with_parent
from appliance.config import Config
from appliance.dicom.handoff import HandoffServer
from appliance.dicom.node import Node, configure_pynetdicom
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import open_tiers
from appliance.ingest import Ingest
from appliance.metrics import events as metrics_events
from appliance.restore.reasons import while_restoring
from appliance.storage.lock import WORKERS_LOCK, TierLock

logger = logging.getLogger(__name__)

# Seconds a stopping worker gives open associations to finish.
STOP_GRACE = 30.0


class _Numbered(Protocol):
    index: int


W = TypeVar("W", bound=_Numbered)


@dataclass
class Load:
    """What each worker holds, counted in memory shared by all processes.

    ``connections``: connections handed to the worker and not yet closed;
    the listener hands the next one to the worker with the fewest.
    ``associations``: those of them whose A-ASSOCIATE-RQ was admitted. Only
    these count against node.max_associations, so that connections that
    never send a whole request cannot keep real associations out.
    """

    connections: SynchronizedArray
    associations: SynchronizedArray

    @classmethod
    def shared(cls, context: Any, workers: int) -> Load:
        return cls(context.Array("i", workers), context.Array("i", workers))

    def hand_to_least_busy(self, workers: list[W]) -> W:
        """The worker with the fewest connections, counted one more."""
        with self.connections.get_lock():
            chosen = min(workers, key=lambda w: self.connections[w.index])
            self.connections[chosen.index] += 1
        return chosen

    def admitted(self, index: int) -> None:
        _add(self.associations, index, 1)

    def closed(self, index: int, admitted: bool) -> None:
        _add(self.connections, index, -1)
        if admitted:
            _add(self.associations, index, -1)

    def reset(self, index: int) -> None:
        """Forget what a dead worker held."""
        for counts in (self.connections, self.associations):
            with counts.get_lock():
                counts[index] = 0

    def total_associations(self) -> int:
        return sum(self.associations[:])

    def total_connections(self) -> int:
        return sum(self.connections[:])


def _add(counts: SynchronizedArray, index: int, delta: int) -> None:
    with counts.get_lock():
        counts[index] = max(0, counts[index] + delta)


def run_worker(
    config: Config,
    index: int,
    channel: socket.socket,
    load: Load,
    ready: Any,
) -> None:
    """Serve the associations handed over ``channel`` until SIGTERM."""
    die_with_parent()
    logs.setup_service(config)
    metrics_events.start()
    configure_pynetdicom()

    tiers = open_tiers(config, mirror=True)
    online = tiers.online
    in_use = TierLock(config.online_path, WORKERS_LOCK)
    in_use.acquire(exclusive=False, wait=60)
    # pynetdicom writes incoming data sets to the process's temporary
    # directory; keeping it on the online tier's file system makes storing
    # a rename instead of a copy.
    tempfile.tempdir = str(online.incoming_for(index))
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    ingest = Ingest(catalog, online, config.get("storage.duplicate_policy"))

    recaller = Recaller(catalog, tiers, failed=while_restoring(config.restore_folder))
    node = Node(config, catalog, online, ingest, load.total_associations, recaller)
    ae = node.application_entity()
    address = (config.get("node.bind_address"), config.get("node.port"))
    server = HandoffServer(
        ae,
        channel,
        address,
        node.ae_title,
        ae.supported_contexts,
        node.handlers(),
        artim=config.get("timeouts.association"),
        # The listener counted each connection when it handed it over.
        on_admit=functools.partial(load.admitted, index),
        on_close=functools.partial(load.closed, index),
        tls_context=tls.server_context(config) if config.get("tls.enabled") else None,
        on_tls_failure=node.tls_failed,
    )
    ae._servers.append(server)  # so that AE.shutdown() also stops this server

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ready.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        _finish_associations(server)
        ingest.close()
        catalog.close()
        in_use.release()


def _finish_associations(server: HandoffServer) -> None:
    """Give open associations time to finish, then abort what is left."""
    if server.active_associations:
        logger.info(
            "stopping: waiting up to %d s for %d open association(s)",
            STOP_GRACE,
            len(server.active_associations),
        )
    deadline = time.monotonic() + STOP_GRACE
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    left = server.active_associations
    if left:
        logger.warning("stopping: aborting %d association(s) still open", len(left))
    for assoc in left:
        assoc.abort()
