"""Telling systemd how the service is doing: ready, status, stopping and
the watchdog heartbeat (the sd_notify protocol, without libsystemd).

Under a ``Type=notify`` unit, systemd passes ``$NOTIFY_SOCKET``: the name of
a Unix datagram socket, either a file path or, when it starts with ``@``, a
name in the abstract namespace. A message is one datagram of
``NAME=value`` assignments, one per line (see sd_notify(3)):

    READY=1          start-up is complete; ``systemctl start`` returns
    STATUS=text      one line shown by ``systemctl status``
    STOPPING=1       the service is shutting down on purpose
    WATCHDOG=1       the service is alive; resets the WatchdogSec= timer

Outside systemd (a terminal, the tests, a container) ``$NOTIFY_SOCKET`` is
not set and every function here does nothing and returns False, so the
service calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

logger = logging.getLogger(__name__)

# Set after a failed send, cleared by a good one (see notify()).
_failed = threading.Event()
# Seconds a send may wait for room in systemd's queue before it is given up.
SEND_TIMEOUT = 5.0

__all__ = [
    "Heartbeat",
    "Liveness",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]


def notify(state: str) -> bool:
    """Send ``state`` (``NAME=value`` lines) to systemd.

    Returns True when the datagram was sent; False when the service does not
    run under systemd, or when sending failed (logged, never raised: a
    notification is never worth stopping the archive for).
    """
    address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # A busy systemd must not hold up the caller (the listener).
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        # Once at WARNING, then quietly: the heartbeat would repeat it forever.
        level = logging.DEBUG if _failed.is_set() else logging.WARNING
        _failed.set()
        logger.log(level, "cannot notify systemd through %r: %s", address, exc)
        return False
    _failed.clear()
    return True


def ready(text: str | None = None) -> bool:
    """Say that start-up is complete, with an optional status line."""
    return notify(_with_status("READY=1", text))


def stopping(text: str | None = None) -> bool:
    """Say that the service is stopping on purpose, not failing."""
    return notify(_with_status("STOPPING=1", text))


def status(text: str) -> bool:
    """Set the one line that ``systemctl status`` shows for the service."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """Tell systemd's watchdog that the service is alive."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The unit's ``WatchdogSec=`` in seconds, or None when no watchdog
    watches this process.

    systemd sets ``$WATCHDOG_USEC``, and ``$WATCHDOG_PID`` naming the process
    it expects the heartbeat from; a child that inherited the variables (a
    worker) gets None, as does a value that is not a positive integer.
    """
    watched_pid = os.environ.get("WATCHDOG_PID", "")
    if watched_pid and watched_pid != str(os.getpid()):
        return None
    try:
        microseconds = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return microseconds / 1e6 if microseconds > 0 else None


class Liveness:
    """Proof that a loop still turns: the loop calls ``touch()`` on every
    turn, and the object, called, says whether the last turn was less than
    ``max_age`` seconds ago. Pass it to ``Heartbeat`` as ``healthy``."""

    def __init__(
        self, max_age: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_age <= 0:
            raise ValueError(f"max_age must be greater than 0 (got {max_age!r})")
        self.max_age = max_age
        self._clock = clock
        self._last = clock()

    def touch(self) -> None:
        """Record one turn of the loop."""
        self._last = self._clock()

    def __call__(self) -> bool:
        return self._clock() - self._last < self.max_age


class Heartbeat:
    """A thread that sends ``WATCHDOG=1`` every half watchdog interval for
    as long as ``healthy()`` says True.

    When ``healthy()`` says False (or raises), the heartbeat is withheld and
    one warning is logged: if the service does not recover within the
    interval, systemd kills it (SIGABRT) and ``Restart=`` starts it again.
    A hung process stops its own heartbeat, because the thread runs in it.

    ``interval`` defaults to ``watchdog_interval()``; ``start()`` does
    nothing and returns False when there is no watchdog.
    """

    def __init__(
        self, healthy: Callable[[], bool], interval: float | None = None
    ) -> None:
        self.healthy = healthy
        self.interval = interval if interval is not None else watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start beating; False when no watchdog is configured."""
        if not self.interval or self._thread is not None:
            return False
        self._thread = threading.Thread(
            target=self._run, name="systemd-watchdog", daemon=True
        )
        self._thread.start()
        logger.debug("watchdog heartbeat every %.1f s", self.interval / 2)
        return True

    def stop(self) -> None:
        """Stop beating and wait for the thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        assert self.interval is not None
        withheld = False
        while True:
            if self._is_healthy():
                if withheld:
                    logger.warning("healthy again: watchdog heartbeat resumed")
                withheld = False
                watchdog()
            elif not withheld:
                withheld = True
                logger.error(
                    "not healthy: watchdog heartbeat withheld; systemd restarts "
                    "the service if this lasts %.0f s",
                    self.interval,
                )
            if self._stop.wait(self.interval / 2):
                return

    def _is_healthy(self) -> bool:
        try:
            return bool(self.healthy())
        except Exception:
            logger.exception("the health check failed; counted as not healthy")
            return False


def _socket_address(name: str) -> str | bytes | None:
    """The address to send to, from ``$NOTIFY_SOCKET``; None when unset or
    of a kind this client does not speak (e.g. ``vsock:``)."""
    if name.startswith("@"):
        # Abstract namespace: the name begins with a NUL byte instead.
        return b"\0" + name[1:].encode("utf-8")
    if name.startswith("/"):
        return name
    if name:
        logger.debug("NOTIFY_SOCKET %r is not a Unix socket; not notifying", name)
    return None


def _status_line(text: str) -> str:
    # A newline would end the assignment and start another one.
    return "STATUS=" + " ".join(text.split())


def _with_status(state: str, text: str | None) -> str:
    return state if text is None else f"{state}\n{_status_line(text)}"
