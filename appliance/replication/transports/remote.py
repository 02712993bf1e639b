"""What every network mirror shares: reconnection, stall watch, downloads
that go on where they stopped.

Every public operation runs on a connection opened on demand. When the
connection is lost (the network failed, the server went away, a read or
write timed out, or the stall watchdog cut a transfer that stopped moving)
it is dropped and the operation tried again after a capped exponential
backoff, ``retries`` times at most. An upload tried again resumes from its
partial file once that reads back right (see :mod:`.base`); a download
tried again continues where it stopped. A refusal from a live server (no
such file, permission denied) and a wrong host key are not tried again.

The SFTP clients (:mod:`.openssh`, :mod:`.sftp`) say what a connection is,
which errors their libraries raise and which of those mean "lost".
"""

from __future__ import annotations

import functools
import logging
import posixpath
import stat
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Generic, Protocol, TypeVar

from appliance.errors import StalledTransferError, TransportError
from appliance.replication.transports.base import ByteCallback, LocalBytes, Transport
from appliance.replication.transports.names import (
    folders_of,
    is_valid_name,
    validate_name,
)
from appliance.replication.transports.retry import backoff_delay
from appliance.replication.transports.settings import SftpSettings
from appliance.replication.transports.stall import StallWatchdog

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Connection(Protocol):
    """One connection to the mirror."""

    def active(self) -> bool:
        """Whether the connection is still up, as far as is known."""

    def abort(self) -> None:
        """Cut the connection now, from any thread; blocked calls fail."""

    def close(self) -> None:
        """Close the connection, ignoring failures."""


C = TypeVar("C", bound=Connection)
# ``(name, mode, size)`` of each entry of a remote folder.
Listing = list[tuple[str, int, int]]


