"""Migration and recall: studies to nearline against ``tar | zstd``, and back.

Imports 20 CT studies of 200 instances (``dataset.py``'s ``ct`` set of
4,000, ~2.1 GB; ``--scale`` shrinks the number of studies) into a fresh
catalog and online tier with ``Ingest.import_file`` (not timed), then times
``Migrator.copy(study, "nearline")`` for every study: the encrypted pack
written durably, read back and checked whole, and the catalog commit.

In the same run, for every study and on the same online files, it times two
references, ``tar -cf - FILES | zstd -3 -T1`` and ``... -T2``, each followed
by an fsync of the output and of its folder (the appliance flushes both),
and then a read-back, ``zstd -dc OUT | tar -tf -`` (what ``zstd -t`` and
``tar -tf`` check, in one read). The order of the three rotates from study
to study, so that other load on the machine falls on all of them alike. It
prints MB/s of instance bytes for each, and the appliance's speed as a
ratio of each reference's (target: 0.8 or more, verification included).

Then one study of 500 instances (``--scale`` shrinks it too) is moved to
nearline, released from online, and recalled with ``Recaller.recall``,
``--recall-rounds`` times with the pack file dropped from the page cache
first (cold) and as many times with it cached (warm). It prints the time to
the first instance staged online and to the whole study recorded.

Usage: ``.venv/bin/python bench/migrate.py [--scale 0.5] [--recall-rounds 2]``
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
from common import BENCH_DIR, exit_on_sigterm, print_table
from dataset import KINDS, OUT_DIR, SEED, _write_set, generate, total_bytes

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.hsm.migrator import Migrator
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import NEARLINE, ONLINE, Tiers
from appliance.ingest import Ingest
from appliance.storage import durable
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.nearline import NearlineTier
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackSummary

STUDIES = 20
RECALL_INSTANCES = 500
# Another seed than the migration set's, so that the recall study's UIDs
# differ from those of the set's first study in the same catalog.
RECALL_SEED = SEED + 1
ZSTD_LEVEL = 3
REFERENCE_THREADS = (1, 2)
TARGET_RATIO = 0.8
APPLIANCE = "appliance copy"
PACK_STEP = "  of which tier.write"


# -- the data ---------------------------------------------------------------------


def migration_set(scale: float) -> list[Path]:
    """Whole ``ct`` studies of 200 instances: 20 of them at full scale."""
    kind = KINDS["ct"]
    per_study = kind.per_series * kind.series_per_study
    return generate("ct", max(1, round(STUDIES * scale)) * per_study)


def one_study(count: int, seed: int = RECALL_SEED) -> list[Path]:
    """A ``ct`` study of ``count`` instances (series of 100), made once.

    ``dataset.py`` gives every ``ct`` study 200 instances; this set lays
    out the same instances with as many series as one study of ``count``
    needs, in a folder of its own, reused like ``dataset.generate``'s.
    """
    folder = OUT_DIR / f"ct-onestudy-{count}-{seed}"
    manifest = folder / "manifest.txt"
    if manifest.exists():
        return [folder / name for name in manifest.read_text().split()]

    kind = KINDS["ct"]
    kind = replace(kind, series_per_study=math.ceil(count / kind.per_series))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = _write_set(kind, count, seed, folder)
    manifest.write_text("\n".join(names) + "\n")
    return [folder / name for name in names]


def study_uids(paths: list[Path]) -> list[str]:
    """The studies of a set in order (``dataset.py`` gives each a folder)."""
    first_files = {path.parent: path for path in reversed(paths)}
    return [
        str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        for path in sorted(first_files.values())
    ]


# -- the archive ------------------------------------------------------------------


class TimedNearline(NearlineTier):
    """The nearline tier, adding up the seconds its ``write`` takes (the
    pack written durably and read back whole)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.seconds = 0.0

    def write(self, *args: Any, **kwargs: Any) -> tuple[str, PackSummary]:
        started = time.perf_counter()
        try:
            return super().write(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


@dataclass
class Archive:
    """A fresh catalog, online and nearline tier, and key store."""

    catalog: Catalog
    online: OnlineTier
    nearline: TimedNearline
    keys: KeyStore

    def tiers(self) -> Tiers:
        return Tiers(self.online, {NEARLINE: self.nearline}, self.keys)

    def migrator(self) -> Migrator:
        # One copy is enough to release online: only nearline holds it then.
        return Migrator(self.catalog, self.tiers(), min_copies=1)

    def recaller(self) -> Recaller:
        return Recaller(self.catalog, self.tiers())

    def online_files(self, study_uid: str) -> list[Path]:
        """The files of the study's online copies: what a copy packs."""
        found = []
        for record in copies.instances_of(self.catalog, study_uid):
            online = record.copy_on(ONLINE)
            assert online is not None, f"{record.sop_instance_uid} is not online"
            found.append(self.online.path_of(online.location))
        return found

    def pack_files(self, study_uid: str) -> list[Path]:
        """The study's pack files on nearline."""
        return [
            self.nearline.path_of(pack.location)
            for pack in copies.packs_of(self.catalog, study_uid)
        ]


@contextmanager
def open_archive(root: Path) -> Iterator[Archive]:
    """An archive under ``root``, closed when the block ends."""
    catalog = Catalog(root / "catalog", map_size=2**32)
    try:
        online = OnlineTier(root / "online")
        online.open()
        nearline = TimedNearline(root / "nearline")
        nearline.open()
        keys = KeyStore.create_if_missing(key_store_path(root))
        yield Archive(catalog, online, nearline, keys)
    finally:
        catalog.close()


def import_all(archive: Archive, paths: list[Path]) -> None:
    """Store every file on the online tier, as ``appliance import`` does."""
    ingest = Ingest(archive.catalog, archive.online, "refuse")
    try:
        for path in paths:
            result = ingest.import_file(path, "bench")
            if not result.ok:
                raise SystemExit(f"import of {path} failed: {result.reason}")
    finally:
        ingest.close()


# -- measuring --------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock and CPU seconds, and bytes written, summed over studies."""

    wall: float = 0.0
    cpu: float = 0.0
    output_bytes: int = 0

    def __add__(self, other: Timing) -> Timing:
        return Timing(
            self.wall + other.wall,
            self.cpu + other.cpu,
            self.output_bytes + other.output_bytes,
        )

    def then(self, other: Timing) -> Timing:
        """This step followed by ``other`` on the same output."""
        return Timing(self.wall + other.wall, self.cpu + other.cpu, self.output_bytes)


class Clock:
    """Wall-clock and CPU time since it was made. The CPU time counts this
    process's threads and the children it waited for (tar, zstd)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = _cpu_seconds()

    def timing(self, output_bytes: int = 0) -> Timing:
        wall = time.perf_counter() - self.wall
        return Timing(wall, _cpu_seconds() - self.cpu, output_bytes)


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_pipeline(commands: list[list[str]]) -> bytes:
    """Run ``commands`` as a shell pipeline; the last one's output.

    Each process is waited for, and killed by its PID if the benchmark
    stops (Ctrl-C, SIGTERM) while it runs.
    """
    processes: list[subprocess.Popen[bytes]] = []
    try:
        stdin = None
        for command in commands:
            process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE)
            if stdin is not None:
                stdin.close()  # the next process holds the pipe now
            stdin = process.stdout
            processes.append(process)
        output, _ = processes[-1].communicate()
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(codes):
        names = " | ".join(command[0] for command in commands)
        raise SystemExit(f"{names} failed with exit codes {codes}")
    return output


# -- migration --------------------------------------------------------------------


def copy_study(archive: Archive, study_uid: str, instances: int) -> dict[str, Timing]:
    """``Migrator.copy`` of one study to nearline: the whole step, and the
    part the tier's ``write`` took."""
    before = archive.nearline.seconds
    clock = Clock()
    outcome = archive.migrator().copy(study_uid, NEARLINE)
    timing = clock.timing(outcome.bytes)
    if not outcome.ok or outcome.instances != instances:
        raise SystemExit(f"copy of study {study_uid} failed: {outcome}")
    written = Timing(archive.nearline.seconds - before, 0.0, outcome.bytes)
    return {APPLIANCE: timing, PACK_STEP: written}


def reference(
    files: list[Path], root: Path, out: Path, threads: int
) -> dict[str, Timing]:
    """``tar | zstd -T<threads>`` on ``files`` (under ``root``) into ``out``,
    fsync, then the read-back: a timing for each, and for both."""
    label = f"tar | zstd -T{threads}"
    names = [str(path.relative_to(root)) for path in files]
    level = f"-{ZSTD_LEVEL}"

    clock = Clock()
    run_pipeline(
        [
            ["tar", "-cf", "-", "-C", str(root), *names],
            ["zstd", level, f"-T{threads}", "-q", "-o", str(out)],
        ]
    )
    durable.fsync_file(out)
    durable.fsync_directory(out.parent)
    write = clock.timing(out.stat().st_size)

    clock = Clock()
    listing = run_pipeline([["zstd", "-dcq", str(out)], ["tar", "-tf", "-"]])
    verify = clock.timing(write.output_bytes)
    if len(listing.splitlines()) != len(files):
        raise SystemExit(f"{label}: the read-back lists other files than packed")

    out.unlink()
    return {
        f"{label}: write": write,
        f"{label}: verify": verify,
        f"{label}: write + verify": write.then(verify),
    }


def measure_migration(
    archive: Archive, studies: list[str], work: Path
) -> list[dict[str, Timing]]:
    """Every study copied to nearline and through both references: the
    timings of each study."""
    per_study = []
    # None stands for the appliance, a number for tar | zstd with that many
    # threads.
    methods: list[int | None] = [None, *REFERENCE_THREADS]
    for number, study_uid in enumerate(studies):
        files = archive.online_files(study_uid)
        timings: dict[str, Timing] = {}
        # Rotate the order so that no method always goes first.
        shift = number % len(methods)
        for threads in methods[shift:] + methods[:shift]:
            if threads is None:
                timings |= copy_study(archive, study_uid, len(files))
            else:
                out = work / "reference.tar.zst"
                timings |= reference(files, archive.online.root, out, threads)
        per_study.append(timings)
        _progress(number + 1, len(studies), summed(per_study))
    return per_study


def summed(per_study: list[dict[str, Timing]]) -> dict[str, Timing]:
    """Each method's timings added up over the studies."""
    totals: dict[str, Timing] = {}
    for timings in per_study:
        for label, timing in timings.items():
            totals[label] = totals.get(label, Timing()) + timing
    return totals


def _progress(done: int, total: int, totals: dict[str, Timing]) -> None:
    seconds = ", ".join(
        f"{label} {timing.wall:.1f} s"
        for label, timing in totals.items()
        if label == APPLIANCE or label.endswith("write + verify")
    )
    print(f"  {done}/{total} studies: {seconds}", flush=True)


def report_migration(per_study: list[dict[str, Timing]], megabytes: float) -> None:
    """The table of methods, then the appliance against each reference."""
    totals = summed(per_study)
    appliance = totals[APPLIANCE]
    headers = ["method", "MB in", "MB out", "seconds", "MB/s", "CPU s"]
    headers.append("appliance speed / this")
    rows = []
    for label, timing in totals.items():
        compared = label.startswith("tar") and not label.endswith(": verify")
        ratio = timing.wall / appliance.wall if compared else None
        rows.append(
            [
                label,
                f"{megabytes:.0f}",
                f"{timing.output_bytes / 1e6:.0f}",
                f"{timing.wall:.2f}",
                f"{megabytes / timing.wall:.1f}",
                f"{timing.cpu:.1f}" if label != PACK_STEP else "",
                "" if ratio is None else f"{ratio:.2f}",
            ]
        )
    print()
    print_table(headers, rows)
    print()
    for threads in REFERENCE_THREADS:
        label = f"tar | zstd -T{threads}: write + verify"
        ratio = totals[label].wall / appliance.wall
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        print(f"{APPLIANCE} / {label}: {ratio:.2f}x ({verdict}, target {TARGET_RATIO})")
        # Study by study, to show how much other load moved the figures.
        ratios = [t[label].wall / t[APPLIANCE].wall for t in per_study]
        print(
            f"  study by study: median {statistics.median(ratios):.2f}x, "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x"
        )


# -- recall -----------------------------------------------------------------------


@dataclass
class RecallRun:
    """One recall of the study: when the first instance was staged, when the
    whole study was recorded online."""

    cache: str
    instances: int
    first: float
    whole: float


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (it was flushed: they are
    clean), so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def recall_once(
    archive: Archive, study_uid: str, instances: int, cold: bool
) -> RecallRun:
    """Recall the study (released from online) from nearline, timed; then
    release it again for the next run."""
    if cold:
        for pack in archive.pack_files(study_uid):
            evict(pack)

    staged_at: list[float] = []

    def progress(staged: int, total: int) -> None:
        if not staged_at:
            staged_at.append(time.perf_counter())

    started = time.perf_counter()
    result = archive.recaller().recall(study_uid, progress)
    whole = time.perf_counter() - started
    if not result.ok or result.staged != instances:
        raise SystemExit(f"recall of study {study_uid} failed: {result}")
    first = staged_at[0] - started

    released = archive.migrator().release(study_uid, ONLINE)
    if not released.ok or released.instances != instances:
        raise SystemExit(f"release of study {study_uid} failed: {released}")
    return RecallRun("cold" if cold else "warm", instances, first, whole)


def measure_recall(
    archive: Archive, paths: list[Path], rounds: int
) -> tuple[float, list[RecallRun]]:
    """Import the study, move it to nearline (the copy's seconds), recall it."""
    import_all(archive, paths)
    [study_uid] = study_uids(paths)
    started = time.perf_counter()
    outcomes = archive.migrator().move(study_uid, ONLINE, NEARLINE)
    moved = time.perf_counter() - started
    if not all(outcome.ok for outcome in outcomes):
        raise SystemExit(f"move of study {study_uid} failed: {outcomes}")

    runs = []
    for _round in range(rounds):
        for cold in (True, False):
            runs.append(recall_once(archive, study_uid, len(paths), cold))
            print(f"  recall {len(runs)}: {runs[-1].whole:.2f} s", flush=True)
    return moved, runs


def report_recall(runs: list[RecallRun], megabytes: float) -> None:
    headers = ["run", "pack", "instances", "MB", "first staged s"]
    headers += ["whole study s", "MB/s", "inst/s"]
    rows = [
        [
            str(number),
            run.cache,
            str(run.instances),
            f"{megabytes:.0f}",
            f"{run.first:.3f}",
            f"{run.whole:.2f}",
            f"{megabytes / run.whole:.1f}",
            f"{run.instances / run.whole:.0f}",
        ]
        for number, run in enumerate(runs, 1)
    ]
    print()
    print_table(headers, rows)


# -- the run ----------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> None:
    """Both parts in one archive under ``work``."""
    paths = migration_set(args.scale)
    studies = study_uids(paths)
    megabytes = total_bytes(paths) / 1e6
    print(
        f"migrate: {len(studies)} studies, {len(paths)} instances, {megabytes:.0f} MB"
    )
    recall_paths = one_study(max(10, round(RECALL_INSTANCES * args.scale)))
    recall_megabytes = total_bytes(recall_paths) / 1e6
    print(f"recall: 1 study, {len(recall_paths)} instances, {recall_megabytes:.0f} MB")

    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with open_archive(work / "data") as archive:
        started = time.perf_counter()
        import_all(archive, paths)
        print(f"  imported in {time.perf_counter() - started:.1f} s (not timed)")
        per_study = measure_migration(archive, studies, work)
        moved, runs = measure_recall(archive, recall_paths, args.recall_rounds)

    report_migration(per_study, megabytes)
    print(f"\nrecall study moved to nearline in {moved:.2f} s (copy + release)")
    report_recall(runs, recall_megabytes)
    print("\nload average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the sets")
    parser.add_argument("--recall-rounds", type=int, default=2)
    args = parser.parse_args()
    exit_on_sigterm()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for tool in ("tar", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y {tool}")

    (BENCH_DIR / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="migrate-", dir=BENCH_DIR / "out"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
