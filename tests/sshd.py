"""A real OpenSSH server on a free loopback port, for the SFTP mirror tests.

It runs as the current user with keys generated for the test (ed25519, by
``ssh-keygen``) in its own folder, serves SFTP with ``internal-sftp``, and
is stopped by its process id, together with the session processes it
forked for connections. It can be stopped and started again on the same
port and keys (a mirror that goes away and comes back), killed outright
(a crash mid-upload), and given a new host key (a reinstalled mirror).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import psutil
import pytest

from tests.ports import listens, port_for

SSHD = Path("/usr/sbin/sshd")
# sshd run as root insists on its privilege separation folder.
PRIVSEP_FOLDER = Path("/run/sshd")


def require_sshd() -> None:
    """Skip the test, saying why, if OpenSSH's server or ssh-keygen is missing."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip(
            f"OpenSSH server missing ({SSHD} or ssh-keygen); "
            "apt-get install openssh-server"
        )


def generate_key(path: Path) -> None:
    """An ed25519 key pair without passphrase: ``path`` and ``path.pub``."""
    for old in (path, path.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", path],
        check=True,
        capture_output=True,
        timeout=30,
    )


class Sshd:
    """One sshd on 127.0.0.1, its keys and a known_hosts file that pins it."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        require_sshd()
        self.folder = folder
        # Held while this object lives: sshd is stopped and started again
        # on it, and a replicator may be set to it before it starts.
        self.port = port or port_for(self)
        self.user = getpass.getuser()
        self.host_key = folder / "host_ed25519"
        self.user_key = folder / "user_ed25519"
        self.authorized_keys = folder / "authorized_keys"
        self.known_hosts = folder / "known_hosts"
        self.config = folder / "sshd_config"
        self.log = folder / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        generate_key(self.host_key)
        generate_key(self.user_key)
        self.authorized_keys.write_text(self._public(self.user_key))
        self.write_known_hosts()

    def start(self) -> Sshd:
        """Start sshd and wait until it listens on its port."""
        if os.geteuid() == 0:
            PRIVSEP_FOLDER.mkdir(mode=0o755, exist_ok=True)
        self.config.write_text(self._config_text())
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", self.config],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._wait_until_listening()
        return self

    def stop(self) -> None:
        """Stop sshd and every session it forked; wait until they are gone."""
        self._signal_all(signal.SIGTERM)

    def kill(self) -> None:
        """kill -9 sshd and its sessions: the mirror crashes mid-transfer."""
        self._signal_all(signal.SIGKILL)

    def kill_sessions(self) -> None:
        """kill -9 the sessions only: connections drop, the server stays up."""
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def session_pids(self) -> list[int]:
        """The processes sshd forked for connections (ours to stop)."""
        if self.process is None or self.process.poll() is not None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(self.process.pid)
            return [child.pid for child in parent.children(recursive=True)]
        return []

    def replace_host_key(self) -> None:
        """Give the server a new host key (takes effect at the next start);
        known_hosts keeps pinning the old one."""
        generate_key(self.host_key)

    def write_known_hosts(self) -> None:
        """Pin the current host key for ``[127.0.0.1]:port``."""
        line = f"[127.0.0.1]:{self.port} {self._public(self.host_key)}"
        self.known_hosts.write_text(line)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def _signal_all(self, number: signal.Signals) -> None:
        if self.process is None:
            return
        # Sessions first: the listener's death does not end them.
        for pid in [*self.session_pids(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited:\n{self.log_text()}")
            # This sshd, not whatever accepts connections on the port.
            with contextlib.suppress(psutil.NoSuchProcess):
                if listens(self.process.pid, self.port):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.port}:\n{self.log_text()}")

    def _config_text(self) -> str:
        settings = {
            "Port": self.port,
            "ListenAddress": "127.0.0.1",
            "HostKey": self.host_key,
            "AuthorizedKeysFile": self.authorized_keys,
            "AllowUsers": self.user,
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            "StrictModes": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowTcpForwarding": "no",
            "X11Forwarding": "no",
            "PidFile": self.folder / "sshd.pid",
            "Subsystem": "sftp internal-sftp",
        }
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    @staticmethod
    def _public(key: Path) -> str:
        return key.with_suffix(".pub").read_text().strip() + "\n"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A server of the test's own (to stop, kill or re-key at will), stopped
    after it; every test module has it through conftest."""
    server = Sshd(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
