"""One piece of the replicator's work in a thread of its own: a pack being
written ahead, or one being read back from the mirror."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Background:
    """Runs ``work`` in a thread; :meth:`finish` waits and raises its error.

    The thread is a daemon: at exit nobody waits for it, and what it left
    half done (a pack file cut short) is cleaned up at the next start.
    """

    def __init__(self, work: Callable[[], object], name: str) -> None:
        self.error: Exception | None = None
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work()
        except Exception as exc:  # raised again in the waiting thread
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def finish(self) -> None:
        """Wait for the work to end; raise what stopped it."""
        self._thread.join()
        if self.error is not None:
            raise self.error
