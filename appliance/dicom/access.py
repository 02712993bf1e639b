"""Who may store and who may query or retrieve: the calling AE title and host.

An allow-list names peers from the configuration; a caller matches a peer
when both its AE title and the address it connects from match. Host names
in the configuration are resolved when the list is built.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from appliance.config import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Permissions:
    """What one association may do."""

    store: bool
    query: bool

    @property
    def anything(self) -> bool:
        return self.store or self.query


class AccessControl:
    """Decides, per association, whether storage and query/retrieve are allowed."""

    def __init__(self, config: Config) -> None:
        self.restrict_storage = bool(config.get("access.restrict_storage"))
        self.restrict_query = bool(config.get("access.restrict_query"))
        self._storage = self._resolve(config, config.get("access.storage"))
        self._query = self._resolve(config, config.get("access.query"))

    def permissions(self, calling_ae: str, address: str) -> Permissions:
        """The permissions of a caller with AE title ``calling_ae`` at ``address``."""
        caller = (calling_ae.strip(), _normalise(address))
        store = not self.restrict_storage or caller in self._storage
        query = not self.restrict_query or caller in self._query
        return Permissions(store=store, query=query)

    @staticmethod
    def _resolve(config: Config, titles: list[str]) -> set[tuple[str, str]]:
        allowed: set[tuple[str, str]] = set()
        for title in titles:
            peer = config.peer(title)
            if peer is None:
                continue
            for address in _addresses(peer.host):
                allowed.add((peer.ae_title, address))
        return allowed


def _addresses(host: str) -> set[str]:
    try:
        return {_normalise(host)} if ipaddress.ip_address(host) else set()
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        logger.warning("access list: cannot resolve peer host %s: %s", host, exc)
        return set()
    return {_normalise(str(info[4][0])) for info in infos}


def _normalise(address: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 addresses become IPv4."""
    try:
        parsed = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        return str(parsed.ipv4_mapped)
    return str(parsed)
