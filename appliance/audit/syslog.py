"""Syslog delivery of audit messages: RFC 5424 messages over UDP (RFC 5426)
or TLS (RFC 5425), as PS3.15 A.6 and A.7 ask.

A message is::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [meta sequenceId="N"] BOM XML

PRI is facility * 8 + severity: severity 5 (notice) for most messages and 4
(warning) for failures and security alerts (PS3.15 A.7), so that with the
default facility, authpriv (10), most messages start with ``<85>``. MSGID
is ``DICOM+RFC3881``; the ``meta`` element's sequenceId (RFC 5424 7.3.1)
counts the records the sender has sent, so that a collector can see a gap
or a repeat. Over TLS each message is framed by octet counting, its length
in bytes, a space, then the message (RFC 5425 4.3).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from dataclasses import dataclass

from appliance.audit.log import Record

APP_NAME = "pacs-appliance"
MSG_ID = "DICOM+RFC3881"
BOM = b"\xef\xbb\xbf"
NOTICE = 5
WARNING = 4
FACILITIES = {
    "auth": 4,
    "authpriv": 10,
    "audit": 13,
    **{f"local{n}": 16 + n for n in range(8)},
}
DEFAULT_PORTS = {"udp": 514, "tls": 6514}
# What fits in one UDP datagram over IPv4; longer messages are not sent
# over UDP (RFC 5426 3.2 allows truncation, which would break the XML).
MAX_DATAGRAM = 65507


def severity_of(record: Record) -> int:
    """Warning for security alerts and failed events, notice otherwise."""
    alert = record.outcome != 0 or record.event == "security-alert"
    return WARNING if alert else NOTICE


def format_message(
    record: Record, facility: int, hostname: str, sequence: int
) -> bytes:
    """One RFC 5424 message for ``record``."""
    pri = facility * 8 + severity_of(record)
    procid = str(record.pid) if record.pid else "-"
    sequence_id = (sequence - 1) % 2147483647 + 1
    header = (
        f"<{pri}>1 {record.time} {_printable(hostname, 255)} {APP_NAME} "
        f'{procid} {MSG_ID} [meta sequenceId="{sequence_id}"] '
    )
    return header.encode("ascii") + BOM + record.message.encode("utf-8")


def _printable(text: str, limit: int) -> str:
    """Printable US-ASCII only, as the header fields must be; "-" if empty."""
    kept = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


@dataclass(frozen=True)
class Destination:
    """Where and how to send: the [audit] syslog keys, resolved."""

    transport: str  # udp or tls
    host: str
    port: int
    ca_file: str = ""
    certificate: str = ""
    key: str = ""
    timeout: float = 10.0


class UdpSender:
    """One datagram per message (RFC 5426). Nothing tells whether it
    arrived: a message sent while the collector is down is lost to it."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        info = socket.getaddrinfo(
            self.destination.host, self.destination.port, type=socket.SOCK_DGRAM
        )[0]
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        sock.settimeout(self.destination.timeout)
        self._sock = sock
        self._address = info[4]

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, message: bytes) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        if len(message) > MAX_DATAGRAM:
            raise MessageTooLong(len(message))
        self._sock.sendto(message, self._address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class MessageTooLong(Exception):
    """A message too long for one datagram; it stays in the local log."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes do not fit in one UDP datagram")


class TlsSender:
    """A TLS connection to the collector, TLS 1.2 at least, its certificate
    checked against the configured CA and its name (RFC 5425 5.2), with a
    client certificate when one is configured; octet-counting framing."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._sock: ssl.SSLSocket | None = None
        self._context = _client_context(destination)

    def connect(self) -> None:
        self.close()
        raw = socket.create_connection(
            (self.destination.host, self.destination.port),
            timeout=self.destination.timeout,
        )
        try:
            self._sock = self._context.wrap_socket(
                raw, server_hostname=self.destination.host
            )
        except (OSError, ssl.SSLError):
            raw.close()
            raise

    @property
    def connected(self) -> bool:
        """Connected, and the collector has not closed its side.

        A collector sends no messages (RFC 5425), but TLS itself may: a
        TLS 1.3 server sends session tickets after the handshake. Readable
        bytes that TLS takes in are those; anything else (the end of the
        connection, an alert, data) means the collector closed it or is
        closing it, and sending into it would lose what is written.
        """
        if self._sock is None:
            return False
        readable, _, _ = select.select([self._sock], [], [], 0)
        if readable and not self._only_tls_records():
            self.close()
            return False
        return True

    def _only_tls_records(self) -> bool:
        """Whether what there was to read was TLS's own records only."""
        assert self._sock is not None
        self._sock.setblocking(False)
        try:
            self._sock.recv(1)
        except ssl.SSLWantReadError:
            return True
        except (OSError, ssl.SSLError):
            return False
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(self.destination.timeout)
        return False

    def send(self, message: bytes) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(str(len(message)).encode() + b" " + message)

    def close(self) -> None:
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        with contextlib.suppress(OSError):
            sock.close()


def _client_context(destination: Destination) -> ssl.SSLContext:
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=destination.ca_file or None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.certificate:
        context.load_cert_chain(destination.certificate, destination.key or None)
    return context


def sender_for(destination: Destination) -> UdpSender | TlsSender:
    if destination.transport == "tls":
        return TlsSender(destination)
    return UdpSender(destination)
