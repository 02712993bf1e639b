"""Writing files so that a crash at any instant leaves either nothing or all.

Every tier writes through these helpers: data goes to a temporary name in
the destination directory, is flushed with fsync, renamed into place, and
the directory is flushed so that the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import OutOfSpaceError, StorageError

logger = logging.getLogger(__name__)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# How much more of a file being written makes its writing flushed ahead.
_AHEAD_STEP = 8 << 20
_AHEAD_PAUSE = 0.05


@contextmanager
def flushed_ahead(fd: int) -> Iterator[None]:
    """While the block writes a large file (by ``fd``), a thread flushes what
    is written so far each time it has grown by a few MiB: the disk takes
    the bytes while the writer makes more, and the fsync that ends the file
    finds little left to write. It does not replace that fsync. The
    thread's errors are left for it: it flushes the same file."""
    done = threading.Event()

    def flush_while_written() -> None:
        flushed = 0
        while not done.wait(_AHEAD_PAUSE):
            try:
                size = os.fstat(fd).st_size
                if size - flushed >= _AHEAD_STEP:
                    os.fdatasync(fd)
                    flushed = size
            except OSError:
                return

    thread = threading.Thread(target=flush_while_written, name="flush-ahead")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def make_directories(path: Path, stop: Path) -> None:
    """Create ``path`` and flush every directory it adds, up to ``stop``.

    A directory created just before a crash is lost with everything renamed
    into it unless its parent was flushed too.
    """
    missing: list[Path] = []
    current = path
    while not current.exists() and current != stop:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_directory(directory.parent)


def require_named_folder(path: Path, key: str, what: str) -> None:
    """Raise unless the folder configuration key ``key`` names is there.

    Such a folder is a mount point, or on a mounted disk: made anew while
    the disk is not mounted, it would hold the ``what`` on the system disk,
    hidden once the disk is mounted over it.
    """
    if path.is_dir():
        return
    if path.exists():
        raise StorageError(f"{key}: {path} is a file, not a folder")
    raise StorageError(
        f"{key}: {path} does not exist: mount the disk that holds the {what} "
        "there, or create the folder (a folder the configuration names is "
        "never made)"
    )


def move_into_place(
    source: Path, destination: Path, root: Path, flushed: bool = False
) -> None:
    """Flush ``source`` and rename it to ``destination`` durably.

    Both must be on the same file system (under ``root``). On return the
    file's bytes and its new name are on stable storage. ``flushed``: the
    caller has already flushed ``source`` with :func:`fsync_file`.
    """
    try:
        if not flushed:
            fsync_file(source)
        if not destination.parent.is_dir():
            make_directories(destination.parent, root)
        os.rename(source, destination)
        fsync_directory(destination.parent)
    except OSError as exc:
        raise translate_os_error(exc, f"cannot store {destination}") from exc


def translate_os_error(exc: OSError, what: str) -> StorageError:
    """Turn an OSError into the appliance's storage error vocabulary."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(f"{what}: no space left on the device")
    if exc.errno == errno.EEXIST and exc.filename and not os.path.isdir(exc.filename):
        # A folder setting that names a file: "File exists" would not say so.
        return StorageError(f"{what}: {exc.filename} is a file, not a folder")
    return StorageError(f"{what}: {exc.strerror or exc}")


def discard(temporary: Path) -> None:
    """Remove a half-written temporary file, if there is one, after its
    writing failed. On a file system that refused the writing (read only,
    gone) the removal may fail too: that must not hide why the writing
    failed, and temporary names are never read as data."""
    try:
        temporary.unlink(missing_ok=True)
    except OSError as exc:
        # A read-only file system refuses to remove even what is not
        # there: that says nothing worth a line.
        if temporary.exists():
            logger.warning("cannot remove the temporary %s: %s", temporary, exc)
