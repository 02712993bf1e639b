"""Passing accepted DICOM connections from the listener to worker processes.

One Python process uses one core; to use every core the service accepts
connections in one process and hands each one, as a file descriptor over a
Unix socket, to the worker process with the fewest open associations. In
the worker, :class:`HandoffServer` is a pynetdicom association server whose
"listening socket" is that Unix socket.

Message on the channel: one datagram whose payload is the peer address as
JSON (``["host", port]``, with a third item ``"tls"`` for a connection to
the TLS port) and whose ancillary data carries the descriptor.

A TLS connection has its handshake done in the worker, in the connection's
own thread and within the ARTIM timer, so that a slow or broken client
holds neither the listener nor other connections (see :mod:`appliance.tls`).
A failed handshake costs its peer nothing, so it is logged once a minute
per address, the others counted (:mod:`appliance.peer_warnings`); each one
is still reported to ``failed`` (a security alert in the audit trail).

A handed-over connection first has its A-ASSOCIATE-RQ read (see
:mod:`appliance.dicom.admission`); only then does pynetdicom see it, and
only then does it count as an association. pynetdicom reads the request
again from :class:`HandedOverSocket`, which serves those bytes before any
new ones.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from appliance import tls
from appliance.audit.offenders import host_of
from appliance.dicom.admission import admit
from appliance.peer_warnings import PeerWarnings

logger = logging.getLogger(__name__)

_MAX_PAYLOAD = 512
# Bytes a PDU read starts with: more than the longest P-DATA-TF most peers
# send (node.max_pdu_size is 256 KiB by default).
_FIRST_BUFFER = 1 << 20

# Failed TLS handshakes, logged once a minute per address.
_TLS_FAILED = PeerWarnings(logger, "TLS handshakes failed")


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


def send_connection(
    channel: socket.socket, connection: socket.socket, secure: bool = False
) -> None:
    """Hand an accepted TCP connection to the worker at the end of ``channel``;
    ``secure``: it came to the TLS port."""
    address = connection.getpeername()[:2]
    payload = json.dumps([*address, "tls"] if secure else list(address)).encode()
    socket.send_fds(channel, [payload], [connection.fileno()])


class _Replaying:
    """What both kinds of handed-over connection share: counting, and
    reading again the bytes admission read.

    A mixin for a socket class; ``super()`` is that socket class.
    """

    # Called once when the connection's A-ASSOCIATE-RQ is admitted.
    on_admit: Callable[[], None] | None = None
    # Called once when the connection is closed, however it ends, with
    # whether it had been admitted.
    on_close: Callable[[bool], None] | None = None
    admitted = False
    # Bytes already read from the connection, to be read again first.
    _replay = b""

    def admit(self, request: bytes) -> None:
        """Count the connection as an association, and serve ``request``
        (its A-ASSOCIATE-RQ, read by admission) before any new bytes."""
        self._replay = request
        self.admitted = True
        if self.on_admit is not None:
            self.on_admit()

    def pending(self) -> int:
        """Bytes to read that the kernel no longer holds."""
        return len(self._replay)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self._replay:
            return bytes(super().recv(bufsize, flags))  # type: ignore[misc]
        data = self._replay[:bufsize]
        if not flags & socket.MSG_PEEK:
            self._replay = self._replay[bufsize:]
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if not self._replay:
            return int(super().recv_into(buffer, nbytes, flags))  # type: ignore[misc]
        data = self.recv(nbytes or len(buffer), flags)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        super().close()  # type: ignore[misc]
        report, self.on_close = self.on_close, None
        if report is not None:
            report(self.admitted)


class HandedOverSocket(_Replaying, QuickAckSocket):
    """A connection handed over by the listener, which counted it open."""

    # Set by the worker for a connection that came to the TLS port.
    secure = False


class HandedOverTLSSocket(_Replaying, ssl.SSLSocket):  # type: ignore[misc]
    """A handed-over connection after its TLS handshake, server side."""

    def pending(self) -> int:
        # Bytes replayed first, then those OpenSSL has decrypted already.
        return len(self._replay) + ssl.SSLSocket.pending(self)

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self._acknowledge_now()
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes or 0, flags)
        self._acknowledge_now()
        return count

    def _acknowledge_now(self) -> None:
        # As QuickAckSocket does, for the same senders.
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def start_tls(
    connection: HandedOverSocket,
    context: ssl.SSLContext,
    peer: str,
    timeout: float,
    failed: Callable[[str], None] = lambda reason: None,
) -> HandedOverTLSSocket | None:
    """The connection after a server-side TLS handshake within ``timeout``
    seconds; None when the handshake failed (logged once a minute per
    address, connection closed, and ``failed`` told why). ``context``
    makes HandedOverTLSSocket sockets (see HandoffServer)."""
    address = host_of(peer)
    previous = connection.gettimeout()
    try:
        secured = context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        )
    except OSError as exc:
        _TLS_FAILED.warning(
            address, "TLS connection from %s failed: %s", peer, tls.failure(exc)
        )
        failed(tls.failure(exc))
        connection.close()
        return None
    assert isinstance(secured, HandedOverTLSSocket)
    # The plain socket object is detached: the TLS one reports the close.
    secured.on_admit, secured.on_close = connection.on_admit, connection.on_close
    connection.on_close = None
    try:
        secured.settimeout(timeout)
        secured.do_handshake()
    except (OSError, ValueError) as exc:
        _TLS_FAILED.warning(
            address, "TLS handshake with %s failed: %s", peer, tls.failure(exc)
        )
        failed(tls.failure(exc))
        secured.close()
        return None
    secured.settimeout(previous)
    logger.debug("TLS connection from %s: %s", peer, tls.describe(secured))
    return secured


class _ReplayingSocket(AssociationSocket):
    """pynetdicom's socket wrapper, also ready when replayed bytes wait.

    pynetdicom reads only when ``select`` says the connection is readable,
    which it cannot know of bytes admission has already read.
    """

    @property
    def ready(self) -> bool:
        connection = self.socket
        if isinstance(connection, _Replaying) and connection.pending():
            return True
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the connection, fewer only if it closes.

        pynetdicom reads 4 KiB at a time: 64 reads for a 256 KiB PDU, each
        also re-arming TCP_QUICKACK. Reading into one buffer takes whatever
        the kernel holds at each call, a few reads per PDU.
        """
        connection = cast(socket.socket, self.socket)
        # The length comes from the peer: the buffer grows with the bytes
        # that arrive, so that announcing gigabytes takes no memory.
        buffer = bytearray(min(nr_bytes, _FIRST_BUFFER))
        filled = 0
        while filled < nr_bytes:
            if filled == len(buffer):
                buffer.extend(bytes(min(filled, nr_bytes - filled)))
            with memoryview(buffer) as view, view[filled:] as rest:
                count = connection.recv_into(rest)
            if not count:
                break
            filled += count
        del buffer[filled:]
        return buffer


