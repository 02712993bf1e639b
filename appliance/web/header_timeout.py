"""A time limit on each HTTP request's line and headers.

uvicorn closes a kept-alive connection that stays silent after a response
(``timeout_keep_alive``), but it waits for ever for the headers of a
request: a client that opens many connections and sends nothing, or a
header byte now and then, holds as many file descriptors as it likes.
Here a request's line and headers must be complete within
``web.header_timeout`` seconds, counted from the connection's start or
from the end of the previous response on it, however the bytes trickle in.
Once the headers are in the clock stops: a request body is not timed
here (a STOW-RS upload has ``web.stow_stall_timeout``), nor is the answer.
Each connection closed so is logged once a minute per client address, the
others counted (:mod:`appliance.peer_warnings`): opening them costs the
client nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.peer_warnings import PeerWarnings
from appliance.web.protocol_warnings import ConnectionLogger

logger = logging.getLogger(__name__)

_LATE = PeerWarnings(
    logger, "HTTP connections closed so (request headers not complete in time)"
)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and
    headers are not complete within ``header_timeout`` seconds."""

    header_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn makes the protocol when it accepts the connection, before
        # any TLS handshake: an HTTPS client's handshake counts too.
        self._accepted = self.loop.time()
        self._deadline: asyncio.TimerHandle | None = None
        # Whether the clock runs since the end of a response, not the start.
        self._kept_alive = False

    # A Transport, not asyncio's BaseTransport: as in uvicorn's own.
    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # uvicorn's warnings about this connection's bytes name its address
        # and are limited per address.
        address = self.client[0] if self.client else ""
        self.logger = ConnectionLogger(  # type: ignore[assignment]
            self.logger, address, _peer(self.client)
        )
        self._deadline = self.loop.call_at(
            self._accepted + self.header_timeout, self._headers_late
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Keep the clock running while headers are awaited, and only then;
        after a response it starts anew."""
        if not self._awaiting_headers():
            self._stop_clock()
        elif self._deadline is None:
            self._kept_alive = True
            self._deadline = self.loop.call_later(
                self.header_timeout, self._headers_late
            )

    def _awaiting_headers(self) -> bool:
        # h11 leaves the client's side IDLE until a request's headers are
        # all in; during its body it is SEND_BODY, during the answer DONE.
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._awaiting_headers():
            return
        received = len(self.conn.trailing_data[0])
        # A kept-alive connection with nothing of a next request is only
        # idle: closed without a line, as uvicorn's keep-alive timeout does
        # when it is the shorter one.
        if received or not self._kept_alive:
            # WARNING, not INFO: working clients send their headers at once,
            # so this is a broken client, a bad network or someone holding
            # connections open, which the administrator should see (it is
            # listed with the recent errors). One line per connection, up
            # to one a minute per address.
            _LATE.warning(
                self.client[0] if self.client else "",
                "HTTP connection from %s closed: its request headers were not "
                "complete in %g s (web.header_timeout; %d bytes of them came)",
                _peer(self.client),
                self.header_timeout,
                received,
            )
        self._hang_up()

    def _hang_up(self) -> None:
        # With nothing left to send, abort: over TLS, close() would keep the
        # descriptor up to 30 s more, waiting for the client to answer its
        # goodbye. The rest of a previous answer still buffered is sent first.
        if self.transport.get_write_buffer_size():
            self.transport.close()
        else:
            self.transport.abort()


def _peer(client: tuple[str, int] | None) -> str:
    if client is None:
        return "an unknown address"
    host, port = client
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (which makes one per connection
    with its own arguments), with the limit set."""
    return type(
        "HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds}
    )
