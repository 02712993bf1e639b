"""Ctrl-C (or SIGTERM) during a restore's catalog phase, and during the data
phase of a restore from volumes: noted when it comes, acted on between two
steps of the work.

Python's own handling raises KeyboardInterrupt wherever the main thread is
when SIGINT arrives: half way through a module being imported, or inside
the ``exec`` that ``dataclasses`` and ``namedtuple`` run to make a class.
CPython notes a KeyboardInterrupt that leaves such an ``exec`` as not
handled, even once the command has handled it, and under ``python -m
appliance`` it then ends by killing itself with SIGINT (exit status -2 to
its parent) instead of with the status the command chose. The catalog
phase imports most of its modules just after it begins, so a Ctrl-C there
would often land in one. Here the signal only sets a flag, and the catalog
phase raises KeyboardInterrupt itself: from its progress callback, which
runs between chunks, journal entries and instances, and from a wait for
bandwidth.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)


# SIGTERM (``kill``, ``timeout``) asks the same as Ctrl-C: stop cleanly.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CtrlC:
    """Handles SIGINT and SIGTERM while it is used as a context manager;
    the previous handlers come back on leaving."""

    def __init__(self) -> None:
        self._pressed = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> CtrlC:
        self._previous = {
            number: signal.signal(number, self._note) for number in _SIGNALS
        }
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for number, previous in self._previous.items():
            if previous is None:  # not set from Python: the default
                previous = (
                    signal.default_int_handler
                    if number == signal.SIGINT
                    else signal.SIG_DFL
                )
            signal.signal(number, previous)

    @property
    def pressed(self) -> bool:
        """Whether Ctrl-C came since the handler was installed."""
        return self._pressed.is_set()

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C came."""
        if self._pressed.is_set():
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        """A bandwidth limiter's wait, cut short by Ctrl-C (which it raises)."""
        if self._pressed.wait(seconds):
            raise KeyboardInterrupt

    def _note(self, _number: int, _frame: FrameType | None) -> None:
        # Nothing else here: this runs wherever the main thread is.
        self._pressed.set()
