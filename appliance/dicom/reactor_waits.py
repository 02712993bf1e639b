"""pynetdicom's two polling loops woken by what they wait for.

Every association has two threads that poll. The DUL thread sleeps 1 ms
whenever a pass over its connection and queues found nothing to do; the
association's own thread sleeps 1 ms before each look at its queue of
decoded DIMSE messages. A modality sends its next C-STORE only once the
response to the last one has come, so over one association the sleeps
are paid on every instance: the request waits for the DUL thread to wake
and read it, then for the association's thread to take it, and the
response, queued for the DUL thread to send, waits for it to wake again.

:func:`install` turns those two sleeps into waits bounded by the same
time: the DUL thread's until its connection has bytes to read or a PDU is
queued for it to send (each DUL gets an eventfd that ``send_pdu`` signals),
the association's until a message is queued for it. Whatever they did
after sleeping they still do.

While an association has work, no wait lasts longer than the sleep it
replaces. Once it has had nothing to read, send or serve for
:data:`QUIET_AFTER`, its waits last up to :data:`IDLE_WAIT`: an idle
association looked a thousand times a second each way, a quarter of a core
on a slow one, and workstations keep associations open. Only what the loops
notice by looking is then noticed later: a release or an abort already
read off the connection, the network timeout, their own end. New bytes, a
PDU to send and a message to serve still end the wait at once, and make
the association busy again. Every other sleep in pynetdicom is left as it
is.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import sys
import threading
import time
import weakref
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

logger = logging.getLogger(__name__)

_DUL_LOOP = DULServiceProvider.run_reactor.__code__
_ASSOCIATION_LOOP = Association._run_reactor.__code__

# An association with nothing to do for this long (seconds) is idle ...
QUIET_AFTER = 1.0
# ... and its loops then look this often: a release, an abort or the
# network timeout is acted on this much later at most.
IDLE_WAIT = 0.1


class _ReactorClock:
    """The ``time`` module as pynetdicom's association and DUL modules see
    it: the same, but for the two loops' sleeps."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1).f_code
        thread = threading.current_thread()
        if caller is _DUL_LOOP and isinstance(thread, DULServiceProvider):
            until_woken(thread, seconds)
        elif caller is _ASSOCIATION_LOOP and isinstance(thread, Association):
            pace = _pace_of(thread)
            if until_queued(thread.dimse.msg_queue, pace.wait(seconds)):
                pace.busy()
        else:
            time.sleep(seconds)


def install() -> None:
    """Route the two loops' sleeps through :class:`_ReactorClock`, have
    every PDU queued for sending wake its DUL thread, and close that
    thread's eventfd when it ends."""
    clock = _ReactorClock()
    pynetdicom.dul.time = clock  # type: ignore[assignment]
    pynetdicom.association.time = clock  # type: ignore[assignment]

    queue_pdu = DULServiceProvider.send_pdu
    if getattr(queue_pdu, "wakes_the_dul", False):
        return  # installed already
    run = DULServiceProvider.run_reactor

    def send_pdu(dul: DULServiceProvider, primitive: Any) -> None:
        queue_pdu(dul, primitive)
        _wake_of(dul).signal()

    def run_reactor(dul: DULServiceProvider) -> None:
        try:
            run(dul)
        finally:
            _wake_of(dul).close()

    send_pdu.wakes_the_dul = True  # type: ignore[attr-defined]
    setattr(DULServiceProvider, "send_pdu", send_pdu)  # noqa: B010
    setattr(DULServiceProvider, "run_reactor", run_reactor)  # noqa: B010


class _Pace:
    """How long one loop waits: as long as it asked while it has work, up
    to IDLE_WAIT once it has had none for QUIET_AFTER."""

    def __init__(self) -> None:
        self.last_busy = time.monotonic()

    def busy(self) -> None:
        self.last_busy = time.monotonic()

    def wait(self, seconds: float) -> float:
        if time.monotonic() - self.last_busy < QUIET_AFTER:
            return seconds
        return max(seconds, IDLE_WAIT)


class _Wake:
    """An eventfd that a DUL thread waits on beside its connection."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Held to write or close: once closed, the number may be another
        # file's.
        self._lock = threading.Lock()

    def signal(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def clear(self) -> bool:
        """Whether it was signalled since the last look; reset it."""
        with self._lock:
            if self.fd < 0:
                return False
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                return False
            return True

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


# Each DUL's wake, made on first use. Closed when its thread ends, or with
# the DUL object if its thread never ran.
_wakes: weakref.WeakKeyDictionary[DULServiceProvider, _Wake] = (
    weakref.WeakKeyDictionary()
)
_wakes_lock = threading.Lock()
# Each loop's pace, by its thread (a DUL or an association), made on first
# use; a loop reads and sets only its own.
_paces: weakref.WeakKeyDictionary[threading.Thread, _Pace] = weakref.WeakKeyDictionary()
_paces_lock = threading.Lock()


def _wake_of(dul: DULServiceProvider) -> _Wake:
    with _wakes_lock:
        wake = _wakes.get(dul)
        if wake is None:
            wake = _wakes[dul] = _Wake()
            weakref.finalize(dul, wake.close)
        return wake


def _pace_of(thread: threading.Thread) -> _Pace:
    with _paces_lock:
        pace = _paces.get(thread)
        if pace is None:
            pace = _paces[thread] = _Pace()
        return pace


def until_woken(dul: DULServiceProvider, seconds: float) -> None:
    """Wait up to ``seconds`` (longer once idle) for bytes to read on
    ``dul``'s connection or for a PDU queued for it to send."""
    pace = _pace_of(dul)
    if until_readable(dul.socket, pace.wait(seconds), _wake_of(dul)):
        pace.busy()


def until_readable(wrapper: Any, seconds: float, wake: _Wake | None = None) -> bool:
    """Wait up to ``seconds`` for the association's connection (pynetdicom's
    AssociationSocket ``wrapper``) to have bytes to read, or for ``wake``
    to be signalled (and then clear it). Whether either happened."""
    if wake is not None and wake.clear():
        return True
    connection = getattr(wrapper, "socket", None)
    if connection is None or getattr(wrapper, "_is_connected", True) is False:
        # Not connected: nothing to wait for but the time.
        time.sleep(seconds)
        return False
    pending = getattr(connection, "pending", None)
    if pending is not None and pending():
        # Bytes already read off the connection (replayed, or decrypted by
        # TLS) wait for the reader: the kernel would not say so.
        return True
    # poll, not select: select cannot wait on a descriptor numbered 1,024
    # or more, and a busy appliance may hold that many.
    waited_on = select.poll()
    try:
        waited_on.register(connection, select.POLLIN)
        if wake is not None:
            waited_on.register(wake.fd, select.POLLIN)
        ready = waited_on.poll(seconds * 1000)
    except (OSError, ValueError):
        # Closed under us: the loop finds out and ends; until then it
        # must not spin.
        time.sleep(seconds)
        return False
    if wake is not None:
        wake.clear()
    return bool(ready)


def until_queued(messages: queue.Queue[Any], seconds: float) -> bool:
    """Wait up to ``seconds`` for ``messages`` to hold something, without
    taking it: the loop takes it only once it knows it is not paused.
    Whether something is there."""
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(seconds)
        if not messages.queue:
            return False
        # A put wakes one waiter, and this one takes nothing: pass the wake
        # on to a thread that may wait in ``get`` for the message
        # (send_c_store waiting for its response, say).
        messages.not_empty.notify()
        return True
