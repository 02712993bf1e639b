"""Syslog collectors for the audit tests: TLS (RFC 5425, octet counting)
and UDP (RFC 5426), with certificates made for the test, and a parser of
RFC 5424 messages."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG (RFC 5424 6)
_HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>(?P<version>1) (?P<time>\S+) (?P<host>\S+) "
    rb"(?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    rb"(?P<sd>-|(?:\[[^\]]*\])+) (?P<msg>.*)$",
    re.DOTALL,
)
_SEQUENCE = re.compile(r'\[meta [^\]]*sequenceId="(\d+)"')
BOM = b"\xef\xbb\xbf"


@dataclass
class Syslog:
    pri: int
    time: str
    host: str
    app: str
    procid: str
    msgid: str
    structured: str
    xml: ET.Element

    @property
    def sequence(self) -> int:
        found = _SEQUENCE.search(self.structured)
        assert found, self.structured
        return int(found.group(1))

    @property
    def event_id(self) -> str:
        event = self.xml.find("EventIdentification/EventID")
        assert event is not None
        return event.get("csd-code", "")

    @property
    def event_types(self) -> list[str]:
        found = self.xml.findall("EventIdentification/EventTypeCode")
        return [e.get("csd-code", "") for e in found]

    @property
    def outcome(self) -> str:
        event = self.xml.find("EventIdentification")
        assert event is not None
        return event.get("EventOutcomeIndicator", "")


def parse(message: bytes) -> Syslog:
    """Parse one RFC 5424 message whose MSG is an audit message, checking
    the header fields' syntax on the way."""
    found = _HEADER.match(message)
    assert found, message[:200]
    time_text = found["time"].decode()
    datetime.datetime.fromisoformat(time_text.replace("Z", "+00:00"))
    for field in ("host", "app", "procid", "msgid"):
        assert all(33 <= b <= 126 for b in found[field]), field
    msg = found["msg"]
    assert msg.startswith(BOM), "MSG must be UTF-8 with a BOM"
    return Syslog(
        pri=int(found["pri"]),
        time=time_text,
        host=found["host"].decode(),
        app=found["app"].decode(),
        procid=found["procid"].decode(),
        msgid=found["msgid"].decode(),
        structured=found["sd"].decode(),
        xml=ET.fromstring(msg[len(BOM) :].decode("utf-8")),
    )


# -- certificates ---------------------------------------------------------------


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and a client certificate
    signed by it, and an unrelated CA."""
    ca_key, ca_cert = _ca("Test Audit CA")
    _other_key, other_cert = _ca("Some Other CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, "127.0.0.1", server=True)
    client_key, client_cert = _leaf(ca_key, ca_cert, "APPLIANCE", server=False)
    paths = Certificates(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=folder / "other-ca.pem",
    )
    paths.ca.write_bytes(_pem(ca_cert))
    paths.other_ca.write_bytes(_pem(other_cert))
    paths.server_cert.write_bytes(_pem(server_cert))
    paths.server_key.write_bytes(_key_pem(server_key))
    paths.client_cert.write_bytes(_pem(client_cert))
    paths.client_key.write_bytes(_key_pem(client_key))
    return paths


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    )
    return key, _validity(builder).sign(key, hashes.SHA256())


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common: str,
    server: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = (
        x509.ExtendedKeyUsageOID.SERVER_AUTH
        if server
        else (x509.ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            False,
        )
    )
    if server:
        names = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return key, _validity(builder).sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- collectors -----------------------------------------------------------------


class TlsCollector:
    """A syslog-over-TLS collector in a thread; stop() closes every
    connection, start() listens again on the same port."""

    def __init__(self, certs: Certificates, require_client: bool = False) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certs.server_cert, certs.server_key)
        if require_client:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(certs.ca)
        self.port = 0
        self.frames: list[bytes] = []
        self.handshake_failures = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> TlsCollector:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        for thread in self._threads:
            thread.join(10)
        self._threads = []

    def messages(self) -> list[Syslog]:
        with self._lock:
            return [parse(frame) for frame in self.frames]

    def wait_for(self, count: int, timeout: float = 60) -> list[Syslog]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.frames) >= count:
                    break
            time.sleep(0.05)
        return self.messages()

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _address = listener.accept()
            except OSError:
                return
            try:
                raw.settimeout(10)
                connection = self.context.wrap_socket(raw, server_side=True)
                connection.settimeout(None)
            except (OSError, ssl.SSLError):
                self.handshake_failures += 1
                raw.close()
                continue
            with self._lock:
                self._connections.append(connection)
            self._spawn(self._read, connection)

    def _read(self, connection: ssl.SSLSocket) -> None:
        buffer = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not chunk:
                return
            buffer += chunk
            buffer = self._frames_from(buffer)

    def _frames_from(self, buffer: bytes) -> bytes:
        """Take whole octet-counted frames (RFC 5425 4.3) off ``buffer``."""
        while b" " in buffer:
            length_text, rest = buffer.split(b" ", 1)
            assert length_text.isdigit() and not length_text.startswith(b"0"), (
                length_text[:20]
            )
            length = int(length_text)
            if len(rest) < length:
                break
            with self._lock:
                self.frames.append(rest[:length])
            buffer = rest[length:]
        return buffer


class UdpCollector:
    """A syslog-over-UDP collector: one message per datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def wait_for(self, count: int, timeout: float = 30) -> list[Syslog]:
        received: list[Syslog] = []
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            received.append(parse(data))
        return received

    def close(self) -> None:
        self.sock.close()
