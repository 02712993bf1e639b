"""Pack throughput: a study pack against ``tar -cf - FILES | zstd -3``.

Packs one set of generated instances (``dataset.py``; by default the 200 CT
instances of one study, ~105 MB) into a pack file with ``write_pack_file``
(temp name, fsync, rename, directory fsync), then reads it back with
``PackReader.verify`` (zstd frame and checksum, GCM tag when encrypted,
SHA-256 of every instance against the manifest). In the same run it times
``tar -cf - FILES | zstd -3 -o OUT`` on the same files, followed by an fsync
of OUT so that both end on stable storage. Every measurement is repeated
(``--repeat``, 3 by default) and the median kept; the files are read once
first so that all runs read them from the page cache.

MB/s count the instances' bytes. The pack rows give the write alone, the
read-back verify alone and both together; the ratios compare each pack
write, and each write + verify, with tar | zstd (target: 0.8 or more).
Rounds interleave the measurements, and CPU seconds (this process's for the
pack, the children's for tar and zstd) are printed too: wall-clock figures
move with whatever else the machine runs, CPU seconds much less.

Usage: ``.venv/bin/python bench/pack.py [--kind ct] [--count 200]
[--level 3] [--threads 2] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from common import BENCH_DIR, exit_on_sigterm, print_table
from dataset import folder_for, generate, total_bytes

from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.packs import InstanceMeta, PackReader, write_pack_file

TARGET_RATIO = 0.8
BASELINE = "tar | zstd"


@dataclass
class Sample:
    """One measurement: wall-clock and CPU seconds, and the bytes produced."""

    wall: float
    cpu: float
    output_bytes: int


def instance_metas(paths: list[Path]) -> list[InstanceMeta]:
    """What the catalog would know of each file (not timed)."""
    metas = []
    for path in paths:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        metas.append(
            InstanceMeta(
                sop_instance_uid=str(dataset.SOPInstanceUID),
                sop_class_uid=str(dataset.SOPClassUID),
                series_uid=str(dataset.SeriesInstanceUID),
                study_uid=str(dataset.StudyInstanceUID),
                transfer_syntax=str(dataset.file_meta.TransferSyntaxUID),
                size=len(data),
                sha256=digest,
                # Recorded as given, never checked: any digest will do here.
                content_sha256=digest,
                attributes={
                    "patient": {"PatientName": str(dataset.PatientName)},
                    "study": {"StudyDate": str(dataset.StudyDate)},
                    "series": {"Modality": str(dataset.Modality)},
                    "instance": {"InstanceNumber": str(dataset.InstanceNumber)},
                },
            )
        )
    return metas


def pack_once(
    paths: list[Path],
    metas: list[InstanceMeta],
    destination: Path,
    keys: KeyStore | None,
    args: argparse.Namespace,
) -> tuple[Sample, Sample]:
    """Write a pack file and verify it: a sample for each step."""
    key = keys.new_data_key() if keys else None
    pack_id = destination.stem

    wall, cpu = time.perf_counter(), time.process_time()
    summary = write_pack_file(
        destination,
        zip(metas, paths, strict=True),
        pack_id,
        key=key,
        level=args.level,
        threads=args.threads,
    )
    write = _sample(wall, cpu, summary.bytes_written)

    wall, cpu = time.perf_counter(), time.process_time()
    with PackReader.open(destination, keys) as reader:
        report = reader.verify(threads=args.threads)
    verify = _sample(wall, cpu, summary.bytes_written)

    if not report.ok:
        raise SystemExit(f"read-back failed:\n{report.describe()}")
    destination.unlink()
    return write, verify


def tar_zstd_once(paths: list[Path], out: Path, args: argparse.Namespace) -> Sample:
    """``tar -cf - FILES | zstd -LEVEL -o OUT``, then fsync OUT."""
    folder = folder_for(args.kind, args.count)
    names = [str(path.relative_to(folder)) for path in paths]
    out.unlink(missing_ok=True)
    before = _children_cpu()

    wall = time.perf_counter()
    tar = subprocess.Popen(
        ["tar", "-cf", "-", "-C", str(folder), *names], stdout=subprocess.PIPE
    )
    zstd = subprocess.Popen(
        ["zstd", f"-{args.level}", "-q", "-o", str(out)], stdin=tar.stdout
    )
    assert tar.stdout is not None
    tar.stdout.close()
    if zstd.wait() != 0 or tar.wait() != 0:
        raise SystemExit("tar | zstd failed")
    _fsync(out)

    seconds = time.perf_counter() - wall
    return Sample(seconds, _children_cpu() - before, out.stat().st_size)


def _sample(wall: float, cpu: float, output_bytes: int) -> Sample:
    elapsed = time.perf_counter() - wall
    return Sample(elapsed, time.process_time() - cpu, output_bytes)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="ct", choices=("ct", "small"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    exit_on_sigterm()
    for tool in ("tar", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y {tool}")

    paths = generate(args.kind, args.count)
    megabytes = total_bytes(paths) / 1e6
    metas = instance_metas(paths)
    print(f"{len(paths)} {args.kind} instances, {megabytes:.1f} MB, zstd -{args.level}")

    samples: dict[str, list[Sample]] = defaultdict(list)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR / "out") as temp:
        work = Path(temp)
        keys = KeyStore.create_if_missing(key_store_path(work / "data"))
        # Rounds interleave the three so that other load on the machine
        # falls on all of them alike.
        for round_ in range(args.repeat):
            samples[BASELINE].append(tar_zstd_once(paths, work / "out.tar.zst", args))
            for label, store in (("pack", None), ("pack encrypted", keys)):
                destination = work / f"p-{round_:06d}.pack"
                write, verify = pack_once(paths, metas, destination, store, args)
                samples[f"{label}: write"].append(write)
                samples[f"{label}: verify"].append(verify)
                both = Sample(
                    write.wall + verify.wall, write.cpu + verify.cpu, write.output_bytes
                )
                samples[f"{label}: write + verify"].append(both)

    report(samples, megabytes)


def report(samples: dict[str, list[Sample]], megabytes: float) -> None:
    """The table of medians, then each pack figure against tar | zstd."""
    medians = {
        name: Sample(
            statistics.median(sample.wall for sample in runs),
            statistics.median(sample.cpu for sample in runs),
            runs[0].output_bytes,
        )
        for name, runs in samples.items()
    }
    headers = ["what", "wall s", "MB/s", "CPU s", "output MB", "output/input"]
    print_table(headers, [_row(n, megabytes, m) for n, m in medians.items()])
    print()

    baseline = medians[BASELINE]
    for name, median in medians.items():
        if name == BASELINE or name.endswith(": verify"):
            continue
        ratio = baseline.wall / median.wall
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        print(
            f"{name} / tar | zstd: {ratio:.2f}x speed ({verdict}, target "
            f"{TARGET_RATIO}), {baseline.cpu / median.cpu:.2f}x CPU efficiency"
        )


def _row(name: str, megabytes: float, median: Sample) -> list[str]:
    return [
        name,
        f"{median.wall:.3f}",
        f"{megabytes / median.wall:.1f}",
        f"{median.cpu:.3f}",
        f"{median.output_bytes / 1e6:.1f}",
        f"{median.output_bytes / 1e6 / megabytes:.3f}",
    ]


if __name__ == "__main__":
    main()
