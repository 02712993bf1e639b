"""Ingest throughput: DCMTK storescu into the appliance, pynetdicom and Orthanc.

Sends 4,000 CT-like instances (~0.5 MB) and 5,000 small ones (~10 KB) with
``storescu``, once over one association and once over four in parallel (the
files split into four contiguous parts, one storescu process each), to:

* ``appliance serve`` with default settings (a fresh data dir per run);
* pynetdicom's ``storescp`` app with ``-od`` (it writes every instance to
  disk; ``--ignore`` would drop them, which is not a fair comparison);
* Orthanc, if installed, with its own config and storage in a temp dir.

Every combination runs with ``TCP_NODELAY=1`` in storescu's environment and
without it. Each run starts a fresh server on a fresh directory, and checks
afterwards that every instance was stored. Orthanc runs as packaged (Nagle's
algorithm on in its DICOM server); ``--orthanc-nodelay`` gives it
TCP_NODELAY=1 in its own environment too.

Usage: ``.venv/bin/python bench/ingest.py [--scale 0.1]``
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from common import (
    LOOPBACK,
    Servers,
    count_files,
    dcmtk_env,
    exit_on_sigterm,
    free_port,
    keep_log,
    orthanc_binary,
    orthanc_instance_count,
    print_table,
    start_appliance,
    start_orthanc,
    start_pynetdicom_storescp,
)
from dataset import generate, total_bytes

from appliance.catalog.store import Catalog

SETS = {"ct": 4000, "small": 5000}
ASSOCIATIONS = (1, 4)
CALLED_AE = {"appliance": "APPLIANCE", "pynetdicom": "STORESCP", "orthanc": "ORTHANC"}
APPLIANCE_CORE = "appl-core"
APPLIANCES = ("appliance", APPLIANCE_CORE)
NODELAY_TOLERANCE = 0.15
_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


@dataclass
class Run:
    """One measured send: what went where, how fast, and what went wrong."""

    target: str
    set_name: str
    associations: int
    nodelay: bool
    instances: int
    size: int
    seconds: float
    stored: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every instance stored and every storescu process succeeded."""
        failed = any(p.startswith("storescu exited") for p in self.problems)
        return self.stored == self.instances and not failed

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.size / 1e6 / self.seconds


