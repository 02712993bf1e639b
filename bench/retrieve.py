"""Retrieve throughput: C-GET and C-MOVE of one 200-instance CT study.

Stores one study of 200 CT-like instances (~105 MB) into ``appliance serve``
and into Orthanc (if installed) with ``storescu`` (not timed), then times:

* C-GET with DCMTK ``getscu``, which writes the instances into a temp dir;
* C-MOVE with DCMTK ``movescu`` to a DCMTK ``storescp`` that the script
  starts as AE ``BENCHDEST`` and that writes into a temp dir.

Each measurement is repeated (``--repeat``, 3 by default) and the median is
kept; every repeat must deliver all 200 instances. Receivers accept PDUs of
up to 128 KiB (DCMTK's maximum). Everything runs twice: with TCP_NODELAY=1 in
the environment of the DCMTK tools (getscu, movescu and the storescp
destination) and without it.

Usage: ``.venv/bin/python bench/retrieve.py [--repeat 3]``
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from common import (
    DCMTK_MAX_PDU,
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
    start_dcmtk_storescp,
    start_orthanc,
    write_appliance_config,
)
from dataset import generate, total_bytes

INSTANCES = 200
DESTINATION = "BENCHDEST"
TARGET_RATIO = 0.5
_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


@dataclass
class Target:
    """A server holding the study: its AE title and port."""

    name: str
    ae_title: str
    port: int


@dataclass
class Setup:
    """What every run of one pass shares."""

    files: list[Path]
    work: Path
    move_dir: Path
    dest_port: int
    repeat: int
    nodelay: bool


@dataclass
class Result:
    """The median time of one operation against one target."""

    target: str
    operation: str
    nodelay: bool
    seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def mb_per_second(self, size: int) -> float:
        return size / 1e6 / statistics.median(self.seconds)


def store(files: list[Path], target: Target, log: Path) -> None:
    """Send the study with one storescu association (not timed)."""
    command = ["storescu", "-R", "-aet", "BENCHSCU", "-aec", target.ae_title]
    command += [LOOPBACK, str(target.port), *map(str, files)]
    with open(log, "wb") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"storescu to {target.name} failed:\n{log.read_text()}")


def retrieve_command(
    target: Target, operation: str, study_uid: str, out: Path
) -> list[str]:
    """The getscu or movescu command line for the whole study."""
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    if operation == "C-GET":
        command = ["getscu", "-S", "-od", str(out), "-pdu", str(DCMTK_MAX_PDU)]
    else:
        command = ["movescu", "-S", "-aem", DESTINATION]
    command += ["-aet", "BENCHSCU", "-aec", target.ae_title]
    return [*command, LOOPBACK, str(target.port), *keys]


def measure(
    target: Target,
    operation: str,
    study_uid: str,
    received: Path,
    setup: Setup,
) -> Result:
    """Time ``operation`` ``repeat`` times; ``received`` is where files land."""
    result = Result(target.name, operation, setup.nodelay)
    env = dcmtk_env(setup.nodelay)
    for attempt in range(setup.repeat):
        _empty(received)
        command = retrieve_command(target, operation, study_uid, received)
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        result.seconds.append(time.perf_counter() - started)

        got = count_files(received)
        output = (run.stdout + run.stderr).strip()
        if run.returncode != 0 or got != INSTANCES:
            result.problems.append(
                f"attempt {attempt + 1}: exit {run.returncode}, {got}/{INSTANCES} "
                f"instances received; {output[-600:]}"
            )
        elif output:
            result.problems.append(f"attempt {attempt + 1}: {output[-600:]}")
    return result


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


def study_uid_of(files: list[Path]) -> str:
    """The StudyInstanceUID the files share."""
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def bench_target(target: Target, setup: Setup) -> list[Result]:
    """C-GET then C-MOVE from one running target."""
    get_dir = setup.work / f"get-{target.name}"
    get_dir.mkdir()
    study_uid = study_uid_of(setup.files)
    results = [measure(target, "C-GET", study_uid, get_dir, setup)]
    results.append(measure(target, "C-MOVE", study_uid, setup.move_dir, setup))
    return results


def run_appliance(setup: Setup) -> list[Result]:
    """Store into a fresh appliance, then retrieve from it."""
    work = setup.work
    peers = {DESTINATION: setup.dest_port}
    config = write_appliance_config(work / "appliance.toml", peers)
    target = Target("appliance", "APPLIANCE", free_port())
    with Servers() as servers:
        server = start_appliance(servers, work / "appliance-data", target.port, config)
        store(setup.files, target, work / "store-appliance.log")
        results = bench_target(target, setup)
        servers.stop(server)
    problems = [
        line for line in server.log_text().splitlines() if _LOG_PROBLEM.search(line)
    ]
    results[-1].problems += [f"appliance log: {line}" for line in problems]
    if problems or any(result.problems for result in results):
        print(f"appliance log kept in {keep_log(server, 'appliance-retrieve')}")
    return results


def run_orthanc(setup: Setup) -> list[Result]:
    """Store into a fresh Orthanc, then retrieve from it."""
    target = Target("orthanc", "ORTHANC", free_port())
    with Servers() as servers:
        _server, http_port = start_orthanc(
            servers, setup.work / "orthanc", target.port, {DESTINATION: setup.dest_port}
        )
        store(setup.files, target, setup.work / "store-orthanc.log")
        held = orthanc_instance_count(http_port)
        if held != len(setup.files):
            raise RuntimeError(f"Orthanc holds {held} of {len(setup.files)} instances")
        return bench_target(target, setup)


def run_pass(files: list[Path], root: Path, repeat: int, nodelay: bool) -> list[Result]:
    """Both targets, with or without TCP_NODELAY=1 for every DCMTK tool."""
    work = Path(tempfile.mkdtemp(dir=root))
    with Servers() as servers:
        setup = Setup(files, work, work / "move-dest", free_port(), repeat, nodelay)
        start_dcmtk_storescp(
            servers, setup.move_dir, setup.dest_port, DESTINATION, nodelay
        )
        results = run_appliance(setup)
        if orthanc_binary() is not None:
            results += run_orthanc(setup)
    shutil.rmtree(work, ignore_errors=True)
    return results


def print_results(results: list[Result], size: int) -> None:
    """MB/s per target and operation, and the appliance/orthanc ratio."""
    rates = {(r.target, r.operation, r.nodelay): r.mb_per_second(size) for r in results}
    headers = ["target", "operation", "nodelay", "median s", "MB/s", "inst/s"]
    headers.append("appl/orthanc")
    rows = []
    for result in sorted(results, key=lambda r: (r.operation, r.nodelay)):
        median = statistics.median(result.seconds)
        ratio = ""
        theirs = rates.get(("orthanc", result.operation, result.nodelay))
        if result.target == "appliance" and theirs:
            mine = rates[("appliance", result.operation, result.nodelay)]
            verdict = "ok" if mine / theirs >= TARGET_RATIO else "BELOW 0.5"
            ratio = f"{mine / theirs:.2f} {verdict}"
        rows.append(
            [
                result.target,
                result.operation,
                "yes" if result.nodelay else "no",
                f"{median:.2f}",
                f"{size / 1e6 / median:.1f}",
                f"{INSTANCES / median:.1f}",
                ratio,
            ]
        )
    print()
    print_table(headers, rows)
    for result in results:
        for problem in result.problems:
            print(f"! {result.target} {result.operation}: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    exit_on_sigterm()

    files = generate("ct", INSTANCES)
    size = total_bytes(files)
    print(f"study: {len(files)} instances, {size / 1e6:.1f} MB")

    if orthanc_binary() is None:
        print("orthanc: skipped, the Orthanc executable is not installed")
    root = Path(tempfile.mkdtemp(prefix="bench-retrieve-"))
    try:
        results = []
        for nodelay in (True, False):
            results += run_pass(files, root, args.repeat, nodelay)
        print_results(results, size)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
