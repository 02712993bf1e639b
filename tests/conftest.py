"""Shared fixtures: a real ``appliance serve`` on a free loopback port, and
the DCMTK tools that talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from appliance.catalog.store import Catalog
from appliance.config import toml_value
from appliance.peer_warnings import PeerWarnings

# free_port is here for the tests that import it from this module.
from tests.ports import free_port as free_port
from tests.ports import port_for

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
TEST_FILES = PYDICOM_DATA / "test_files"
DCMTK_TOOLS = ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp")


@contextlib.contextmanager
def started(
    directory: Path, settings: dict[str, dict[str, object]] | None = None
) -> Iterator[Appliance]:
    """An appliance in ``directory`` (made here) with ``settings`` over the
    archive core's (replication off), running while the block runs."""
    node = Appliance(directory, {"replication": {"enabled": False}, **(settings or {})})
    node.directory.mkdir()
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(autouse=True)
def _peer_warnings_of_this_test_only() -> Iterator[None]:
    """Forget the peer warnings a test's connections left counted: the
    process-wide counters would log their number up to a minute later, in
    whatever test runs then, which may check that nothing warned."""
    yield
    for module in [
        m for name, m in sys.modules.items() if name.startswith("appliance")
    ]:
        for value in list(vars(module).values()):
            if isinstance(value, PeerWarnings):
                with value._changed:
                    value._windows.clear()


def incoming_files(online_root: Path) -> list[Path]:
    """Files left in an online tier's incoming/ folders (should be none)."""
    return [path for path in (online_root / "incoming").rglob("*") if path.is_file()]


def require_dcmtk() -> None:
    missing = [tool for tool in DCMTK_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"DCMTK tools missing ({', '.join(missing)}); apt-get install dcmtk"
        )


class Appliance:
    """An ``appliance serve`` process started for one test or module."""

    def __init__(
        self,
        directory: Path,
        settings: dict[str, dict[str, object]] | None = None,
        peers: list[dict] | None = None,
        workers: int = 1,
    ) -> None:
        self.directory = directory
        # Held while this object lives: the appliance may be started long
        # after, stopped and started again, or be a peer of another first.
        self.port = port_for(self)
        # Tests run side by side: none may take the HTTP default, 8080.
        self.web_port = port_for(self)
        self.ae_title = "APPLIANCE"
        self.config_path = directory / "appliance.toml"
        self.data_dir = directory / "data"
        self.log_path = directory / "appliance.log"
        self.settings = settings or {}
        self.peers = peers or []
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def write_config(self) -> None:
        settings: dict[str, dict[str, object]] = {
            "node": {"port": self.port, "workers": self.workers},
            # The HTTP server starts only for tests that configure it: each
            # web child costs a process start and its stop.
            "web": {"port": self.web_port, "enabled": "web" in self.settings},
            "storage": {"data_dir": str(self.data_dir), "reserved_bytes": 0},
        }
        for section, keys in self.settings.items():
            settings.setdefault(section, {}).update(keys)
        self.config_path.write_text(config_text(settings, self.peers))

    def start(self) -> Appliance:
        self.write_config()
        self._log_start = len(self.log())
        with open(self.log_path, "ab") as log:
            self.process = self._spawn(log)
        self._wait_until_listening()
        return self

    def _spawn(self, log: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=self.directory,
        )

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"appliance exited:\n{self.log()}")
            if "listening on" in self.log()[self._log_start :]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"appliance did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 the whole process group: listener and workers at once."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        """``appliance status --json`` as a dict."""
        return json.loads(self.cli("status", "--json").stdout)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run an ``appliance`` subcommand against this appliance's config."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                *args,
                "--config",
                str(self.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"appliance {args} failed:\n{result.stderr}")
        return result


def new_archive(data_dir: Path) -> None:
    """An empty archive in ``data_dir``: its catalog, as the service's first
    start makes it; commands that name the archive refuse a folder without."""
    Catalog(data_dir / "catalog", 2**24).close()


def config_text(settings: dict[str, dict[str, object]], peers: list[dict]) -> str:
    """A TOML configuration from {section: {key: value}} and [[peers]] entries."""
    lines: list[str] = []
    for section, keys in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    for peer in peers:
        lines.append("[[peers]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in peer.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[type]:
    """Make appliances for one test; all are stopped afterwards."""
    yield from _appliances(tmp_path)


@pytest.fixture(scope="module")
def module_appliance_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[type]:
    """Make appliances shared by a module's tests, for tests that do not
    change what the others read; all are stopped after the module."""
    yield from _appliances(tmp_path_factory.mktemp("shared"))


def _appliances(tmp_path: Path) -> Iterator[type]:
    started: list[Appliance] = []

    def make(
        settings: dict[str, dict[str, object]] | None = None,
        peers: list[dict] | None = None,
        workers: int = 1,
        name: str = "a",
    ) -> Appliance:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        appliance = Appliance(directory, settings, peers, workers)
        started.append(appliance)
        return appliance

    yield make  # type: ignore[misc]
    for appliance in started:
        appliance.stop()


@pytest.fixture
def appliance(appliance_factory) -> Appliance:
    return appliance_factory().start()


def dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with Nagle off, as a well-behaved sender would."""
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=env
    )


# The lost archive and its mirror that every restore test starts from; at
# the end, since that module needs what is above.
from tests.restore_site import disaster, site  # noqa: E402, F401
from tests.sshd import sshd  # noqa: E402, F401
