"""The MLLP listener: HL7 messages from the RIS in, ACKs out.

One asyncio loop in a thread of the service serves every connection; each
connection may carry any number of messages, answered in order. Handling a
message (parse, record durably, build the ACK) blocks on the catalog, so it
runs in a worker thread while the loop goes on reading other connections.

A connection silent for ``idle_timeout`` seconds is closed: RIS interfaces
reconnect when they have something to send, and a half-open connection
would otherwise hold its slot for ever. Noise between frames and frames over
``max_message_bytes`` are logged once per connection and per kind, not per
byte; noise also at most once a minute per address, the others counted
(:mod:`appliance.peer_warnings`), since a peer can open connections to send
it at will.

Over TLS (MLLP on a port of its own), the listener accepts connections
itself and completes each handshake within ``handshake_timeout`` before the
connection counts; a failed handshake gets one WARNING line with the peer,
at most once a minute per address (each one still goes to
``on_tls_failure``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from appliance.audit.offenders import host_of
from appliance.hl7 import acks
from appliance.hl7.framing import FrameReader, Received, frame
from appliance.hl7.messages import (
    APPLICATION_INTERNAL_ERROR,
    MessageError,
    header_alone,
)
from appliance.peer_warnings import PeerWarnings

logger = logging.getLogger(__name__)

# Called with a message's bytes and the peer's address; returns the ACK.
Handler = Callable[[bytes, str], bytes]

_READ_SIZE = 65536

# What a peer can cause at will, logged once a minute per address.
_TLS_FAILED = PeerWarnings(logger, "HL7 TLS handshakes failed")
_NOISE = PeerWarnings(logger, "HL7 connections with bytes outside MLLP frames")


@dataclass(frozen=True)
class ListenerSettings:
    max_message_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    max_connections: int = 64
    handshake_timeout: float = 30.0


class Listener:
    """Serves MLLP on a bound, listening socket until :meth:`stop`; over TLS
    with ``tls_context`` (a server-side context)."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        settings: ListenerSettings,
        tls_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[str, str], None] = lambda peer, reason: None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.on_tls_failure = on_tls_failure
        self.settings = settings
        self.tls_context = tls_context
        # TLS connections still in their handshake, to cancel at the stop.
        self._handshakes: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="hl7", daemon=True)
        self._open: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        """Stop accepting, close every connection, and wait for the thread."""
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        if self.tls_context is not None:
            await self._serve_tls(self.tls_context)
            return
        server = await asyncio.start_server(self._connection, sock=self.sock)
        self._ready.set()
        async with server:
            await self._stopped.wait()
            server.close()
            await self._close_connections()
            await server.wait_closed()

    async def _serve_tls(self, context: ssl.SSLContext) -> None:
        """Accept here rather than in asyncio's server, which drops failed
        handshakes without a word."""
        assert self._stopped is not None
        accepting = self._loop.create_task(self._accept_tls(context))
        self._ready.set()
        await self._stopped.wait()
        accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(accepting, *self._handshakes, return_exceptions=True)
        await self._close_connections()

    async def _accept_tls(self, context: ssl.SSLContext) -> None:
        while True:
            try:
                connection, address = await self._loop.sock_accept(self.sock)
            except OSError as exc:
                logger.warning("HL7: cannot accept a TLS connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = self._loop.create_task(self._handshake(context, connection, address))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(
        self, context: ssl.SSLContext, connection: socket.socket, address: object
    ) -> None:
        peer = _describe(address)
        reader = asyncio.StreamReader(loop=self._loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
        try:
            transport, _ = await self._loop.connect_accepted_socket(
                lambda: protocol,
                connection,
                ssl=context,
                ssl_handshake_timeout=self.settings.handshake_timeout,
            )
        except (OSError, ssl.SSLError) as exc:
            _TLS_FAILED.warning(
                host_of(peer),
                "HL7 TLS handshake with %s failed: %s",
                peer,
                _reason(exc),
            )
            self.on_tls_failure(peer, _reason(exc))
            connection.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        await self._connection(reader, writer)

    async def _close_connections(self) -> None:
        """Cut every connection: an unanswered message is sent again by the
        RIS, and nothing it said is lost (ACKs follow commits). A connection
        accepted just now gets its handler started first, so that it is
        closed too rather than left to the garbage collector."""
        await asyncio.sleep(0)
        for _ in range(100):
            for writer in list(self._open):
                writer.close()
            if not self._open:
                return
            await asyncio.sleep(0.05)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = _describe(writer.get_extra_info("peername"))
        if len(self._open) >= self.settings.max_connections:
            logger.warning(
                "HL7 connection from %s refused: %d connections open already",
                peer,
                len(self._open),
            )
            writer.close()
            return
        # ACKs are small: without this, a sender that waits for each one
        # stalls on delayed ACKs of TCP.
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(writer)
        try:
            await self._converse(peer, reader, writer)
        except (ConnectionError, OSError) as exc:
            logger.info("HL7 connection from %s lost: %s", peer, exc)
        finally:
            self._open.discard(writer)
            writer.close()

    async def _converse(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        frames = FrameReader(self.settings.max_message_bytes)
        noted: set[str] = set()
        # A message must arrive whole within idle_timeout of its first
        # byte: a peer that trickles a byte now and then cannot hold a
        # connection (and a slot) for ever.
        frame_deadline: float | None = None
        while True:
            now = self._loop.time()
            wait = self.settings.idle_timeout
            if frame_deadline is not None:
                wait = max(0.0, frame_deadline - now)
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), wait)
            except TimeoutError:
                what = "part of a message" if frame_deadline else "nothing"
                logger.info(
                    "HL7 connection from %s sent %s for %.0f s; closed",
                    peer,
                    what,
                    self.settings.idle_timeout,
                )
                return
            if not data:
                return
            received = frames.feed(data)
            if not frames.pending:
                frame_deadline = None
            elif frame_deadline is None or received.frames:
                frame_deadline = self._loop.time() + self.settings.idle_timeout
            self._note_problems(peer, received, noted)
            # In the messages' order, refusals too: a sender that sends
            # several before reading pairs each ACK with its message so.
            for found in received.frames:
                if found.oversized:
                    answer = self._refusal(found.data)
                else:
                    answer = await self._loop.run_in_executor(
                        None, self._answer, found.data, peer
                    )
                writer.write(frame(answer))
            await writer.drain()

    def _answer(self, message: bytes, peer: str) -> bytes:
        """The handler's ACK; AE when the handler itself fails, since the
        sender waits for an answer to every message."""
        try:
            return self.handler(message, peer)
        except Exception as exc:
            logger.error("HL7 from %s: the message could not be handled: %r", peer, exc)
            error = MessageError(
                "AE", APPLICATION_INTERNAL_ERROR, "", "the message could not be handled"
            )
            return acks.refuse(None, error)

    def _note_problems(self, peer: str, received: Received, noted: set[str]) -> None:
        if received.skipped_bytes and "skipped" not in noted:
            noted.add("skipped")
            _NOISE.warning(
                host_of(peer),
                "HL7 from %s: %d bytes outside MLLP frames ignored "
                "(reported once per connection)",
                peer,
                received.skipped_bytes,
            )
        if received.oversized and "oversized" not in noted:
            noted.add("oversized")
            logger.warning(
                "HL7 from %s: a message over %d bytes refused "
                "(reported once per connection)",
                peer,
                self.settings.max_message_bytes,
            )

    def _refusal(self, kept: bytes) -> bytes:
        """The AR for a message too large to read: its sender waits for an
        answer, addressed from its MSH (``kept``) as far as that was kept."""
        error = MessageError(
            "AR",
            APPLICATION_INTERNAL_ERROR,
            "",
            f"message longer than {self.settings.max_message_bytes} bytes",
        )
        return acks.refuse(header_alone(kept.decode("utf-8", "replace")), error)


def bind(address: str, port: int) -> socket.socket:
    """A listening TCP socket, bound before the service says it is ready."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return str(exc) or type(exc).__name__


def _describe(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
