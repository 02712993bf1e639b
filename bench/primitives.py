"""What this machine allows: the cost of each step the appliance repeats for
every byte, and of making bytes durable, measured alone.

CPU seconds per GB of ``ct`` instance data (``dataset.py``) for SHA-256,
zstd at levels -1, 1 and 3 (with the compressed size), zstd decoding and
AES-256-GCM, each over the same instances held in memory, on one thread;
then the disk: a 2 GiB write with O_DIRECT, 4,000 files of 525 kB written
by 8 threads with an fsync each, and the median latency of the flushes a
store waits for (a new 525 kB file, a rename with its folder, a 4 kB
overwrite with fdatasync). The benchmarks' ceilings follow from these
figures (see README.md, "What this machine allows").

Usage: ``.venv/bin/python bench/primitives.py [--count 400]``; the disk
tests write under ``bench/out/`` and remove what they wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard
from common import BENCH_DIR, exit_on_sigterm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from dataset import generate

FILE_SIZE = 525_000
FILES = 4_000
FLUSH_SAMPLES = 200


def cpu_per_gb(label: str, work: Callable[[], str], total: int) -> None:
    """Run ``work`` once; print its CPU seconds per GB and what it says."""
    started = time.process_time()
    note = work()
    seconds = time.process_time() - started
    print(f"  {label:<28} {seconds / (total / 1e9):5.2f} CPU s/GB  {note}")


def compute(datas: list[bytes]) -> None:
    total = sum(map(len, datas))
    print(f"CPU, one thread, {len(datas)} ct instances ({total / 1e6:.0f} MB):")

    def sha256() -> str:
        for data in datas:
            hashlib.sha256(data).digest()
        return ""

    cpu_per_gb("SHA-256", sha256, total)
    for level in (-1, 1, 3):
        compressor = zstandard.ZstdCompressor(level=level)

        def compress(compressor: zstandard.ZstdCompressor = compressor) -> str:
            size = sum(len(compressor.compress(data)) for data in datas)
            return f"(compressed to {size / total:.3f} of the size)"

        cpu_per_gb(f"zstd level {level}", compress, total)

    frames = [zstandard.ZstdCompressor(level=3).compress(data) for data in datas]

    def decompress() -> str:
        decompressor = zstandard.ZstdDecompressor()
        for frame in frames:
            decompressor.decompress(frame)
        return ""

    cpu_per_gb("zstd decoding (level 3)", decompress, total)
    cipher = AESGCM(AESGCM.generate_key(bit_length=256))

    def encrypt() -> str:
        for data in datas:
            cipher.encrypt(os.urandom(12), data, None)
        return ""

    cpu_per_gb("AES-256-GCM", encrypt, total)


def direct_write(folder: Path) -> float:
    """MB/s of one 2 GiB file written with O_DIRECT in 4 MiB blocks."""
    path = folder / "direct"
    block = 4 << 20
    # An anonymous mapping is page-aligned, as O_DIRECT wants its buffer.
    buffer = mmap.mmap(-1, block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(512):
            os.write(fd, buffer)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
        buffer.close()
        path.unlink()
    return 512 * block / 1e6 / seconds


def many_files(folder: Path) -> float:
    """MB/s of FILES files of FILE_SIZE, 8 threads, an fsync each."""
    data = os.urandom(FILE_SIZE)

    def write(number: int) -> None:
        sub = folder / f"{number % 256:02x}"
        sub.mkdir(exist_ok=True)
        fd = os.open(sub / str(number), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(FILES)))
    return FILES * FILE_SIZE / 1e6 / (time.perf_counter() - started)


def median_ms(step: Callable[[int], None]) -> float:
    samples = []
    for number in range(FLUSH_SAMPLES):
        started = time.perf_counter()
        step(number)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def flush_latencies(folder: Path) -> dict[str, float]:
    data = os.urandom(FILE_SIZE)
    page = os.urandom(4096)

    def new_file(number: int) -> None:
        fd = os.open(folder / f"new-{number}", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(number: int) -> None:
        os.rename(folder / f"new-{number}", folder / f"named-{number}")
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    kept = os.open(folder / "kept", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(kept, bytes(4096 * 256))
        os.fsync(kept)

        def overwrite(number: int) -> None:
            os.pwrite(kept, page, (number % 256) * 4096)
            os.fdatasync(kept)

        return {
            "new 525 kB file, fsync": median_ms(new_file),
            "rename, folder fsync": median_ms(rename),
            "4 kB overwrite, fdatasync": median_ms(overwrite),
        }
    finally:
        os.close(kept)


def disk() -> None:
    (BENCH_DIR / "out").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="primitives-", dir=BENCH_DIR / "out"))
    try:
        print("disk (bench/out):")
        print(f"  2 GiB, O_DIRECT                 {direct_write(folder):6.0f} MB/s")
        files = folder / "files"
        files.mkdir()
        rate = many_files(files)
        print(f"  {FILES} x 525 kB, 8 threads, fsync {rate:6.0f} MB/s")
        shutil.rmtree(files)
        for label, value in flush_latencies(folder).items():
            print(f"  {label:<31} {value:6.2f} ms (median of {FLUSH_SAMPLES})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=400, help="ct instances")
    args = parser.parse_args()
    exit_on_sigterm()
    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    compute([path.read_bytes() for path in generate("ct", args.count)])
    disk()
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
