"""The SFTP mirror through paramiko, in this process: checked pipelining.

Reconnection, the stall watch and resumed downloads are those of every
network mirror (:mod:`.remote`). This client needs no other program; the
one through OpenSSH's ``ssh`` (:mod:`.openssh`, ``mirror.client =
"openssh"``, the default) moves the same files several times faster, with
less CPU, and is preferred where ``ssh`` is installed.

Before the rename a written file is flushed to the mirror's disk with
OpenSSH's ``fsync@openssh.com`` extension, as the other client does.
paramiko has no call for it, so the request goes through the client's
generic request path; a server without the extension answers "unsupported"
and the file is renamed unflushed, as there is no other way to flush it.

Renames use plain SFTP ``rename``, which OpenSSH's server performs with a
hard link: it never replaces an existing file. Servers whose rename would
replace are covered by a check just before it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import paramiko
from paramiko.sftp import CMD_EXTENDED

from appliance.errors import TransportError
from appliance.replication.transports.base import RemoteWriter
from appliance.replication.transports.remote import Listing, RemoteTransport
from appliance.replication.transports.settings import SftpSettings
from appliance.replication.transports.ssh import Session, open_session

logger = logging.getLogger(__name__)

# Downloads ask for this much at a time, in requests of paramiko's size.
_READ_WINDOW = 8 * 1024 * 1024


class SftpTransport(RemoteTransport[Session]):
    """A mirror reached over SFTP with paramiko, with a pinned host key and
    key login."""

    failures = (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError)

    def __init__(
        self,
        settings: SftpSettings,
        sleep: Callable[[float], object] = time.sleep,
        connect: Callable[[SftpSettings], Session] = open_session,
    ) -> None:
        super().__init__(settings, sleep, connect)

    def _lost(self, exc: BaseException) -> bool:
        # An SSHException is a broken connection, an SFTPError a garbled reply.
        if isinstance(exc, paramiko.SSHException | paramiko.SFTPError):
            return True
        return super()._lost(exc)

    @property
    def _sftp(self) -> paramiko.SFTPClient:
        if self._session is None:
            raise EOFError("not connected to the mirror")
        return self._session.sftp

    # -- the primitives and what the base class needs ----------------------

    def _stat(self, remote: str, follow: bool = True) -> tuple[int, int]:
        found = self._sftp.stat(remote) if follow else self._sftp.lstat(remote)
        return found.st_mode or 0, found.st_size or 0

    def _listdir(self, remote: str) -> Listing:
        return [
            (entry.filename, entry.st_mode or 0, entry.st_size or 0)
            for entry in self._sftp.listdir_attr(remote)
        ]

    def _mkdir(self, remote: str) -> None:
        self._sftp.mkdir(remote)

    def _rename(self, remote: str, target: str) -> None:
        self._sftp.rename(remote, target)

    def _unlink(self, remote: str) -> None:
        self._sftp.remove(remote)

    def _read(self, path: str, offset: int) -> Iterator[bytes]:
        try:
            file = self._sftp.open(self._remote(path), "rb")
        except FileNotFoundError as exc:
            raise TransportError(f"{path} is not on the mirror") from exc
        try:
            size = file.stat().st_size or 0
        except BaseException:
            _close_quietly(file)
            raise
        return self._chunks(file, offset, size)

    def _chunks(
        self, file: paramiko.SFTPFile, offset: int, size: int
    ) -> Iterator[bytes]:
        # paramiko pipelines the reads of a prefetch; asking a window at a
        # time keeps what is in flight small when a reader stops early.
        try:
            position = offset
            while position < size:
                end = min(position + _READ_WINDOW, size)
                file.seek(position)
                file.prefetch(end)
                while position < end:
                    chunk = file.read(min(self.block_size, end - position))
                    if not chunk:
                        _read_ended(file, position)
                    position += len(chunk)
                    self._note_progress()
                    yield chunk
        finally:
            _close_quietly(file)

    def _writer(self, path: str, offset: int) -> RemoteWriter:
        self._make_folders(path)
        file = self._sftp.open(self._remote(path), "r+" if offset else "w")
        try:
            if offset:
                file.truncate(offset)
                file.seek(offset)
            file.set_pipelined(True)
        except BaseException:
            _close_quietly(file)
            raise
        return _PipelinedWriter(file)


def _read_ended(file: paramiko.SFTPFile, position: int) -> NoReturn:
    """An empty read before the end: the file shrank, or the connection
    was lost, which paramiko cannot tell from the file's end (it reads an
    EOFError from either as the end). The size says which: a lost
    connection raises EOFError, and the download goes on from
    ``position`` once connected again."""
    try:
        now = file.stat().st_size
    except SftpTransport.failures as exc:
        raise EOFError(f"the read ended at byte {position}: {exc}") from exc
    if now is not None and now <= position:
        raise TransportError("the file shrank on the mirror")
    raise EOFError(f"the read ended at byte {position} of {now}")


class _PipelinedWriter(RemoteWriter):
    """Pipelined writes to an SFTP file, every answer of which is checked.

    With pipelining paramiko does not wait for the server's answer to each
    write; it checks answers as they come in, but those still outstanding
    when the file is closed are read and not checked. So the last bytes are
    held back and sent with pipelining off: that write waits for, and
    checks, every answer before its own.
    """

    def __init__(self, file: paramiko.SFTPFile) -> None:
        self._file = file
        self._held = b""

    def write(self, data: bytes | memoryview) -> None:
        if self._held:
            self._file.write(self._held)
        cut = max(0, len(data) - paramiko.SFTPFile.MAX_REQUEST_SIZE)
        if cut:
            self._file.write(memoryview(data)[:cut])
        self._held = bytes(data[cut:])  # a request's worth at most

    def commit(self) -> None:
        self._file.set_pipelined(False)
        if self._held:
            self._file.write(self._held)
            self._held = b""
        _flush(self._file)
        self._file.close()

    def discard(self) -> None:
        _close_quietly(self._file)


def _flush(file: paramiko.SFTPFile) -> None:
    """Ask the server to flush the open file to its disk.

    Any failure but "unsupported" is raised: the upload is not committed
    and is tried again, rather than counted while the mirror's disk may
    not hold it.
    """
    try:
        file.sftp._request(CMD_EXTENDED, "fsync@openssh.com", file.handle)
    except OSError as exc:
        if "unsupported" not in str(exc).lower():
            raise
        logger.debug("mirror: the server cannot flush files (no fsync)")


def _close_quietly(file: paramiko.SFTPFile) -> None:
    """Close a remote file on a failure path (the connection may be gone)."""
    with contextlib.suppress(*SftpTransport.failures):
        file.close()
