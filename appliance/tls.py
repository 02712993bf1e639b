"""TLS for every connection the appliance serves or opens: one profile, one place.

The profile follows the DICOM Secure Transport Connection Profiles of
PS3.15 B.9 to B.11, which defer to BCP 195 (RFC 9325): TLS 1.2 at least,
TLS 1.3 whenever the peer offers it (OpenSSL picks the highest version
both sides speak); for TLS 1.2 only ephemeral elliptic-curve key exchange
with an AEAD cipher (AES-GCM, ChaCha20-Poly1305); no TLS compression (CRIME)
and no renegotiation. TLS 1.3's own suites are all AEAD and kept as OpenSSL
orders them.

Contexts are built here from the ``[tls]`` keys for the DICOM and HL7
listeners (:func:`server_context`) and for associations the appliance opens
to a peer configured ``tls = true`` (:func:`client_context`). A peer's AE
title may be bound to its certificate (``certificate_cn`` or
``certificate_sha256``); :func:`binding_problem` says whether a connection
carries that certificate, whichever side opened it.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from appliance.config import Config, Peer
from appliance.errors import ConfigError

logger = logging.getLogger(__name__)

# TLS 1.2 suites (RFC 9325 4.2): ECDHE key exchange, AEAD ciphers only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"

# Every option turns something off that BCP 195 rules out: compression, and
# renegotiation (a client could start it on its own); and a server picks
# the suite by its own order, not the client's.
_OPTIONS = (
    ssl.OP_NO_COMPRESSION
    | ssl.OP_NO_RENEGOTIATION
    | ssl.OP_CIPHER_SERVER_PREFERENCE
    | ssl.OP_SINGLE_ECDH_USE
)


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= _OPTIONS
    return context


def server_context(config: Config) -> ssl.SSLContext:
    """The context the DICOM and HL7 TLS listeners wrap connections with.

    With tls.verify_clients a client must present a certificate that a CA
    in tls.ca_file signed. Without it, a certificate is still asked for
    when some peer's AE title is bound to one, and checked if sent: the
    binding is then checked per association.
    """
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(_path(config, "tls.certificate"), _path(config, "tls.key"))
    if config.get("tls.verify_clients"):
        context.verify_mode = ssl.CERT_REQUIRED
    elif any(peer.bound_to_certificate for peer in config.peers):
        context.verify_mode = ssl.CERT_OPTIONAL
    if context.verify_mode != ssl.CERT_NONE:
        context.load_verify_locations(cafile=_path(config, "tls.ca_file"))
    return context


def client_context(config: Config, peer: Peer | None) -> ssl.SSLContext | None:
    """The context for an association to ``peer``; None when the peer is
    not configured ``tls = true`` (or is not a configured peer at all).

    The peer's certificate must be signed by a CA in tls.ca_file, name
    the peer's host (its address or DNS name) and, when the peer is bound
    to a certificate, be that certificate; the appliance presents its
    own certificate, for peers that verify their clients. ConfigError when
    the files cannot be loaded.
    """
    if peer is None or not peer.tls:
        return None
    context = _PeerContext(ssl.PROTOCOL_TLS_CLIENT)
    context.peer = peer
    _profile(context)
    context.sslsocket_class = _ClientSocket
    try:
        context.load_verify_locations(cafile=_path(config, "tls.ca_file"))
        context.load_cert_chain(
            _path(config, "tls.certificate"), _path(config, "tls.key")
        )
    except OSError as exc:
        message = f"cannot load tls.certificate, tls.key or tls.ca_file: {failure(exc)}"
        raise ConfigError([("tls", message)]) from exc
    return context


class _PeerContext(ssl.SSLContext):
    """A client context for connections to one configured peer."""

    peer: Peer | None = None


class CertificateNotBound(ssl.SSLError):
    """The peer's certificate is valid but not the one its AE title is
    bound to. An OSError, as a failed handshake is, so that pynetdicom
    reports the connection as failed and closes it."""


class _ClientSocket(ssl.SSLSocket):
    """A client-side TLS socket that logs a failed handshake in one line,
    with the peer and the reason (pynetdicom's own lines are turned off:
    see appliance.dicom.node.configure_pynetdicom).

    A peer bound to a certificate (``certificate_cn``, ``certificate_sha256``)
    must present that one, as it must when it calls the appliance: the
    handshake fails otherwise, before any PDU is sent.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (OSError, ValueError) as exc:
            logger.warning(
                "TLS handshake with %s failed: %s", self._address(), failure(exc)
            )
            raise
        peer = getattr(self.context, "peer", None)
        problem = binding_problem(peer, self)
        if problem and peer is not None:
            logger.warning(
                "TLS connection to %s at %s refused: %s",
                peer.ae_title,
                self._address(),
                problem,
            )
            raise CertificateNotBound(problem)

    def _address(self) -> str:
        try:
            host, port = self.getpeername()[:2]
        except OSError:
            return "a peer"
        return f"{host}:{port}"


