"""Client connections from loopback addresses of their own.

The appliance logs a stalled connection once a minute per client address
(``appliance.peer_warnings``). A test that expects a line for each of
several connections opens each from another address of 127.0.0.0/8, all of
which reach a server listening on 127.0.0.1; a test that checks the limit
opens several from one.
"""

from __future__ import annotations

import itertools
import socket

# Past 127.0.0.1, which every other test connects from.
_HOSTS = (f"127.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count(2))


def new_address() -> str:
    """A loopback address no connection of this process came from yet."""
    return next(_HOSTS)


def connect_from(
    address: str, port: int, timeout: float | None = None
) -> socket.socket:
    """A connection to 127.0.0.1:``port`` from ``address``."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(address, 0)
    )
