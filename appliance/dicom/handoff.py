"""Passing accepted DICOM connections from the listener to worker processes.

One Python process uses one core; to use every core the service accepts
connections in one process and hands each one, as a file descriptor over a
Unix socket, to the worker process with the fewest open associations. In
the worker, :class:`HandoffServer` is a pynetdicom association server whose
"listening socket" is that Unix socket.

Message on the channel: one datagram whose payload is the peer address as
JSON (``["host", port]``) and whose ancillary data carries the descriptor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)

_MAX_PAYLOAD = 512


class QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges every read at once (TCP_QUICKACK).

    Many DICOM senders (DCMTK's tools unless TCP_NODELAY=1 is set, for one)
    leave Nagle's algorithm on and write a message in two pieces, such as a
    C-STORE command and its data set. Nagle holds the second piece until
    the first is acknowledged, and Linux delays that acknowledgement by up
    to 40 ms: a stall on every message. Linux clears TCP_QUICKACK as it
    sees fit, so it is set again after each read.
    """

    # No instance attributes: an existing socket can take this class.
    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self._acknowledge_now()
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes, flags)
        self._acknowledge_now()
        return count

    def _acknowledge_now(self) -> None:
        # An error means the connection is closing; the read reports it.
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def send_connection(channel: socket.socket, connection: socket.socket) -> None:
    """Hand an accepted TCP connection to the worker at the end of ``channel``."""
    address = connection.getpeername()[:2]
    payload = json.dumps(list(address)).encode()
    socket.send_fds(channel, [payload], [connection.fileno()])


class HandedOverSocket(QuickAckSocket):
    """A connection handed over by the listener, which counted it open."""

    # Called once when the connection is closed, however pynetdicom ends it.
    on_close: Callable[[], None] | None = None

    def close(self) -> None:
        super().close()
        report, self.on_close = self.on_close, None
        if report is not None:
            report()


class HandoffServer(ThreadedAssociationServer):
    """An association server fed by a channel instead of a listening socket."""

    def __init__(
        self,
        ae: Any,
        channel: socket.socket,
        public_address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        evt_handlers: list[Any],
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self._channel = channel
        self._on_close = on_close
        self._public_address = public_address
        # The base class binds and listens on this address in its
        # constructor; server_bind below swaps in the channel instead.
        super().__init__(ae, public_address, ae_title, contexts, None, evt_handlers)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._channel
        self.server_address = self._public_address

    def server_activate(self) -> None:
        """Nothing listens here: connections arrive through the channel."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        payload, fds, _flags, _address = socket.recv_fds(self._channel, _MAX_PAYLOAD, 1)
        if not fds:
            raise OSError("the listener closed the channel")
        connection = HandedOverSocket(fileno=fds[0])
        connection.on_close = self._on_close
        connection.settimeout(self.ae.network_timeout)
        host, port = json.loads(payload)
        return connection, (host, int(port))