class RemoteTransport(Transport, Generic[C]):
    """A mirror behind a connection that may be lost and opened again."""

    # What the client library and the socket layer raise; which of them
    # mean "connection lost" is decided by _lost.
    failures: tuple[type[BaseException], ...] = (OSError, EOFError)

    def __init__(
        self,
        settings: SftpSettings,
        sleep: Callable[[float], object],
        connect: Callable[[SftpSettings], C],
    ) -> None:
        self.settings = settings
        self.block_size = settings.block_size
        self._sleep = sleep
        self._open_session = connect
        self._session: C | None = None
        self._folders: set[str] = set()
        self._watchdog: StallWatchdog | None = None
        self._stalled = False
        self._closed = False

    # -- the interface, with reconnection ----------------------------------

    def put(
        self,
        name: str,
        source: LocalBytes,
        size: int,
        sha256: str,
        progress: ByteCallback | None = None,
        throttle: ByteCallback | None = None,
    ) -> None:
        """Upload ``source`` as ``name``; see :meth:`Transport.put`.

        A transfer with no progress for ``stall_timeout`` seconds is cut
        off and resumed; time spent waiting in ``throttle`` does not count.
        """
        validate_name(name)
        upload = functools.partial(
            self._watched_put, name, source, size, sha256, progress, throttle
        )
        self._retrying(f"put {name}", upload)

    def get(self, name: str) -> Iterator[bytes]:
        """The bytes of ``name``; after a lost connection the download goes
        on from the last byte received."""
        validate_name(name)
        first = self._retrying(f"get {name}", functools.partial(self._read, name, 0))
        return self._continued(name, first)

    def size(self, name: str) -> int | None:
        """The size of ``name``, None if it is not there."""
        validate_name(name)
        return self._retrying(f"size {name}", functools.partial(self._size, name))

    def list(self, prefix: str = "", *, partial: bool = False) -> list[tuple[str, int]]:
        """See :meth:`Transport.list`."""
        listing = functools.partial(super().list, prefix, partial=partial)
        return self._retrying(f"list {prefix!r}", listing)

    def delete(self, name: str, *, partial: bool = False) -> None:
        """See :meth:`Transport.delete`."""
        removal = functools.partial(super().delete, name, partial=partial)
        self._retrying(f"delete {name}", removal)

    def connect(self) -> None:
        """Open the connection now (with the retries of any operation)."""
        self._retrying("connect", lambda: None)

    def close(self) -> None:
        """Close the connection; later calls raise TransportError."""
        self._closed = True
        self._disconnect()

    # -- what each client provides -------------------------------------------
    # ``remote`` is a path on the server: ``remote_path`` and a checked name.

    @abstractmethod
    def _stat(self, remote: str, follow: bool = True) -> tuple[int, int]:
        """``(mode, size)`` of a remote path (of the link itself unless
        ``follow``); FileNotFoundError when there is none."""

    @abstractmethod
    def _listdir(self, remote: str) -> Listing:
        """``(name, mode, size)`` of a remote folder's entries."""

    @abstractmethod
    def _mkdir(self, remote: str) -> None: ...

    @abstractmethod
    def _rename(self, remote: str, target: str) -> None:
        """Plain SFTP rename (which an OpenSSH server never lets replace)."""

    @abstractmethod
    def _unlink(self, remote: str) -> None:
        """Remove a file; FileNotFoundError when there is none."""

    def _lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is gone (try again), rather
        than a refusal by a live server (do not)."""
        if self._stalled:
            return True
        if isinstance(exc, EOFError | TimeoutError | ConnectionError):
            return True
        return self._session is None or not self._session.active()

    # -- connection handling -----------------------------------------------

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation`` on a live connection, reconnecting as needed."""
        failures = 0
        while True:
            self._stalled = False
            try:
                self._connect()
                return operation()
            except TransportError:
                raise
            except self.failures as exc:
                failures += 1
                self._recover(what, exc, failures)

    def _continued(self, name: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Yield a download's chunks; after a lost connection, go on from
        the last byte received."""
        position, failures = 0, 0
        while True:
            try:
                for chunk in chunks:
                    position += len(chunk)
                    failures = 0
                    yield chunk
                return
            except TransportError:
                raise
            except self.failures as exc:
                failures += 1
                self._recover(f"get {name}", exc, failures)
            reopen = functools.partial(self._read, name, position)
            chunks = self._retrying(f"get {name}", reopen)

    def _recover(self, what: str, exc: BaseException, failures: int) -> None:
        """After a failure: raise if it is final, else drop and wait."""
        stalled = self._stalled
        if not self._lost(exc):
            raise TransportError(
                f"mirror {self.settings.where}: {what}: {describe(exc)}"
            ) from exc
        self._disconnect()
        if failures > self.settings.retries:
            raise self._gave_up(what, exc, failures, stalled) from exc
        delay = backoff_delay(
            failures, self.settings.backoff, self.settings.backoff_max
        )
        logger.warning(
            "mirror %s: %s failed (%s); trying again in %.1f s (%d of %d)",
            self.settings.where,
            what,
            "stalled" if stalled else describe(exc),
            delay,
            failures,
            self.settings.retries,
        )
        self._sleep(delay)

    def _gave_up(
        self, what: str, exc: BaseException, failures: int, stalled: bool
    ) -> TransportError:
        where = self.settings.where
        if stalled:
            return StalledTransferError(
                f"mirror {where}: {what}: no progress for "
                f"{self.settings.stall_timeout:g} s ({failures} attempts); the "
                "connection was cut off and the next attempt resumes. If a "
                "bandwidth limit holds blocks this long, raise "
                "mirror.stall_timeout or lower mirror.block_size"
            )
        return TransportError(
            f"mirror {where}: cannot {what} after {failures} attempts: {describe(exc)}"
        )

    def _connect(self) -> None:
        if self._closed:
            raise TransportError("this mirror transport was closed")
        if self._session is not None and self._session.active():
            return
        self._disconnect()
        self._session = self._open_session(self.settings)
        self._folders = set()
        self._check_root()

    def _disconnect(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def _watched_put(
        self,
        name: str,
        source: LocalBytes,
        size: int,
        sha256: str,
        progress: ByteCallback | None,
        throttle: ByteCallback | None,
    ) -> None:
        timeout = self.settings.stall_timeout
        with StallWatchdog(timeout, self._on_stall) as watchdog:
            self._watchdog = watchdog
            try:
                super().put(name, source, size, sha256, progress, throttle)
            finally:
                self._watchdog = None

    def _on_stall(self) -> None:
        """Runs in the watchdog's thread: cut the connection."""
        self._stalled = True
        logger.warning(
            "mirror %s: no progress for %g s; cutting the connection",
            self.settings.where,
            self.settings.stall_timeout,
        )
        session = self._session
        if session is not None:
            session.abort()

    def _waiting_for_throttle(self) -> AbstractContextManager[None]:
        watchdog = self._watchdog
        return watchdog.paused() if watchdog is not None else nullcontext()

    def _note_progress(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.progress()

    # -- what the base class needs, on the client's primitives ---------------

    def _check_root(self) -> None:
        root = self.settings.remote_path
        try:
            mode, _size = self._stat(root)
        except FileNotFoundError as exc:
            raise TransportError(
                f"the folder {root!r} does not exist on the mirror "
                f"{self.settings.where}: create it (mirror.remote_path)"
            ) from exc
        if not stat.S_ISDIR(mode):
            raise TransportError(
                f"{root!r} on the mirror {self.settings.where} is not a folder"
            )

    def _size(self, path: str) -> int | None:
        try:
            mode, size = self._stat(self._remote(path))
        except FileNotFoundError:
            return None
        return size if stat.S_ISREG(mode) else None

    def _make_folders(self, path: str) -> None:
        for folder in folders_of(path):
            if folder in self._folders:
                continue
            remote = self._remote(folder)
            try:
                mode, _size = self._stat(remote)
            except FileNotFoundError:
                self._mkdir(remote)
            else:
                if not stat.S_ISDIR(mode):
                    raise TransportError(f"{folder} on the mirror is not a folder")
            self._folders.add(folder)

    def _rename_new(self, path: str, new_path: str) -> bool:
        target = self._remote(new_path)
        if self._exists(target):
            return False
        try:
            self._rename(self._remote(path), target)
        except OSError:
            if self._exists(target):
                return False
            raise
        return True

    def _exists(self, remote: str) -> bool:
        try:
            self._stat(remote, follow=False)
        except FileNotFoundError:
            return False
        return True

    def _remove(self, path: str) -> None:
        try:
            self._unlink(self._remote(path))
        except FileNotFoundError:
            return
        logger.info("mirror: removed %s", path)

    def _walk(self, folder: str) -> Iterator[tuple[str, int]]:
        top = self._remote(folder) if folder else self.settings.remote_path
        try:
            entries = self._listdir(top)
        except FileNotFoundError:
            return
        for name, mode, size in entries:
            path = f"{folder}/{name}" if folder else name
            if stat.S_ISDIR(mode) and is_valid_name(path):
                yield from self._walk(path)
            elif stat.S_ISREG(mode):
                yield path, size

    def _remote(self, path: str) -> str:
        # ``path`` passed the name grammar: it cannot climb out of the root.
        return posixpath.join(self.settings.remote_path, path)


def describe(exc: BaseException) -> str:
    """A failure in words, for messages and log lines."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().rstrip(":") or type(exc).__name__