def client_args(config: Config, peer: Peer | None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``peer``, or None."""
    context = client_context(config, peer)
    if context is None or peer is None:
        return None
    return context, peer.host


def _path(config: Config, key: str) -> str:
    return str(config.file_path(key))


# -- certificate binding ---------------------------------------------------------


def binding_problem(peer: Peer | None, connection: Any) -> str | None:
    """Why an association on ``connection`` may not use ``peer``'s AE title,
    or None. Only AE titles bound to a certificate are checked; such a
    title must come over TLS with a verified certificate that matches.
    The same holds for a connection the appliance opens to the peer."""
    if peer is None or not peer.bound_to_certificate:
        return None
    if not isinstance(connection, ssl.SSLSocket):
        bound = f"AE title {peer.ae_title} is bound to a certificate"
        return f"{bound}; it came without TLS"
    details = connection.getpeercert()
    der = connection.getpeercert(binary_form=True)
    if not details or not der:
        return f"AE title {peer.ae_title} is bound to a certificate; none was sent"
    common_names = _common_names(details)
    if peer.certificate_cn and peer.certificate_cn not in common_names:
        sent = ", ".join(common_names) or "no common name"
        return (
            f"AE title {peer.ae_title} is bound to certificate CN "
            f"{peer.certificate_cn!r}; the certificate is for {sent}"
        )
    expected = _normalised(peer.certificate_sha256)
    if expected and fingerprint(der) != expected:
        return (
            f"AE title {peer.ae_title} is bound to the certificate of SHA-256 "
            f"{expected}; the certificate sent has SHA-256 {fingerprint(der)}"
        )
    return None


def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint, as lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def _normalised(value: str) -> str:
    return value.replace(":", "").lower()


def _common_names(details: dict[str, Any]) -> list[str]:
    """The subject common names of a certificate as ssl.getpeercert() gives it."""
    return [
        value
        for relative_name in details.get("subject", ())
        for name, value in relative_name
        if name == "commonName"
    ]


def describe(connection: Any) -> str:
    """The negotiated version and suite, e.g. 'TLSv1.3 TLS_AES_256_GCM_SHA384'."""
    if not isinstance(connection, ssl.SSLSocket):
        return "no TLS"
    suite = connection.cipher()
    return f"{connection.version()} {suite[0] if suite else '?'}"


def failure(exc: BaseException) -> str:
    """A TLS failure in a few words, for its one log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no complete handshake within timeouts.association"
    return str(exc) or type(exc).__name__


# -- checking the files ------------------------------------------------------------


def unchecked_bindings(config: Config) -> list[str]:
    """One caveat for each peer bound to a certificate that the appliance
    connects to without TLS: its binding holds for associations it opens,
    but nothing checks who answers when the appliance calls it."""
    return [
        f"peer {peer.ae_title} is bound to a certificate, but tls = false: "
        "connections the appliance makes to it are not checked (set tls = "
        "true, with its TLS port, to check them)"
        for peer in config.peers
        if peer.bound_to_certificate and not peer.tls
    ]


def file_problems(config: Config) -> list[tuple[str, str]]:
    """What is wrong with the configured certificate, key and CA file, as
    ``(key, message)``: missing or unreadable files, a file that holds no
    certificate or key, an expired certificate, a key that does not match."""
    if not _tls_in_use(config):
        return []
    problems: list[tuple[str, str]] = []
    certificate = key = None
    if config.get("tls.certificate"):
        certificate = _check_certificate(config, "tls.certificate", problems)
    if config.get("tls.key"):
        key = _check_key(config, problems)
    if certificate is not None and key is not None:
        ours = _public_bytes(certificate.public_key())
        if ours != _public_bytes(key.public_key()):
            problems.append(("tls.key", "does not match the key of tls.certificate"))
    if config.get("tls.ca_file"):
        _check_ca_file(config, problems)
    return problems


def _tls_in_use(config: Config) -> bool:
    return bool(
        config.get("tls.enabled")
        or (config.get("hl7.enabled") and config.get("hl7.tls"))
        or any(peer.tls or peer.bound_to_certificate for peer in config.peers)
    )


def _read(config: Config, key: str, problems: list[tuple[str, str]]) -> bytes | None:
    path = Path(_path(config, key))
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append((key, f"{path} does not exist"))
    except OSError as exc:
        problems.append((key, f"cannot read {path}: {exc.strerror or exc}"))
    return None


def _check_certificate(
    config: Config, key: str, problems: list[tuple[str, str]]
) -> x509.Certificate | None:
    data = _read(config, key, problems)
    if data is None:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append((key, f"{_path(config, key)} holds no PEM certificate"))
        return None
    now = datetime.now(UTC)
    if certificate.not_valid_after_utc < now:
        expired = certificate.not_valid_after_utc.date().isoformat()
        problems.append((key, f"the certificate expired on {expired}"))
    elif certificate.not_valid_before_utc > now:
        start = certificate.not_valid_before_utc.date().isoformat()
        problems.append((key, f"the certificate is valid only from {start}"))
    return certificate


def _check_key(config: Config, problems: list[tuple[str, str]]) -> Any:
    data = _read(config, "tls.key", problems)
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        message = "the key is encrypted; the appliance needs it unencrypted"
    except (ValueError, UnsupportedAlgorithm):
        message = f"{_path(config, 'tls.key')} holds no PEM private key"
    problems.append(("tls.key", message))
    return None


def _check_ca_file(config: Config, problems: list[tuple[str, str]]) -> None:
    data = _read(config, "tls.ca_file", problems)
    if data is None:
        return
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        path = _path(config, "tls.ca_file")
        problems.append(("tls.ca_file", f"{path} holds no PEM certificate"))


def _public_bytes(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
