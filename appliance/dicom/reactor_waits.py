"""pynetdicom's two polling loops woken by what they wait for.

Every association has two threads that poll. The DUL thread sleeps 1 ms
whenever a pass over its connection and queues found nothing to do; the
association's own thread sleeps 1 ms before each look at its queue of
decoded DIMSE messages. A modality sends its next C-STORE only once the
response to the last one has come, so over one association both sleeps
are paid on every instance: the request waits for the DUL thread to wake
and read it, then for the association's thread to take it.

:func:`install` turns those two sleeps into waits bounded by the same
time: the DUL thread's until its connection has bytes to read, the
association's until a message is queued for it. Whatever they did after
sleeping they still do, and at least as often: a wait only ever ends
sooner. Every other sleep in pynetdicom is left as it is.
"""

from __future__ import annotations

import logging
import queue
import select
import sys
import threading
import time
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

logger = logging.getLogger(__name__)

_DUL_LOOP = DULServiceProvider.run_reactor.__code__
_ASSOCIATION_LOOP = Association._run_reactor.__code__


class _ReactorClock:
    """The ``time`` module as pynetdicom's association and DUL modules see
    it: the same, but for the two loops' sleeps."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1).f_code
        thread = threading.current_thread()
        if caller is _DUL_LOOP and isinstance(thread, DULServiceProvider):
            until_readable(thread.socket, seconds)
        elif caller is _ASSOCIATION_LOOP and isinstance(thread, Association):
            until_queued(thread.dimse.msg_queue, seconds)
        else:
            time.sleep(seconds)


def install() -> None:
    """Route the two loops' sleeps through :class:`_ReactorClock`."""
    clock = _ReactorClock()
    pynetdicom.dul.time = clock  # type: ignore[assignment]
    pynetdicom.association.time = clock  # type: ignore[assignment]


def until_readable(wrapper: Any, seconds: float) -> None:
    """Wait up to ``seconds`` for the association's connection (pynetdicom's
    AssociationSocket ``wrapper``) to have bytes to read."""
    connection = getattr(wrapper, "socket", None)
    if connection is None or getattr(wrapper, "_is_connected", True) is False:
        # Not connected: nothing to wait for but the time.
        time.sleep(seconds)
        return
    pending = getattr(connection, "pending", None)
    if pending is not None and pending():
        # Bytes already read off the connection (replayed, or decrypted by
        # TLS) wait for the reader: the kernel would not say so.
        return
    try:
        select.select([connection], [], [], seconds)
    except (OSError, ValueError):
        # Closed under us: the loop finds out and ends; until then it
        # must not spin.
        time.sleep(seconds)


def until_queued(messages: queue.Queue[Any], seconds: float) -> None:
    """Wait up to ``seconds`` for ``messages`` to hold something, without
    taking it: the loop takes it only once it knows it is not paused."""
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(seconds)
        if messages.queue:
            # A put wakes one waiter, and this one takes nothing: pass the
            # wake on to a thread that may wait in ``get`` for the message
            # (send_c_store waiting for its response, say).
            messages.not_empty.notify()
