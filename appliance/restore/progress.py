"""The state of a restore's data phase, in two files under DATA_DIR/restore/.

``pending``        written once the rebuilt catalog is in place, removed
                   when every study was tried: while it is there, the
                   service restores in the background
``progress.json``  the numbers of the run under way (or the last one),
                   rewritten every few seconds: what ``appliance restore
                   status`` and ``appliance status`` show; while the
                   catalog is rebuilt, how far its step is
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.storage import durable

logger = logging.getLogger(__name__)

PENDING = "pending"
PROGRESS = "progress.json"

# The rate is measured over this many seconds.
_RATE_WINDOW = 60.0
# The file is rewritten at most this often.
_WRITE_EVERY = 2.0


def is_pending(folder: Path) -> bool:
    return (folder / PENDING).exists()


def mark_pending(folder: Path, source: str) -> None:
    """Note that the data phase is still to do (or to finish)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / PENDING, {"source": source, "since": time.time()})


def clear_pending(folder: Path) -> None:
    (folder / PENDING).unlink(missing_ok=True)
    durable.fsync_directory(folder)


@dataclass
class Snapshot:
    """The numbers of a restore at one moment: its data phase, or the step
    its catalog phase is at."""

    # rebuilding (the catalog), rebuilt, starting, restoring, paused, done,
    # stopped
    state: str = "starting"
    runner: str = ""  # "command" or "service"
    pid: int = 0
    started: float = 0.0
    updated: float = 0.0
    studies: int = 0
    expected_studies: int = 0  # of patients with an upcoming appointment
    left_on_mirror: int = 0
    bytes: int = 0
    bytes_done: int = 0
    rate: float = 0.0  # bytes per second over the last minute
    doing: str = ""
    report: str = ""  # the final report's file, once written
    # While the catalog is rebuilt: its step, and how far it is.
    step: str = ""
    step_done: int = 0
    step_total: int = 0
    step_unit: str = ""

    @property
    def seconds_left(self) -> float | None:
        if self.rate <= 0 or self.bytes_done >= self.bytes:
            return None
        return (self.bytes - self.bytes_done) / self.rate

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def read(folder: Path) -> Snapshot | None:
    """The last numbers written, or None when no data phase ran here."""
    try:
        data = json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    known = set(Snapshot.__dataclass_fields__)
    return Snapshot(**{k: v for k, v in data.items() if k in known})


@dataclass
class Tracker:
    """Keeps ``progress.json`` up to date while a data phase runs, and
    tells ``shown`` (a progress bar, say) every change."""

    folder: Path
    runner: str
    shown: Callable[[Snapshot], None] | None = None
    snapshot: Snapshot = field(init=False)
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _written: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _late: threading.Timer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        now = time.time()
        self.snapshot = Snapshot(
            runner=self.runner, pid=os.getpid(), started=now, updated=now
        )

    def planned(self, studies: int, size: int, expected: int, left: int) -> None:
        self.snapshot.state = "restoring"
        self.snapshot.studies = studies
        self.snapshot.bytes = size
        self.snapshot.bytes_done = 0
        self.snapshot.expected_studies = expected
        self.snapshot.left_on_mirror = left
        self._samples.clear()
        self.write(force=True)

    def rebuilding(self, step: str, done: int, total: int, unit: str) -> None:
        """How far the catalog phase's step is (written at once when a step
        begins or ends, else every few seconds)."""
        new = (self.snapshot.state, self.snapshot.step) != ("rebuilding", step)
        new = new or done >= total
        self.snapshot.state = "rebuilding"
        self.snapshot.step = step
        self.snapshot.step_done = done
        self.snapshot.step_total = total
        self.snapshot.step_unit = unit
        self.write(force=new)

    def advanced(self, done: int, doing: str) -> None:
        self.snapshot.state = "restoring"
        self.snapshot.bytes_done = done
        self.snapshot.doing = doing
        now = time.monotonic()
        self._samples.append((now, done))
        while self._samples and now - self._samples[0][0] > _RATE_WINDOW:
            self._samples.popleft()
        first_time, first_done = self._samples[0]
        if now > first_time:
            self.snapshot.rate = (done - first_done) / (now - first_time)
        self.write()

    def state(self, state: str, doing: str = "") -> None:
        self.snapshot.state = state
        self.snapshot.doing = doing
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        # The thread that fetches packs says "paused" while another restores.
        with self._lock:
            self._write(force)

    def _write(self, force: bool) -> None:
        if self.shown is not None:
            self.shown(self.snapshot)
        wait = self._written + _WRITE_EVERY - time.monotonic()
        if not force and wait > 0:
            self._write_later(wait)
            return
        self._save()

    def _save(self) -> None:
        self.snapshot.updated = time.time()
        try:
            _write(self.folder / PROGRESS, self.snapshot.as_json())
        except OSError as exc:
            # The numbers are for people; the restore goes on without them.
            logger.warning("cannot write the restore's progress: %s", exc)
        self._written = time.monotonic()

    def _write_later(self, wait: float) -> None:
        """Write the numbers held back once ``wait`` is over: the next
        change may be a long fetch away, and the file would show the
        numbers from before the last ones meanwhile."""
        if self._late is None:
            self._late = threading.Timer(wait, self._write_held_back)
            self._late.daemon = True
            self._late.start()

    def _write_held_back(self) -> None:
        with self._lock:
            self._late = None
            self._save()


def _write(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    durable.move_into_place(temporary, path, path.parent)
