"""Opening an SSH session to the mirror: a pinned host key, key login,
keepalives and a timeout on every step.

The mirror's host key must be listed in the ``known_hosts`` file of the
configuration (OpenSSH format, ``[host]:port`` for ports other than 22).
An unknown or changed key fails before anything is sent, authentication
included; nothing is ever added to that file.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import paramiko

from appliance.errors import HostKeyError, LoginRefusedError, TransportError
from appliance.replication.transports.hostkeys import (
    changed_key_message,
    unknown_host_message,
)
from appliance.replication.transports.settings import SftpSettings

logger = logging.getLogger(__name__)

# Listed first so that OpenSSH servers choose them: AES-GCM needs no
# separate MAC, which is most of paramiko's cost per packet.
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@dataclass
class Session:
    """One SSH connection to the mirror and its SFTP channel."""

    client: paramiko.SSHClient
    sftp: paramiko.SFTPClient

    def active(self) -> bool:
        """Whether the connection is still up, as far as paramiko knows."""
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def abort(self) -> None:
        """Cut the connection now; safe to call from another thread.

        Calls blocked on it (a write waiting for the server's window, a read
        waiting for data) fail at once.
        """
        transport = self.client.get_transport()
        if transport is not None:
            transport.close()

    def close(self) -> None:
        """Close the SFTP channel and the connection, ignoring failures."""
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.sftp.close()
        self.client.close()


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuse a mirror whose host is not in known_hosts, saying what to do."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        offered = f"{key.get_name()} {key.fingerprint}"
        raise HostKeyError(unknown_host_message(hostname, offered, self.known_hosts))


def open_session(settings: SftpSettings) -> Session:
    """Connect, check the host key, log in with the key file, start SFTP.

    Raises HostKeyError for an unknown or changed host key and
    TransportError for a refused login or an unusable key file; network
    failures come out as paramiko or socket errors for the caller to retry.
    """
    key = _load_key(settings.key_file)
    client = paramiko.SSHClient()
    _pin_host_keys(client, settings.known_hosts)
    try:
        _connect(client, settings, key)
        sftp = client.open_sftp()
        sftp.get_channel().settimeout(settings.timeout)
    except BaseException:
        client.close()
        raise
    logger.info("mirror: connected to %s", settings.where)
    return Session(client, sftp)


def _connect(
    client: paramiko.SSHClient, settings: SftpSettings, key: paramiko.PKey
) -> None:
    try:
        client.connect(
            settings.host,
            port=settings.port,
            username=settings.user,
            pkey=key,
            timeout=settings.timeout,
            banner_timeout=settings.timeout,
            auth_timeout=settings.timeout,
            channel_timeout=settings.timeout,
            allow_agent=False,
            look_for_keys=False,
            transport_factory=_fast_transport,
        )
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(_changed_key_message(settings, exc)) from exc
    except paramiko.AuthenticationException as exc:
        raise LoginRefusedError(
            f"the mirror {settings.where} refused the key {settings.key_file}: "
            "add its public half to the authorized_keys of that user on the "
            f"mirror ({exc})"
        ) from exc
    transport = client.get_transport()
    if transport is not None and settings.keepalive > 0:
        transport.set_keepalive(max(1, round(settings.keepalive)))


def _fast_transport(sock: object, **kwargs: object) -> paramiko.Transport:
    """A paramiko Transport that prefers the ciphers it runs fastest."""
    transport = paramiko.Transport(sock, **kwargs)  # type: ignore[arg-type]
    options = transport.get_security_options()
    offered = [name for name in _FAST_CIPHERS if name in options.ciphers]
    others = [name for name in options.ciphers if name not in offered]
    options.ciphers = (*offered, *others)
    return transport


def _changed_key_message(
    settings: SftpSettings, exc: paramiko.BadHostKeyException
) -> str:
    offered = f"{exc.key.get_name()} {exc.key.fingerprint}"
    pinned = f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}"
    host = f"{settings.host}:{settings.port}"
    return changed_key_message(host, offered, pinned, settings.known_hosts)


def _pin_host_keys(client: paramiko.SSHClient, known_hosts: Path) -> None:
    """Trust exactly the keys of ``known_hosts``; refuse any other host."""
    try:
        # HostKeys.load, unlike SSHClient.load_host_keys, never writes back.
        client.get_host_keys().load(str(known_hosts))
    except OSError as exc:
        raise HostKeyError(
            f"cannot read the mirror's known_hosts file {known_hosts} "
            f"({exc.strerror or exc}): it must list the mirror's host key"
        ) from exc
    client.set_missing_host_key_policy(_RefuseUnknownHost(known_hosts))


def _load_key(path: Path) -> paramiko.PKey:
    """The private key to log in with (a key without passphrase)."""
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise TransportError(
            f"cannot use {path} as the key to log in to the mirror: {exc}"
        ) from exc