def split(files: list[Path], parts: int) -> list[list[Path]]:
    """``files`` in ``parts`` contiguous pieces of nearly equal length."""
    size, extra = divmod(len(files), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        pieces.append(files[start:end])
        start = end
    return pieces


def send(
    files: list[Path],
    port: int,
    called_ae: str,
    associations: int,
    nodelay: bool,
    log_dir: Path,
) -> tuple[float, list[str]]:
    """Send ``files`` with parallel storescu processes; (seconds, problems)."""
    env = dcmtk_env(nodelay)

    logs = [log_dir / f"storescu-{i}.log" for i in range(associations)]
    started = time.perf_counter()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for part, log in zip(split(files, associations), logs, strict=True):
            command = ["storescu", "-R", "-aet", "BENCHSCU", "-aec", called_ae]
            command += [LOOPBACK, str(port), *map(str, part)]
            with open(log, "wb") as handle:
                process = subprocess.Popen(
                    command, stdout=handle, stderr=subprocess.STDOUT, env=env
                )
            processes.append(process)
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.perf_counter() - started

    problems = [f"storescu exited with {code}" for code in codes if code != 0]
    for log in logs:
        problems += [line for line in log.read_text().splitlines() if line.strip()]
    return seconds, problems


def run_appliance(
    work: Path,
    files: list[Path],
    assocs: int,
    nodelay: bool,
    target: str = "appliance",
    settings: str = "",
) -> Run:
    """One run against a fresh ``appliance serve`` with ``settings`` (TOML)
    over its defaults."""
    port = free_port()
    data_dir = work / "appliance-data"
    config = None
    if settings:
        config = work / "appliance.toml"
        config.write_text(settings)
    with Servers() as servers:
        server = start_appliance(servers, data_dir, port, config)
        seconds, problems = send(files, port, "APPLIANCE", assocs, nodelay, work)
        servers.stop(server)
    catalog = Catalog(data_dir / "catalog")
    stored = catalog.counts()["instances"]
    catalog.close()
    problems += [
        line for line in server.log_text().splitlines() if _LOG_PROBLEM.search(line)
    ]
    run = _run(target, files, assocs, nodelay, seconds, stored, problems)
    if problems or stored != len(files):
        label = (
            f"{target}-{run.set_name}-x{assocs}-{'nodelay' if nodelay else 'default'}"
        )
        print(f"  {target} log kept in {keep_log(server, label)}")
    return run


def run_pynetdicom(work: Path, files: list[Path], assocs: int, nodelay: bool) -> Run:
    """One run against pynetdicom's storescp writing to a fresh folder."""
    port = free_port()
    output = work / "pynetdicom-out"
    with Servers() as servers:
        server = start_pynetdicom_storescp(servers, output, port)
        seconds, problems = send(files, port, "STORESCP", assocs, nodelay, work)
        servers.stop(server)
    problems += [line for line in server.log_text().splitlines() if line.strip()]
    stored = count_files(output)
    return _run("pynetdicom", files, assocs, nodelay, seconds, stored, problems)


def run_orthanc(
    work: Path,
    files: list[Path],
    assocs: int,
    nodelay: bool,
    orthanc_nodelay: bool = False,
) -> Run:
    """One run against a fresh Orthanc with its storage in ``work``."""
    port = free_port()
    with Servers() as servers:
        _server, http_port = start_orthanc(
            servers, work / "orthanc", port, nodelay=orthanc_nodelay
        )
        seconds, problems = send(files, port, "ORTHANC", assocs, nodelay, work)
        stored = orthanc_instance_count(http_port)
    return _run("orthanc", files, assocs, nodelay, seconds, stored, problems)


def _run(
    target: str,
    files: list[Path],
    assocs: int,
    nodelay: bool,
    seconds: float,
    stored: int,
    problems: list[str],
) -> Run:
    set_name = files[0].parent.parent.name.split("-")[0]
    size = total_bytes(files)
    return Run(
        target, set_name, assocs, nodelay, len(files), size, seconds, stored, problems
    )


Runner = Callable[[Path, list[Path], int, bool], Run]
RUNNERS: dict[str, Runner] = {
    "appliance": run_appliance,
    # The archive core alone: receiving, checking, storing, cataloguing, as
    # pynetdicom's storescp and Orthanc do, without the default mirror (a
    # folder on the same disk) taking its copies meanwhile.
    APPLIANCE_CORE: partial(
        run_appliance,
        target=APPLIANCE_CORE,
        settings="[replication]\nenabled = false\n",
    ),
    "pynetdicom": run_pynetdicom,
    "orthanc": run_orthanc,
}


def measure(
    runners: dict[str, Runner], sets: dict[str, list[Path]], root: Path
) -> list[Run]:
    """Every target, set, association count and TCP_NODELAY setting once."""
    runs = []
    for nodelay in (True, False):
        for runner in runners.values():
            for files in sets.values():
                for assocs in ASSOCIATIONS:
                    work = Path(tempfile.mkdtemp(dir=root))
                    try:
                        run = runner(work, files, assocs, nodelay)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    _report_progress(run)
                    runs.append(run)
    return runs


def _report_progress(run: Run) -> None:
    flag = "nodelay" if run.nodelay else "default"
    print(
        f"  {run.target:<10} {run.set_name:<5} x{run.associations} {flag:<7} "
        f"{run.per_second:8.1f} inst/s {run.mb_per_second:7.1f} MB/s "
        f"stored {run.stored}/{run.instances}",
        flush=True,
    )
    for line in run.problems[:5]:
        print(f"    ! {line}")
    if len(run.problems) > 5:
        print(f"    ! ... {len(run.problems) - 5} more line(s)")


def _key(run: Run) -> tuple[str, int, bool]:
    return run.set_name, run.associations, run.nodelay


def print_results(runs: list[Run]) -> None:
    """The table, with appliance/other ratios on the appliance rows."""
    rates = {(run.target, *_key(run)): run.per_second for run in runs if run.ok}
    headers = ["target", "set", "assocs", "nodelay", "inst/s", "MB/s", "stored"]
    headers += ["appl/pynetdicom", "appl/orthanc"]
    rows = []
    for run in sorted(runs, key=lambda r: (r.set_name, r.associations, r.nodelay)):
        ratios = ["", ""]
        if run.target in APPLIANCES and run.ok:
            for position, other in enumerate(("pynetdicom", "orthanc")):
                theirs = rates.get((other, *_key(run)))
                ratios[position] = f"{run.per_second / theirs:.2f}" if theirs else "-"
        rows.append(
            [
                run.target,
                run.set_name,
                str(run.associations),
                "yes" if run.nodelay else "no",
                f"{run.per_second:.1f}",
                f"{run.mb_per_second:.1f}",
                f"{run.stored}/{run.instances}" + ("" if run.ok else " FAILED"),
                *ratios,
            ]
        )
    print()
    print_table(headers, rows)


def print_nodelay_check(runs: list[Run]) -> None:
    """Whether the appliance's rate with and without TCP_NODELAY is within 15%."""
    for target in APPLIANCES:
        if any(run.target == target for run in runs):
            _print_nodelay_check(target, runs)


def _print_nodelay_check(target: str, runs: list[Run]) -> None:
    print()
    mine = {
        _key(run): run.per_second for run in runs if run.target == target and run.ok
    }
    for set_name in SETS:
        for assocs in ASSOCIATIONS:
            with_it = mine.get((set_name, assocs, True))
            without = mine.get((set_name, assocs, False))
            if not with_it or not without:
                print(f"{target} {set_name} x{assocs}: not compared, a run failed")
                continue
            gap = abs(with_it - without) / max(with_it, without)
            verdict = "within" if gap <= NODELAY_TOLERANCE else "NOT within"
            print(
                f"{target} {set_name} x{assocs}: {with_it:.1f} inst/s with "
                f"TCP_NODELAY=1, {without:.1f} without: {gap:.0%} apart, "
                f"{verdict} {NODELAY_TOLERANCE:.0%}"
            )


def choose_targets(wanted: list[str]) -> list[str]:
    """The targets to run; Orthanc is dropped, with a reason, if missing."""
    if "orthanc" in wanted and orthanc_binary() is None:
        print("orthanc: skipped, the Orthanc executable is not installed")
        print("         (apt-get install -y orthanc)")
        wanted = [target for target in wanted if target != "orthanc"]
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the sets")
    parser.add_argument(
        "--targets", nargs="+", choices=sorted(RUNNERS), default=list(RUNNERS)
    )
    parser.add_argument(
        "--orthanc-nodelay",
        action="store_true",
        help="run Orthanc with TCP_NODELAY=1 in its own environment",
    )
    args = parser.parse_args()
    exit_on_sigterm()

    runners = {target: RUNNERS[target] for target in choose_targets(args.targets)}
    if "orthanc" in runners and args.orthanc_nodelay:
        runners["orthanc"] = partial(run_orthanc, orthanc_nodelay=True)
        print("orthanc: runs with TCP_NODELAY=1 in its own environment")
    sets = {
        name: generate(name, max(4, round(count * args.scale)))
        for name, count in SETS.items()
    }
    for name, files in sets.items():
        print(f"{name}: {len(files)} instances, {total_bytes(files) / 1e6:.0f} MB")

    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        runs = measure(runners, sets, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_results(runs)
    print_nodelay_check(runs)


if __name__ == "__main__":
    main()
