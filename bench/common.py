"""Servers and helpers the benchmark scripts share.

Every server is started as a child process with its output in a log file
and stopped by its PID (SIGTERM, then SIGKILL after a grace period). Use
:class:`Servers` as a context manager so that whatever was started is stopped
on every exit path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BENCH_DIR = Path(__file__).resolve().parent
APPLIANCE = Path(sys.executable).with_name("appliance")
LOOPBACK = "127.0.0.1"
# The appliance receives PDUs of up to 256 KiB by default (node.max_pdu_size);
# the other receivers are given the same, or their own maximum.
APPLIANCE_PDU = 262144
ORTHANC_MAX_PDU = 131072
DCMTK_MAX_PDU = 131072
_STOP_GRACE = 40.0


@dataclass
class Server:
    """A server process the benchmark started, and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        """Everything the server has written so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Servers:
    """Starts servers and stops each of them by PID when the block ends."""

    def __init__(self) -> None:
        self.running: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for server in reversed(self.running):
            stop(server)
        self.running.clear()

    def start(
        self,
        name: str,
        command: list[str],
        log: Path,
        env: dict[str, str] | None = None,
    ) -> Server:
        """Run ``command`` with stdout and stderr in ``log``."""
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                env=env,
            )
        server = Server(name, process, log)
        self.running.append(server)
        return server

    def stop(self, server: Server) -> None:
        """Stop one server now, before the block ends."""
        stop(server)
        if server in self.running:
            self.running.remove(server)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that cleanup blocks run as on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def stop(server: Server) -> None:
    """SIGTERM the server's PID, and SIGKILL it if it does not exit in time."""
    process = server.process
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_GRACE)
    except subprocess.TimeoutExpired:
        print(f"{server.name} (pid {process.pid}) ignored SIGTERM; killing it")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_for_port(server: Server, port: int, timeout: float = 60.0) -> None:
    """Wait until ``port`` accepts connections; fail if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not listen on {port} in {timeout} s")


def wait_for_text(server: Server, text: str, timeout: float = 90.0) -> None:
    """Wait until the server's log contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log_text():
            return
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_text()[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not log {text!r} in {timeout} s")


def wait_until_settled(
    pid: int, quiet: float = 0.05, timeout: float = 60.0, period: float = 1.0
) -> None:
    """Wait until process ``pid`` and its descendants together use less than
    ``quiet`` of a core over ``period`` seconds: a server whose children
    are still starting (imports, opening the catalog) would take their CPU
    out of the measurement."""
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(period)
        now = tree_cpu_seconds(pid)
        if now - before < quiet * period:
            return
        before = now
    print(f"  (pid {pid} still busy after {timeout:.0f} s; measuring anyway)")


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its descendants (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    waiting = [pid]
    while waiting:
        current = waiting.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                waiting += [int(child) for child in children]
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
    return total


# -- the servers ------------------------------------------------------------------


def start_appliance(
    servers: Servers,
    data_dir: Path,
    port: int,
    config: Path | None = None,
    ae_title: str = "APPLIANCE",
    settle: bool = True,
) -> Server:
    """``appliance serve`` on ``data_dir``, ready once it logs "listening on"
    and (with ``settle``) its children have finished starting."""
    command = [str(APPLIANCE), "serve", "--data-dir", str(data_dir)]
    command += ["--port", str(port), "--ae-title", ae_title]
    if config is not None:
        command += ["--config", str(config)]
    log = data_dir.parent / f"{data_dir.name}.log"
    server = servers.start("appliance", command, log)
    wait_for_text(server, "listening on")
    if settle:
        wait_until_settled(server.process.pid)
    return server


def write_appliance_config(path: Path, peers: dict[str, int]) -> Path:
    """A TOML config naming C-MOVE destinations (AE title -> loopback port)."""
    lines = []
    for title, port in peers.items():
        lines += ["[[peers]]", f'ae_title = "{title}"', f'host = "{LOOPBACK}"']
        lines += [f"port = {port}", ""]
    path.write_text("\n".join(lines))
    return path


def start_pynetdicom_storescp(servers: Servers, output_dir: Path, port: int) -> Server:
    """pynetdicom's storescp app, writing every received instance to disk."""
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pynetdicom", "storescp", str(port)]
    command += ["-ba", LOOPBACK, "-pdu", str(APPLIANCE_PDU), "-q"]
    command += ["-od", str(output_dir)]
    log = output_dir.parent / f"{output_dir.name}.log"
    server = servers.start("pynetdicom storescp", command, log)
    wait_for_port(server, port)
    return server


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    """The environment for a DCMTK tool: TCP_NODELAY=1 or no TCP_NODELAY.

    DCMTK (3.6.7) sets TCP_NODELAY on its sockets only when the environment
    variable TCP_NODELAY is 1; otherwise Nagle's algorithm stays on.
    """
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def start_dcmtk_storescp(
    servers: Servers, output_dir: Path, port: int, ae_title: str, nodelay: bool
) -> Server:
    """DCMTK's storescp, writing what it receives into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    command = ["storescp", "-aet", ae_title, "-od", str(output_dir)]
    command += ["-pdu", str(DCMTK_MAX_PDU), str(port)]
    log = output_dir.parent / f"{output_dir.name}.log"
    server = servers.start("dcmtk storescp", command, log, dcmtk_env(nodelay))
    wait_for_port(server, port)
    return server


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None when it is not installed."""
    return shutil.which("Orthanc")


def start_orthanc(
    servers: Servers,
    work_dir: Path,
    dicom_port: int,
    modalities: dict[str, int] | None = None,
    nodelay: bool = False,
    settings: dict[str, object] | None = None,
) -> tuple[Server, int]:
    """Orthanc with its own config and storage in ``work_dir``; (server, http).

    Orthanc's DICOM server is DCMTK's: with ``nodelay`` it gets TCP_NODELAY=1
    in its environment, as the DCMTK tools do; by default it runs as packaged.
    ``settings`` override or add configuration keys (plugins, storage folders).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "storage"),
        "Plugins": [],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {
            title: [title, LOOPBACK, port] for title, port in (modalities or {}).items()
        },
        "MaximumPduLength": ORTHANC_MAX_PDU,
        "SaveJobs": False,
    }
    config.update(settings or {})
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    binary = orthanc_binary() or "Orthanc"
    command = [binary, str(config_path)]
    server = servers.start("orthanc", command, work_dir / "log", dcmtk_env(nodelay))
    wait_for_port(server, dicom_port)
    wait_for_port(server, http_port)
    return server, http_port


def orthanc_dicomweb_plugin() -> Path | None:
    """Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb``), or None."""
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    return plugin if plugin.exists() else None


def orthanc_instance_count(http_port: int) -> int:
    """How many instances Orthanc holds, from its REST API on loopback."""
    from urllib.request import urlopen

    with urlopen(f"http://{LOOPBACK}:{http_port}/statistics", timeout=30) as answer:
        return int(json.load(answer)["CountInstances"])


# -- numbers ----------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (inclusive method)."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(fraction * 100) - 1]


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain text table with right-aligned columns."""
    widths = [
        max([len(headers[i])] + [len(row[i]) for row in rows])
        for i in range(len(headers))
    ]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def keep_log(server: Server, label: str) -> Path:
    """Copy a server's log to ``bench/out/logs/`` so it outlives the temp dir."""
    folder = BENCH_DIR / "out" / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}.log"
    shutil.copyfile(server.log, kept)
    return kept


def count_files(folder: Path) -> int:
    """Regular files anywhere under ``folder``."""
    return sum(1 for path in folder.rglob("*") if path.is_file())
