"""uvicorn's warnings about a connection's bytes, named and held in check.

uvicorn logs ``Invalid HTTP request received.`` (and ``Unsupported upgrade
request.``) at WARNING for each request it cannot take, without the
client's address. A client that sends junk on new connections, which costs
it nothing and needs no account, would get a WARNING line per connection:
enough to bury the log and push every other process's warnings out of the
recent errors. Each connection's protocol gets a logger that names the
address in such a line and logs at most one a minute per address, the
others counted (:mod:`appliance.peer_warnings`).
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.peer_warnings import PeerWarnings

logger = logging.getLogger(__name__)

_REFUSED = PeerWarnings(logger, "HTTP requests refused so (not valid or supported)")


class ConnectionLogger:
    """Stands for uvicorn's logger in one connection's protocol: a warning
    goes through the per-address limit with the address; the rest is
    uvicorn's logger's own."""

    def __init__(self, uvicorn_logger: logging.Logger, address: str, peer: str) -> None:
        """``address`` is the client's host (what the limit counts by),
        ``peer`` its host and port (what the line names)."""
        self._logger = uvicorn_logger
        self._address = address
        self._peer = peer

    def warning(self, message: str, *args: object, **_kwargs: object) -> None:
        # Every warning uvicorn's protocol logs is about what the client
        # sent (a malformed request, an upgrade, one request too many).
        text = message % args if args else message
        _REFUSED.warning(
            self._address, "HTTP request from %s refused: %s", self._peer, text
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)
