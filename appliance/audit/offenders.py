"""Peers that keep sending what cannot be used: after ``limit`` refusals in
a row from one host, one security alert; another only after that host has
sent something good again."""

from __future__ import annotations

import threading

from appliance.audit import codes, events
from appliance.audit.trail import Trail

# Refusals in a row from one host that make a security alert.
LIMIT = 5


class RepeatedRefusals:
    """Counts refusals per host; thread-safe."""

    def __init__(self, trail: Trail | None, what: str, limit: int = LIMIT) -> None:
        self.trail = trail
        self.what = what
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def refused(self, peer: str, reason: str) -> None:
        host = host_of(peer)
        with self._lock:
            count = self._counts.get(host, 0) + 1
            self._counts[host] = count
        if count == self.limit and self.trail is not None:
            description = (
                f"{count} {self.what} messages in a row refused from {host}; "
                f"the last: {reason}"
            )
            message = events.security_alert(
                self.trail.ae_title,
                description,
                events.Peer("", host),
                codes.RESTRICTED_FUNCTION,
            )
            self.trail.record(message)

    def accepted(self, peer: str) -> None:
        with self._lock:
            self._counts.pop(host_of(peer), None)


def host_of(peer: str) -> str:
    """ "192.0.2.1:40000" or "[::1]:40000" without the port."""
    host, separator, port = peer.rpartition(":")
    if not separator or not port.isdigit():
        return peer
    return host.strip("[]")
