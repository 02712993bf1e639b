"""Opening an SFTP session through OpenSSH's own client, ``ssh -s HOST sftp``.

The ``ssh`` child process makes the connection, checks the host key, logs
in and encrypts; this side speaks SFTP over a socket pair that is the
child's standard input and output (:mod:`.sftpwire`). Nothing of the
machine's or the user's ssh configuration counts (``-F none``); every
option is set here::

    BatchMode=yes                 never ask a question, fail instead
    StrictHostKeyChecking=yes     the host key must be pinned in ...
    UserKnownHostsFile=FILE       ... mirror.known_hosts, and only there
    GlobalKnownHostsFile=none
    UpdateHostKeys=no             nothing is ever written to that file
    IdentitiesOnly=yes            log in with mirror.key_file only,
    IdentityAgent=none            never with an agent's keys
    ConnectTimeout=TIMEOUT        mirror.timeout
    ServerAliveInterval=SECONDS   mirror.keepalive (0: none)
    Ciphers=^aes128-gcm...        AES-GCM first: AES-NI makes it cheapest

An unknown or changed host key and a refused login end the child before
anything is sent; its messages are turned into HostKeyError and
TransportError. Any other early end (refused connection, no route, a name
that does not resolve) comes out as ConnectionError with ssh's own last
message, for the caller to retry.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import IO

from appliance.errors import HostKeyError, LoginRefusedError, TransportError
from appliance.replication.transports.hostkeys import (
    changed_key_message,
    unknown_host_message,
)
from appliance.replication.transports.settings import SftpSettings
from appliance.replication.transports.sftpwire import ProtocolError, SftpWire

logger = logging.getLogger(__name__)

SSH = "ssh"
_PREFERRED_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
# Room for what is in flight both ways: WINDOW requests of up to 256 KiB.
_SOCKET_BUFFER = 4 * 1024 * 1024
# Seconds to wait for ssh to end once its standard input is closed.
_EXIT_WAIT = 5.0
_STDERR_LINES = 200
_OFFERED = re.compile(r"Server host key: (\S+) (SHA256:\S+)")
_CIPHER = re.compile(r"kex: client->server cipher: (\S+)")
# What ssh -v prints that is not about a failure: its version at the start,
# its byte counts at the end.
_NOT_A_REASON = re.compile(r"^(OpenSSH_|Transferred: |Bytes per second: )")
# Longest reason taken from ssh's messages, so that a log line stays short.
_REASON_LENGTH = 300


class SshSession:
    """One ``ssh`` child process and the SFTP session it carries."""

    def __init__(
        self, process: subprocess.Popen[bytes], sock: socket.socket, log: _ErrorLog
    ) -> None:
        self.process = process
        self.wire = SftpWire(sock)
        self._sock = sock
        self._log = log

    @property
    def cipher(self) -> str:
        """The cipher ssh agreed on for what it sends ("" if not seen)."""
        return self._log.cipher

    def active(self) -> bool:
        """Whether the ssh process still runs."""
        return self.process.poll() is None

    def abort(self) -> None:
        """Cut the connection now; safe to call from another thread.

        Calls blocked on the socket fail at once: the socket is shut down
        and the ssh process (ours) is killed.
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.process.kill()

    def close(self) -> None:
        """End the session: ssh sees its input end and exits; killed if not."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self.process.wait(_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.join()
        self._sock.close()

    def failure(
        self, settings: SftpSettings
    ) -> ConnectionError | TransportError | None:
        """Why ssh ended before the session started, if it said so: a
        TransportError for what trying again cannot mend, else a
        ConnectionError in ssh's words (None if ssh still runs or said
        nothing)."""
        try:
            self.process.wait(_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return None
        self._log.join()
        text = self._log.text()
        final = _explain(text, self._log.offered, settings)
        if final is not None:
            return final
        return _connection_failure(text)


class _ErrorLog:
    """Reads ssh's standard error in a thread: the last lines and the host
    key it was offered, for messages; everything at DEBUG."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.offered = ""
        self.cipher = ""
        self._stream = stream
        self._lines: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._thread = threading.Thread(target=self._read, name="ssh-stderr")
        self._thread.daemon = True
        self._thread.start()

    def _read(self) -> None:
        with self._stream:
            for raw in self._stream:
                line = raw.decode("utf-8", "replace").rstrip()
                if found := _OFFERED.search(line):
                    self.offered = f"{found.group(1)} {found.group(2)}"
                elif found := _CIPHER.search(line):
                    self.cipher = found.group(1)
                if not line.startswith("debug"):
                    self._lines.append(line)
                logger.debug("ssh: %s", line)

    def join(self) -> None:
        self._thread.join(_EXIT_WAIT)

    def text(self) -> str:
        return "\n".join(self._lines)