def _replay_admitted_request(event: evt.Event) -> None:
    """Let the new association's reactor see the request admission read."""
    wrapper = event.assoc.dul.socket
    if wrapper is not None and isinstance(wrapper.socket, _Replaying):
        # Same object layout; only ``ready`` changes.
        wrapper.__class__ = _ReplayingSocket


class HandoffServer(ThreadedAssociationServer):
    """An association server fed by a channel instead of a listening socket.

    ``artim`` is the ARTIM timer in seconds: how long a connection may take
    to send its A-ASSOCIATE-RQ (and, before that, to finish its TLS
    handshake). ``on_admit`` and ``on_close`` are called as
    :class:`HandedOverSocket` describes. ``tls_context`` serves the
    connections that came to the TLS port; None when TLS is off.
    """

    # A connection still waiting for its request must not hold up the
    # worker's shutdown; associations are finished separately.
    daemon_threads = True

    def __init__(
        self,
        ae: Any,
        channel: socket.socket,
        public_address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        evt_handlers: list[Any],
        artim: float,
        on_admit: Callable[[], None] = lambda: None,
        on_close: Callable[[bool], None] = lambda admitted: None,
        tls_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[str, str], None] = lambda host, reason: None,
    ) -> None:
        self._channel = channel
        self._on_tls_failure = on_tls_failure
        self._tls_context = tls_context
        if tls_context is not None:
            tls_context.sslsocket_class = HandedOverTLSSocket
        self._artim = artim
        self._on_admit = on_admit
        self._on_close = on_close
        self._public_address = public_address
        # The base class binds and listens on this address in its
        # constructor; server_bind below swaps in the channel instead.
        handlers = [*evt_handlers, (evt.EVT_CONN_OPEN, _replay_admitted_request)]
        super().__init__(ae, public_address, ae_title, contexts, None, handlers)

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
        connection.on_admit = self._on_admit
        connection.on_close = self._on_close
        connection.settimeout(self.ae.network_timeout)
        host, port, *kind = json.loads(payload)
        connection.secure = kind == ["tls"]
        return connection, (host, int(port))

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to pynetdicom once its A-ASSOCIATE-RQ is in.

        Runs in the connection's own thread, so waiting blocks nobody else.
        """
        host, port = client_address
        peer = f"{host}:{port}"
        if request.secure:
            if self._tls_context is None:
                # The listener hands these over only when TLS is on.
                logger.error("TLS connection from %s: TLS is off here", peer)
                request.close()
                return
            failed = functools.partial(self._on_tls_failure, host)
            request = start_tls(request, self._tls_context, peer, self._artim, failed)
            if request is None:
                return
        admitted = admit(request, peer, self._artim)
        if admitted is None:
            return
        request.admit(admitted)
        super().finish_request(request, client_address)
