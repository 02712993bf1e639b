"""The catalog's counts sampled once a minute, for the dashboard's ingest
and replication rates over the last day.

The catalog keeps totals, not their history, and the metrics endpoint is
for a monitoring system to keep history in. So that the dashboard needs
none, the web child appends a sample every ``INTERVAL`` seconds to
``DATA_DIR/web/history.jsonl``, one JSON object per line::

    {"time": 1764904320.0, "instances": 1200, "offsite_bytes": 73400320,
     "queued_instances": 4}

``time`` is the wall clock (seconds since the epoch); ``instances`` the
instances in the catalog; ``offsite_bytes`` the instance bytes on the
mirror. The file keeps ``KEEP`` seconds of samples: when it holds twice
as many lines as that needs, it is rewritten with the recent ones only.
While the web child is down nothing is sampled; the change over such a
gap is counted in the hour of the first sample after it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.catalog import replication
from appliance.catalog.store import Catalog
from appliance.storage import durable

logger = logging.getLogger(__name__)

INTERVAL = 60.0
HOUR = 3600.0
KEEP = 25 * HOUR
FILE_NAME = "history.jsonl"


def path_of(data_dir: Path) -> Path:
    return data_dir / "web" / FILE_NAME


def sample(catalog: Catalog, now: float) -> dict[str, Any]:
    """The counts the rates are drawn from, as they are now."""
    counts = catalog.counts()
    return {
        "time": round(now, 1),
        "instances": counts["instances"],
        "offsite_bytes": counts.get("bytes.offsite", 0),
        "queued_instances": replication.queue_state(catalog).instances,
    }


def read(path: Path) -> list[dict[str, Any]]:
    """The samples in the file, oldest first; unreadable lines left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("time"), int | float):
            found.append(entry)
    return found


def hourly(
    samples: list[dict[str, Any]], now: float, hours: int = 24
) -> list[dict[str, Any]]:
    """Per hour of the last ``hours`` (oldest first, the current one last):
    instances received and instance bytes sent to the mirror.

    Counted from the rise between consecutive samples, in the hour of the
    later one; a fall (studies deleted) counts as nothing rather than as a
    negative rate.
    """
    current = now - now % HOUR
    first = current - (hours - 1) * HOUR
    buckets = [
        {"hour": first + index * HOUR, "ingested_instances": 0, "replicated_bytes": 0}
        for index in range(hours)
    ]
    ordered = sorted(samples, key=lambda entry: entry["time"])
    for before, after in itertools.pairwise(ordered):
        index = int((after["time"] - first) // HOUR)
        if not 0 <= index < hours:
            continue
        bucket = buckets[index]
        bucket["ingested_instances"] += _rise(before, after, "instances")
        bucket["replicated_bytes"] += _rise(before, after, "offsite_bytes")
    return buckets


def _rise(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return max(0, int(after.get(key, 0)) - int(before.get(key, 0)))


class Sampler:
    """Appends a sample to the history file now and every ``INTERVAL``."""

    def __init__(self, catalog: Catalog, path: Path) -> None:
        self.catalog = catalog
        self.path = path
        self._lines = len(read(path))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="history", daemon=True)

    def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # The dashboard's rate charts stay empty; the server still serves.
            logger.warning("no history for the dashboard in %s: %s", self.path, exc)
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def sample_once(self, now: float | None = None) -> None:
        """Take one sample and append it (compacting the file when due)."""
        entry = sample(self.catalog, time.time() if now is None else now)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        self._lines += 1
        if self._lines > 2 * KEEP / INTERVAL:
            self._compact(entry["time"])

    def _compact(self, now: float) -> None:
        kept = [entry for entry in read(self.path) if entry["time"] > now - KEEP]
        temporary = self.path.with_name(f".{FILE_NAME}.tmp")
        temporary.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
        durable.move_into_place(temporary, self.path, self.path.parent)
        self._lines = len(kept)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:
                # A failed sample leaves a gap in a chart, nothing more.
                logger.exception("cannot sample the catalog for the dashboard")
            self._stop.wait(INTERVAL)


@contextlib.contextmanager
def sampling(catalog: Catalog, data_dir: Path) -> Iterator[Sampler]:
    """Sample while the block runs; stopped before the catalog closes."""
    sampler = Sampler(catalog, path_of(data_dir))
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()
