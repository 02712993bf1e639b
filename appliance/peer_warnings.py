"""Warnings a peer can cause at will, at most one a minute per address.

A peer that opens connections and sends nothing, or junk, costs the
appliance a WARNING line each (the DICOM listener's ARTIM timer and its
refusal of bytes that are no A-ASSOCIATE-RQ, the HTTP server's
``web.header_timeout``, bytes outside MLLP frames, a failed TLS handshake
on the DICOM or HL7 port): opened by the thousand, they would bury every
other line of the log. So for each address the first such warning in a
window (60 s) is logged as it comes, and the others of that window are
only counted; when the window is over, one line says how many there were::

    ... WARNING ...: connection from 10.0.0.5:40112 closed: no whole ...
    ... WARNING ...: from 10.0.0.5: 212 more connections closed so in 60 s,
        not logged one by one

The next warning from that address opens a new window and is logged again.
Each process counts its own connections: with several DICOM workers, an
address gets at most one line per worker and window, and one count each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Seconds in which an address gets one warning logged; the rest counted.
WINDOW = 60.0


@dataclass
class _Window:
    """One address's window: when it opened, and the warnings held back."""

    opened: float
    held: int = 0


class PeerWarnings:
    """Log a warning about a peer unless one was logged for its address in
    the current window; count the others and log their number when the
    window is over (``what`` names them in that line, in the plural)."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        """With ``background``, a thread of this object logs each count
        when its window is over; without it, ``flush`` must be called."""
        self.logger = logger
        self.what = what
        self.window = window
        self.clock = clock
        self.background = background
        self._windows: dict[str, _Window] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def warning(self, address: str, message: str, *args: object) -> None:
        """Log ``message % args`` if it is the first for ``address`` in its
        window, else count it."""
        with self._changed:
            now = self.clock()
            self._forget_quiet(now)
            current = self._windows.get(address)
            if current is not None and now < current.opened + self.window:
                current.held += 1
                if current.held == 1:
                    self._wake()
                return
            # A window over whose count is not logged yet: it goes first.
            ended = self._windows.pop(address, None)
            self._windows[address] = _Window(now)
        if ended is not None and ended.held:
            self._log_count(address, ended.held)
        self.logger.warning(message, *args)

    def flush(self) -> None:
        """Log the count of every window that is over; forget those windows."""
        with self._changed:
            now = self.clock()
            over = [
                (address, window.held)
                for address, window in self._windows.items()
                if now >= window.opened + self.window
            ]
            for address, _held in over:
                del self._windows[address]
        for address, held in over:
            if held:
                self._log_count(address, held)

    def _log_count(self, address: str, held: int) -> None:
        self.logger.warning(
            "from %s: %d more %s in %g s, not logged one by one",
            address,
            held,
            self.what,
            self.window,
        )

    def _forget_quiet(self, now: float) -> None:
        """Drop the windows that are over and held nothing back: the
        background thread (or ``flush``) logs the others."""
        quiet = [
            address
            for address, window in self._windows.items()
            if not window.held and now >= window.opened + self.window
        ]
        for address in quiet:
            del self._windows[address]

    def _wake(self) -> None:
        """A count is due at some window's end: make sure someone logs it.
        Called with the lock held."""
        if not self.background:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._log_counts, name="peer-warnings", daemon=True
            )
            self._thread.start()
        self._changed.notify()

    def _log_counts(self) -> None:
        """Log each count when its window is over, for as long as the
        process runs; sleep while nothing is held back."""
        while True:
            with self._changed:
                due = [
                    window.opened + self.window
                    for window in self._windows.values()
                    if window.held
                ]
                if not due:
                    self._changed.wait()
                    continue
                wait = min(due) - self.clock()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
            self.flush()
