"""Extracting one instance from a pack onto the online tier.

A recall may extract several instances at once, each in a thread of a
pool: zstd, SHA-256, AES-GCM and the wait for each file's fsync let the
others run meanwhile. (Worker processes were tried instead, to take the
per-instance Python work out of the one interpreter: handing each
instance over and starting the processes cost more than they gained, on
two cores.)
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
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

    # Flushed here, by the thread that wrote it, while the others go on
    # decoding: the disk writes overlap the work. Its folder's new name is
    # flushed by the recall, once for all of the recall's files.
    try:
        fsync_file(destination)
    except OSError as exc:
        return exc
    return None


@contextmanager
def extraction_pool(threads: int) -> Iterator[Executor | None]:
    """Worker threads for one or more recalls' extraction; None for one
    thread."""
    if threads <= 1:
        yield None
        return
    with ThreadPoolExecutor(threads, "recall-extract") as pool:
        yield pool
