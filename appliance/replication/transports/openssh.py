"""The SFTP mirror through OpenSSH's client: the default SFTP transport.

``ssh`` (a child process, see :mod:`.sshprocess`) carries the connection
and does the encryption in C; this side speaks SFTP to it
(:mod:`.sftpwire`) and so keeps the whole upload contract of :mod:`.base`
in its own hands: the partial name, the SHA-256 of what is sent, the size
check, the rename that never replaces, the resume after a read-back.

Writes and reads go in requests as large as the server takes (255 KiB for
OpenSSH), up to :data:`~.sftpwire.WINDOW` of them ahead of their answers,
and every answer is checked. Before the rename, the partial file is
flushed to the mirror's disk when the server offers ``fsync@openssh.com``.
Reconnection and the stall watch are those of :mod:`.remote`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from appliance.errors import TransportError
from appliance.replication.transports.base import RemoteWriter
from appliance.replication.transports.remote import Listing, RemoteTransport
from appliance.replication.transports.settings import SftpSettings
from appliance.replication.transports.sftpwire import (
    OPEN_CREATE,
    OPEN_READ,
    OPEN_TRUNCATE,
    OPEN_WRITE,
    WINDOW,
    EndOfFile,
    ProtocolError,
    SftpWire,
)
from appliance.replication.transports.sshprocess import SshSession, open_ssh_session

logger = logging.getLogger(__name__)


class OpensshTransport(RemoteTransport[SshSession]):
    """A mirror reached over SFTP through ``ssh``, with a pinned host key
    and key login."""

    failures = (OSError, EOFError, ProtocolError)

    def __init__(
        self,
        settings: SftpSettings,
        sleep: Callable[[float], object] = time.sleep,
        connect: Callable[[SftpSettings], SshSession] = open_ssh_session,
    ) -> None:
        super().__init__(settings, sleep, connect)

    def _lost(self, exc: BaseException) -> bool:
        # Bytes that do not parse: the session cannot be trusted any more.
        return isinstance(exc, ProtocolError) or super()._lost(exc)

    @property
    def _wire(self) -> SftpWire:
        if self._session is None:
            raise EOFError("not connected to the mirror")
        return self._session.wire

    # -- the primitives ------------------------------------------------------

    def _stat(self, remote: str, follow: bool = True) -> tuple[int, int]:
        found = self._wire.stat(remote) if follow else self._wire.lstat(remote)
        return found.mode or 0, found.size or 0

    def _listdir(self, remote: str) -> Listing:
        return [
            (name, found.mode or 0, found.size or 0)
            for name, found in self._wire.listdir(remote)
        ]

    def _mkdir(self, remote: str) -> None:
        self._wire.mkdir(remote)

    def _rename(self, remote: str, target: str) -> None:
        self._wire.rename(remote, target)

    def _unlink(self, remote: str) -> None:
        self._wire.remove(remote)

    # -- reading and writing ---------------------------------------------------

    def _read(self, path: str, offset: int) -> Iterator[bytes]:
        wire = self._wire
        try:
            handle = wire.open(self._remote(path), OPEN_READ)
        except FileNotFoundError as exc:
            raise TransportError(f"{path} is not on the mirror") from exc
        try:
            size = wire.fstat(handle).size or 0
        except BaseException:
            _close_quietly(wire, handle)
            raise
        return self._chunks(wire, handle, offset, size)

    def _chunks(
        self, wire: SftpWire, handle: bytes, offset: int, size: int
    ) -> Iterator[bytes]:
        try:
            for chunk in wire.read_range(handle, offset, size):
                self._note_progress()
                yield chunk
        except EndOfFile as exc:
            raise TransportError(f"the file shrank on the mirror: {exc}") from exc
        finally:
            _close_quietly(wire, handle)

    def _writer(self, path: str, offset: int) -> RemoteWriter:
        self._make_folders(path)
        wire = self._wire
        flags = OPEN_WRITE | OPEN_CREATE | (0 if offset else OPEN_TRUNCATE)
        handle = wire.open(self._remote(path), flags)
        try:
            if offset:
                wire.truncate(handle, offset)
        except BaseException:
            _close_quietly(wire, handle)
            raise
        return _WindowedWriter(wire, handle, offset)


class _WindowedWriter(RemoteWriter):
    """Writes sent up to WINDOW ahead of their answers, each answer checked.

    ``write`` returns once the bytes are handed to ssh; an answer that says
    a write failed raises at a later ``write`` or at ``commit``, which
    waits for every answer, flushes the file on the mirror and closes it.
    """

    def __init__(self, wire: SftpWire, handle: bytes, offset: int) -> None:
        self._wire = wire
        self._handle: bytes | None = handle
        self._offset = offset
        self._waiting: collections.deque[int] = collections.deque()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        step = self._wire.max_write
        for start in range(0, len(view), step):
            while len(self._waiting) >= WINDOW:
                self._wire.check_status(self._waiting.popleft())
            piece = view[start : start + step]
            self._waiting.append(
                self._wire.send_write(self._handle_now, self._offset, piece)
            )
            self._offset += len(piece)

    def commit(self) -> None:
        while self._waiting:
            self._wire.check_status(self._waiting.popleft())
        handle = self._handle_now
        if not self._wire.fsync(handle):
            logger.debug("mirror: the server cannot flush files (no fsync)")
        self._handle = None
        self._wire.close(handle)

    def discard(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        self._wire.forget(self._waiting)
        self._waiting.clear()
        _close_quietly(self._wire, handle)

    @property
    def _handle_now(self) -> bytes:
        if self._handle is None:
            raise TransportError("this upload's remote file is already closed")
        return self._handle


def _close_quietly(wire: SftpWire, handle: bytes) -> None:
    """Close a remote file on a failure path (the connection may be gone)."""
    with contextlib.suppress(*OpensshTransport.failures):
        wire.close(handle)
