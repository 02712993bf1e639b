"""The directory mirror: a local or mounted folder (NFS, a USB disk).

Uploads are flushed like every other write of the appliance (see
:mod:`appliance.storage.durable`): the partial file is fsynced before it is
renamed, and the folder after. The rename into place is a hard link then an
unlink, which fails rather than replace a file already there; on file
systems without hard links (FAT on USB disks) it falls back to a rename
after checking that the name is free.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from appliance.errors import StorageError, TransportError
from appliance.replication.transports.base import BLOCK_SIZE, RemoteWriter, Transport
from appliance.storage.durable import (
    flushed_ahead,
    fsync_directory,
    make_directories,
    move_into_place,
)

logger = logging.getLogger(__name__)

# What link() answers on file systems that have no hard links.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class DirectoryTransport(Transport):
    """A mirror in a folder that must already exist.

    The folder is not created. Pointed at a folder inside the mirror disk
    (``/mnt/mirror-disk/mirror``, not the mount point itself), an unmounted
    disk fails this check instead of filling the system disk below it.
    """

    # A bare mount point passes this check while its disk is unmounted; the
    # replicator's identity check (replication/identity.py) then refuses
    # it, as a mirror with no marker and none of the packs sent so far.

    def __init__(self, root: Path, block_size: int = BLOCK_SIZE) -> None:
        if not root.is_dir():
            raise TransportError(
                f"the mirror folder {root} does not exist or is not a folder: "
                "create it, or mount the mirror disk there"
            )
        self.root = root
        self.block_size = block_size

    def close(self) -> None:
        """Nothing to release: every file is closed after each operation."""

    def _file(self, path: str) -> Path:
        # ``path`` passed the name grammar: it cannot climb out of the root.
        return self.root / path

    def _size(self, path: str) -> int | None:
        try:
            info = os.lstat(self._file(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error(exc, f"cannot look at {path}") from exc
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def _read(self, path: str, offset: int) -> Iterator[bytes]:
        try:
            file = open(self._file(path), "rb")  # noqa: SIM115 closed by _chunks
            file.seek(offset)
        except FileNotFoundError as exc:
            raise TransportError(f"{path} is not on the mirror") from exc
        except OSError as exc:
            raise _error(exc, f"cannot read {path}") from exc
        return self._chunks(file, path)

    def _chunks(self, file: BinaryIO, path: str) -> Iterator[bytes]:
        with file:
            try:
                while chunk := file.read(self.block_size):
                    yield chunk
            except OSError as exc:
                raise _error(exc, f"cannot read {path}") from exc

    def _writer(self, path: str, offset: int) -> RemoteWriter:
        target = self._file(path)
        try:
            make_directories(target.parent, self.root)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _error(exc, f"cannot write {path}") from exc
        return _FileWriter(fd, offset, path)

    def _rename_new(self, path: str, new_path: str) -> bool:
        source, target = self._file(path), self._file(new_path)
        try:
            os.link(source, target)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise _error(exc, f"cannot rename {path}") from exc
            return self._rename_unless_taken(source, target)
        try:
            fsync_directory(target.parent)
            os.unlink(source)
        except OSError as exc:
            raise _error(exc, f"cannot rename {path}") from exc
        return True

    def _rename_unless_taken(self, source: Path, target: Path) -> bool:
        # Without hard links the check and the rename are two steps; the
        # replicator is the only writer of the mirror, so nothing races it.
        if os.path.lexists(target):
            return False
        try:
            move_into_place(source, target, self.root)
        except StorageError as exc:
            raise TransportError(str(exc)) from exc
        return True

    def _remove(self, path: str) -> None:
        try:
            os.unlink(self._file(path))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _error(exc, f"cannot remove {path}") from exc
        logger.info("mirror: removed %s", path)

    def _walk(self, folder: str) -> Iterator[tuple[str, int]]:
        top = self._file(folder) if folder else self.root
        if not top.is_dir():
            return

        def fail(exc: OSError) -> None:
            raise _error(exc, f"cannot list {folder or 'the mirror'}") from exc

        for directory, _folders, files in os.walk(top, onerror=fail):
            for file in files:
                path = Path(directory) / file
                size = self._size_of(path)
                if size is not None:
                    yield path.relative_to(self.root).as_posix(), size

    @staticmethod
    def _size_of(path: Path) -> int | None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None


class _FileWriter(RemoteWriter):
    """A partial file on the mirror disk, fsynced on commit."""

    def __init__(self, fd: int, offset: int, path: str) -> None:
        self._path = path
        self._file = open(fd, "wb", closefd=True)  # noqa: SIM115 closed by commit
        # A pack goes to the mirror disk while it arrives, not all at commit.
        self._ahead = contextlib.ExitStack()
        try:
            # Anything after the offset is from an attempt that is not kept.
            self._file.truncate(offset)
            self._file.seek(offset)
            self._ahead.enter_context(flushed_ahead(fd))
        except OSError as exc:
            self.discard()
            raise _error(exc, f"cannot write {path}") from exc

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise _error(exc, f"cannot write {self._path}") from exc

    def commit(self) -> None:
        self._ahead.close()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            raise _error(exc, f"cannot write {self._path}") from exc

    def discard(self) -> None:
        self._ahead.close()
        try:
            self._file.close()
        except OSError:
            logger.debug("mirror: closing %s failed", self._path, exc_info=True)


def _error(exc: OSError, what: str) -> TransportError:
    """Turn an OSError of the mirror folder into a TransportError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransportError(f"{what}: the mirror disk is full")
    return TransportError(f"{what}: {exc.strerror or exc}")
