"""A watchdog that notices a transfer making no progress and cuts it off.

A dead link does not always fail: a NAT box that forgot the connection, or
a mirror whose disk hangs, can leave a write waiting for a very long time.
The uploading thread reports progress after every block; when none comes
for ``timeout`` seconds the watchdog, from its own thread, calls
``on_stall`` (which closes the connection), and the blocked call then
fails at once instead of hanging.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

logger = logging.getLogger(__name__)


class StallWatchdog:
    """Call ``on_stall`` once if ``progress`` is not called for ``timeout`` s.

    Use it as a context manager around one transfer::

        with StallWatchdog(120.0, connection.abort) as watchdog:
            for block in blocks:
                send(block)
                watchdog.progress()
    """

    def __init__(
        self,
        timeout: float,
        on_stall: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.fired = False
        self._on_stall = on_stall
        self._clock = clock
        self._last = clock()
        self._paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="mirror-stall-watchdog", daemon=True
        )

    def progress(self) -> None:
        """Note that the transfer moved (a float store: safe across threads)."""
        self._last = self._clock()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside this block is not a stall: the uploader waits
        for its own bandwidth limiter, not for the mirror."""
        self._paused = True
        try:
            yield
        finally:
            self._last = self._clock()
            self._paused = False

    def __enter__(self) -> StallWatchdog:
        self._last = self._clock()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while not self._stop.wait(interval):
            if not self._paused and self._clock() - self._last >= self.timeout:
                self.fired = True
                logger.debug("no progress for %.1f s: cutting off", self.timeout)
                self._on_stall()
                return
