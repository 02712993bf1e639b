"""Keeping the replication process running beside the service.

The listener runs one :class:`Supervisor`: a thread that starts the
replication child process, starts it again (after a pause if it died
young) whenever it exits, and stops it with the service.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from typing import Any

from appliance.config import Config
from appliance.replication.process import run_replication

logger = logging.getLogger(__name__)

# A child that dies sooner than this after its start waits before the next.
_YOUNG = 10.0
_STOP_GRACE = 30.0


class Supervisor:
    """Runs the replication child process until :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = threading.Event()
        self._child: Any = None
        self._thread = threading.Thread(
            target=self._run, name="replication-supervisor", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the child to finish its current step, then wait for it."""
        self._stop.set()
        child = self._child
        if child is not None and child.is_alive():
            child.terminate()
            child.join(_STOP_GRACE)
            if child.is_alive():
                logger.warning("replication did not stop in %d s; killed", _STOP_GRACE)
                child.kill()
                child.join()
        self._thread.join(_STOP_GRACE)

    def _run(self) -> None:
        context = multiprocessing.get_context("spawn")
        while not self._stop.is_set():
            started = time.monotonic()
            self._child = context.Process(
                target=run_replication, args=(self.config,), name="replication"
            )
            self._child.start()
            self._child.join()
            if self._stop.is_set():
                return
            logger.error(
                "replication process ended (exit code %s); starting it again",
                self._child.exitcode,
            )
            if time.monotonic() - started < _YOUNG:
                self._stop.wait(_YOUNG)