def ssh_command(settings: SftpSettings, ssh: str = SSH) -> list[str]:
    """The ``ssh`` command line that opens the mirror's SFTP subsystem."""
    options = {
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": _quoted(settings.known_hosts),
        "GlobalKnownHostsFile": "none",
        "UpdateHostKeys": "no",
        "CheckHostIP": "no",
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "IdentityFile": _quoted(settings.key_file),
        "PreferredAuthentications": "publickey",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "ConnectTimeout": str(max(1, round(settings.timeout))),
        "ConnectionAttempts": "1",
        "ServerAliveInterval": str(max(0, round(settings.keepalive))),
        "Ciphers": _PREFERRED_CIPHERS,
        "ClearAllForwardings": "yes",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "Compression": "no",
    }
    command = [ssh, "-F", "none", "-v", "-p", str(settings.port), "-l", settings.user]
    for key, value in options.items():
        command += ["-o", f"{key}={value}"]
    # "--" keeps a host name that starts with "-" from being read as an option.
    return [*command, "-s", "--", settings.host, "sftp"]


def open_ssh_session(settings: SftpSettings, ssh: str = SSH) -> SshSession:
    """Start ssh, wait for the SFTP session to start; the session.

    Raises HostKeyError for an unknown or changed host key, TransportError
    for a refused login, a missing ssh or unusable files; EOFError,
    TimeoutError or OSError for failures worth trying again.
    """
    program = _find(ssh)
    _check_files(settings)
    session = _spawn(ssh_command(settings, program))
    try:
        session.wire.start()
    except (OSError, EOFError, ProtocolError) as exc:
        failure = session.failure(settings)
        session.close()
        if failure is not None:
            raise failure from exc
        raise
    except BaseException:
        session.close()
        raise
    logger.info(
        "mirror: connected to %s through %s (%s)",
        settings.where,
        program,
        session.cipher or "cipher not reported",
    )
    return session


def _spawn(command: list[str]) -> SshSession:
    mine, theirs = socket.socketpair()
    for end in (mine, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            end.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
    try:
        process = subprocess.Popen(
            command,
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
            close_fds=True,
        )
    except OSError:
        mine.close()
        raise
    finally:
        theirs.close()
    assert process.stderr is not None
    return SshSession(process, mine, _ErrorLog(process.stderr))


def _find(ssh: str) -> str:
    program = shutil.which(ssh)
    if program is None:
        raise TransportError(
            f"OpenSSH's client ({ssh}) is not installed: install openssh-client, "
            'or set mirror.client = "paramiko"'
        )
    return program


def _check_files(settings: SftpSettings) -> None:
    """ssh says little about files it cannot read: look first."""
    if not os.access(settings.known_hosts, os.R_OK):
        raise HostKeyError(
            f"cannot read the mirror's known_hosts file {settings.known_hosts}: "
            "it must list the mirror's host key"
        )
    if not os.access(settings.key_file, os.R_OK):
        raise TransportError(
            f"cannot use {settings.key_file} as the key to log in to the "
            "mirror: it is missing or unreadable"
        )


def _explain(text: str, offered: str, settings: SftpSettings) -> TransportError | None:
    """The error ssh's messages describe, or None for a connection failure."""
    host = f"{settings.host}:{settings.port}"
    if "IDENTIFICATION HAS CHANGED" in text or "has changed and you have" in text:
        pinned = (
            "another key (ssh-keygen -F "
            f"'[{settings.host}]:{settings.port}' -f {settings.known_hosts})"
        )
        return HostKeyError(
            changed_key_message(host, offered, pinned, settings.known_hosts)
        )
    if "host key is known for" in text or "Host key verification failed" in text:
        return HostKeyError(unknown_host_message(host, offered, settings.known_hosts))
    if "Permission denied (" in text:
        return LoginRefusedError(
            f"the mirror {settings.where} refused the key {settings.key_file}: "
            "add its public half to the authorized_keys of that user on the "
            f"mirror ({_last_line(text)})"
        )
    if "subsystem request failed" in text:
        return TransportError(f"the mirror {settings.where} does not offer SFTP")
    if "Load key" in text or "no such identity" in text:
        return TransportError(
            f"cannot use {settings.key_file} as the key to log in to the "
            f"mirror: {_last_line(text)}"
        )
    return None


def _connection_failure(text: str) -> ConnectionError | None:
    """ssh's own reason for a failed connection ("connect to host ... port
    ...: Connection refused"), None when it gave none.

    The socket this side reads ends too when ssh exits, but what it raises
    then (a reset, because the SFTP greeting was still unread in ssh's end,
    or an end of file) says nothing of why: ssh's message does.
    """
    reasons = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not _NOT_A_REASON.match(line)
    ]
    if not reasons:
        return None
    return ConnectionError(_one_line(reasons[-1]))


def _one_line(message: str) -> str:
    """A message of ssh's fit for one log line: no control characters (a
    host name is shown as ssh got it), at most _REASON_LENGTH characters."""
    printable = "".join(c if c.isprintable() else "?" for c in message)
    if len(printable) <= _REASON_LENGTH:
        return printable
    return printable[: _REASON_LENGTH - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _quoted(path: Path) -> str:
    """A path as an ssh option value (which splits at spaces unless quoted)."""
    return f'"{path}"' if " " in str(path) else str(path)
