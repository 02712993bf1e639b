"""Extracting one instance from a pack onto the online tier, in a thread or
in a worker process.

A recall in one process spends most of its time in Python around the
decoding (tar headers, cipher and decoder set-up, temporary names, folder
checks), and only one thread at a time runs Python: a restore from the
mirror used little more than one core of two. Worker processes each run
their own interpreter. A worker is handed all it needs to extract one
member (the pack file's path, its data key, the manifest entry, the
SHA-256 the catalog counts and where the file goes) and answers what
happened; the keys, the recall's note and the catalog stay with the
process that started the recall, which counts nothing before a worker
says the file is flushed.

The data key goes to the workers over their pipe, as the pack's own
bytes would: they are children of the recalling process, never anything
else's.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError, DamagedPackError
from appliance.hsm import failures
from appliance.hsm.failures import Failure
from appliance.storage.durable import fsync_file
from appliance.storage.packs import PackReader
from appliance.storage.packs.manifest import PackedInstance

# None: the file is in place and flushed; a Failure: the pack did not give
# the instance (nothing is left under its key); an OSError: the file could
# not be flushed, which stops the recall (the disk, not the pack, is at
# fault).
Outcome = Failure | OSError | None


def extract_one(
    reader: PackReader,
    entry: PackedInstance,
    sha256: str,
    destination: Path,
    root: Path,
) -> Outcome:
    """Extract ``entry`` to ``destination`` and flush it, if its bytes are
    those the catalog counts (``sha256``)."""
    try:
        reader.extract_to(entry, destination, root, flush=False)
    except DamagedPackError as exc:
        return Failure(failures.MEMBER_DAMAGED, f"{exc.part}: {exc.reason}")
    except ApplianceError as exc:
        return Failure(failures.NOT_WRITTEN, str(exc))

    if entry.meta.sha256 != sha256:
        # The pack holds other bytes than the catalog counts.
        destination.unlink(missing_ok=True)
        return Failure(
            failures.OTHER_BYTES,
            f"{entry.meta.sha256[:16]}... in the pack, {sha256[:16]}... in the catalog",
        )

    # Flushed here, by the worker that wrote it, while the others go on
    # decoding: the disk writes overlap the work. Its folder's new name is
    # flushed by the recall, once for all of a folder's files.
    try:
        fsync_file(destination)
    except OSError as exc:
        return exc
    return None


@dataclass(frozen=True)
class MemberJob:
    """One instance for a worker process to extract."""

    pack_path: str
    pack_id: str
    data_key: bytes | None
    entry: PackedInstance
    sha256: str
    destination: str
    root: str


def extract_members(jobs: list[MemberJob | Failure]) -> list[Outcome]:
    """Run in a worker process: :func:`extract_member` for each job; a
    Failure (the instance's entry the recalling process did not find in the
    manifest) is answered as it is."""
    return [job if isinstance(job, Failure) else extract_member(job) for job in jobs]


def extract_member(job: MemberJob) -> Outcome:
    """Run in a worker process: :func:`extract_one` for ``job``."""
    try:
        reader = _reader_for(job)
    except ApplianceError as exc:
        return Failure(failures.PACK_UNREAD, str(exc))
    return extract_one(
        reader, job.entry, job.sha256, Path(job.destination), Path(job.root)
    )


# The pack a worker read last, kept open: a recall hands out a pack's
# members together, so most jobs find theirs open. Only one is kept, so a
# pack the cache drops holds its disk space at most until the worker's
# next pack.
_open: dict[tuple[str, int], PackReader] = {}


def _reader_for(job: MemberJob) -> PackReader:
    try:
        inode = os.stat(job.pack_path).st_ino
    except OSError as exc:
        raise ApplianceError(f"cannot open {job.pack_path}: {exc}") from exc
    key = (job.pack_path, inode)
    reader = _open.get(key)
    if reader is not None:
        return reader

    for kept in _open.values():
        kept.close()
    _open.clear()
    reader = PackReader.open(Path(job.pack_path), data_key=job.data_key)
    if reader.pack_id != job.pack_id:
        reader.close()
        raise ApplianceError(f"{job.pack_path} holds pack {reader.pack_id}")
    _open[key] = reader
    return reader


def _worker_started() -> None:
    # Ctrl-C at a terminal reaches the whole process group: the recalling
    # process decides what stops, and waits for the files being written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def extraction_pool(threads: int = 1, processes: int = 0) -> Iterator[Executor | None]:
    """Workers for one or more recalls' extraction: ``processes`` worker
    processes if above 0, else ``threads`` threads; None for one thread."""
    if processes > 0:
        # Spawned, not forked: the recalling process runs threads (fetches,
        # a DICOM service) whose locks a fork would copy held.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            processes, mp_context=context, initializer=_worker_started
        ) as pool:
            yield pool
        return
    if threads <= 1:
        yield None
        return
    with ThreadPoolExecutor(threads, "recall-extract") as pool:
        yield pool
