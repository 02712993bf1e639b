"""One running appliance per online tier (and per catalog).

Two files in the tier's root, locked with flock (released by the kernel
when a process dies, however it dies):

    serve.lock    held exclusively by the listener for its whole life; a
                  second ``appliance serve`` on the same tier stops at once.
                  Also by ``appliance restore``, which writes so in it
                  (``appliance restore (pid N)``), so that whoever is
                  refused is told who holds it
    workers.lock  held shared by every worker process; a new listener waits
                  for the workers of a previous run (which may still be
                  finishing associations) before it clears ``incoming/``
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from appliance.errors import StorageError

logger = logging.getLogger(__name__)

SERVE_LOCK = "serve.lock"
WORKERS_LOCK = "workers.lock"


class TierLock:
    """An flock on a file in the online tier's root, held until released."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / name
        self._fd: int | None = None

    def acquire(self, exclusive: bool, wait: float = 0.0) -> bool:
        """Take the lock; False if another process still holds it after ``wait``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.2)
                continue
            self._fd = fd
            return True

    def note(self, text: str) -> None:
        """Write ``text`` in the held lock file, for those it keeps out."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode("utf-8"), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_tier(root: Path, wait_for_workers: float, holder: str = "") -> TierLock:
    """Make this process the only listener serving the tier at ``root``;
    ``holder`` names a process that holds it without serving (a restore).

    Raises StorageError when another appliance serves it, or when workers of
    an earlier run are still busy after ``wait_for_workers`` seconds.
    """
    serve = TierLock(root, SERVE_LOCK)
    if not serve.acquire(exclusive=True):
        other = holder_of(root)
        if other:
            raise StorageError(
                f"{other} is using {root} (it holds {serve.path}): wait for "
                "it to end, or stop it, first"
            )
        raise StorageError(
            f"another appliance is already serving {root} (it holds "
            f"{serve.path}); stop it first"
        )
    serve.note(f"{holder} (pid {os.getpid()})" if holder else "")

    workers = TierLock(root, WORKERS_LOCK)
    if not workers.acquire(exclusive=True, wait=0.0):
        logger.info("waiting for the workers of a previous run to finish")
        if not workers.acquire(exclusive=True, wait=wait_for_workers):
            serve.release()
            raise StorageError(
                f"workers of a previous run still use {root} after "
                f"{wait_for_workers:.0f} s"
            )
    workers.release()
    return serve


def claim_catalog(folder: Path) -> TierLock:
    """Make this listener the only one using the catalog in ``folder``.

    Two appliances with online tiers of their own but one catalog (a
    configuration copied with its storage.catalog_path) would each take
    the instances the other stored for missing. Raises StorageError when
    another appliance uses it."""
    lock = TierLock(folder, SERVE_LOCK)
    if not lock.acquire(exclusive=True):
        raise StorageError(
            f"another appliance already serves the catalog at {folder} (it "
            f"holds {lock.path}); stop it, or give this one its own "
            "storage.catalog_path"
        )
    return lock


def holder_of(root: Path) -> str:
    """What the process holding ``serve.lock`` wrote in it: empty for the
    service, which writes nothing."""
    try:
        return (root / SERVE_LOCK).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def serving(root: Path) -> bool:
    """Whether an appliance serves the tier at ``root`` now (its listener
    holds ``serve.lock``). Asked with a shared lock taken and let go at
    once, on a descriptor opened for reading: any user who may read the
    tier may ask, and nothing is created."""
    try:
        fd = os.open(root / SERVE_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        # Not ours to read (another user's status command): taken to
        # serve, as the status said before it could tell.
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
