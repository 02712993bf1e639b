"""Counting what happens: instances received, associations, request and
recall latencies, bytes put on the mirror.

Each function here is the one line a site of the appliance calls. In the
processes of a running service (``PROMETHEUS_MULTIPROC_DIR`` set, see
:mod:`appliance.metrics.folder`) it adds to prometheus_client's
multiprocess files; anywhere else (a command-line run, a test in one
process) it is a no-op that costs one attribute check. Label values come
from the fixed sets below, never from a data set: no UID, patient or AE
title can reach a label.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.metrics.folder import ENVIRONMENT

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

# What became of an instance offered for storage.
STORE_OUTCOMES = ("stored", "duplicate", "rejected", "failed")
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "aborted")
OPERATIONS = ("find", "get", "move")
RECALL_SOURCES = ("nearline", "offline", "offsite")
UPLOADS = ("pack", "journal", "snapshot")

# A C-FIND answers in milliseconds; a retrieve that recalls from a volume
# can take many minutes.
_REQUEST_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
_RECALL_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

# C-STORE failure statuses that are the appliance's fault, not the
# sender's (PS3.4 B.2.3): out of resources, processing failure.
_OUR_FAILURES = (0xA700, 0x0110)
_DUPLICATE_REFUSED = 0x0111
_SUCCESS = 0x0000


@dataclass
class _Metrics:
    received: Counter
    associations: Counter
    associations_open: Gauge
    connections_refused: Counter
    requests: Histogram
    recalls: Histogram
    uploaded: Counter


class _State:
    """This process's metrics, made at the first event (None: not counting)."""

    decided = False
    metrics: _Metrics | None = None
    lock = threading.Lock()


def _metrics() -> _Metrics | None:
    if _State.decided:
        return _State.metrics
    with _State.lock:
        if not _State.decided:
            _State.metrics = _make()
            _State.decided = True
    return _State.metrics


def _make() -> _Metrics | None:
    if not os.environ.get(ENVIRONMENT):
        return None
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client was imported before the variable was set: what
        # this process counted would stay in its memory, never scraped.
        logger.warning(
            "metrics are not counted in process %d: prometheus_client was "
            "imported before %s was set",
            os.getpid(),
            ENVIRONMENT,
        )
        return None
    return _define()


def _define() -> _Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    return _Metrics(
        received=Counter(
            "appliance_instances_received",
            "Instances offered for storage (C-STORE, or another way in through "
            "a running service), by outcome: stored, duplicate (the SOP "
            "Instance UID was already stored), rejected (the sender's fault), "
            "failed (the appliance's fault, such as no room).",
            ["outcome"],
            registry=None,
        ),
        associations=Counter(
            "appliance_dicom_associations",
            "DICOM associations by outcome: accepted, rejected (A-ASSOCIATE-RJ), "
            "aborted (an accepted or requested association ended by A-ABORT).",
            ["outcome"],
            registry=None,
        ),
        associations_open=Gauge(
            "appliance_dicom_associations_open",
            "DICOM associations accepted and not yet closed.",
            registry=None,
            multiprocess_mode="livesum",
        ),
        connections_refused=Counter(
            "appliance_dicom_connections_refused",
            "Connections closed before they became an association request: no "
            "whole A-ASSOCIATE-RQ within the ARTIM timer, or bytes that are "
            "no DICOM.",
            registry=None,
        ),
        requests=Histogram(
            "appliance_dicom_request_duration_seconds",
            "Seconds from a C-FIND, C-GET or C-MOVE request to its final "
            "response (retrieves include recalls and sending).",
            ["operation"],
            registry=None,
            buckets=_REQUEST_BUCKETS,
        ),
        recalls=Histogram(
            "appliance_recall_duration_seconds",
            "Seconds a recall of a study took, by source: the farthest tier "
            "that gave an instance (nearline, offline, offsite).",
            ["source"],
            registry=None,
            buckets=_RECALL_BUCKETS,
        ),
        uploaded=Counter(
            "appliance_replication_uploaded_bytes",
            "Bytes put on the mirror, by kind: pack, journal (segments of "
            "catalog changes), snapshot (of the catalog).",
            ["kind"],
            registry=None,
        ),
    )


def _label(value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``; a programming error otherwise,
    counted as "other" rather than raised in a network handler."""
    if value in allowed:
        return value
    logger.error("metrics: unexpected label value %r", value)
    return "other"


# -- what the sites call -------------------------------------------------------


def start() -> None:
    """Make this process's metrics now, so that they show (at 0) before
    the first event: a restarted worker's open associations read 0, not
    nothing."""
    _metrics()


def store_outcome(status: int, stored_new: bool) -> str:
    """The outcome label of a store answered with ``status``; ``stored_new``:
    the catalog recorded an instance it did not have."""
    if status == _SUCCESS:
        return "stored" if stored_new else "duplicate"
    if status == _DUPLICATE_REFUSED:
        return "duplicate"
    if status in _OUR_FAILURES:
        return "failed"
    return "rejected"


def instance_received(outcome: str) -> None:
    """Count an instance offered for storage, by outcome (STORE_OUTCOMES)."""
    metrics = _metrics()
    if metrics is not None:
        metrics.received.labels(_label(outcome, STORE_OUTCOMES)).inc()


def association(outcome: str) -> None:
    """Count an association accepted, rejected or aborted."""
    metrics = _metrics()
    if metrics is None:
        return
    metrics.associations.labels(_label(outcome, ASSOCIATION_OUTCOMES)).inc()
    if outcome == "accepted":
        metrics.associations_open.inc()


def association_closed(accepted: bool) -> None:
    """An association's connection closed; ``accepted``: it was counted open."""
    metrics = _metrics()
    if metrics is not None and accepted:
        metrics.associations_open.dec()


def connection_refused() -> None:
    """Count a connection refused before it was an association request."""
    metrics = _metrics()
    if metrics is not None:
        metrics.connections_refused.inc()


@contextmanager
def timed(operation: str) -> Iterator[None]:
    """Observe how long the body takes, as a request of ``operation``."""
    metrics = _metrics()
    if metrics is None:
        yield
        return
    started = time.monotonic()
    try:
        yield
    finally:
        metrics.requests.labels(_label(operation, OPERATIONS)).observe(
            time.monotonic() - started
        )


def recall_finished(source: str, seconds: float) -> None:
    """Observe a recall that staged instances, read at farthest from ``source``."""
    metrics = _metrics()
    if metrics is not None:
        metrics.recalls.labels(_label(source, RECALL_SOURCES)).observe(seconds)


def uploaded(kind: str, size: int) -> None:
    """Count ``size`` bytes put on the mirror as a file of ``kind``."""
    metrics = _metrics()
    if metrics is not None:
        metrics.uploaded.labels(_label(kind, UPLOADS)).inc(size)
