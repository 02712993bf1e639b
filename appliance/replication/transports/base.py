"""The one interface every mirror transport offers, and how an upload runs.

The mirror holds opaque files (encrypted packs, catalog snapshots, journal
segments) under remote names checked by :mod:`.names`. Every backend
honours the same contract, checked by one conformance suite
(tests/test_transports.py):

- ``put`` writes to ``NAME.partial``, checks the size the mirror reports,
  then renames the partial file to ``NAME`` without replacing anything; a
  file is therefore either complete under its name or not there at all;
- an upload cut short is resumed only after its partial file was read back
  and found equal to the start of the local file; otherwise it restarts;
- a name already holding a file is never overwritten: the same bytes count
  as done, different bytes raise :class:`MirrorConflictError`;
- failures raise :class:`TransportError`; names that break the grammar
  raise ValueError before anything is sent.

An upload, step by step::

    local bytes --(size, SHA-256 given)--> NAME exists? -- same bytes: done
                                              | no          different: refuse
                                              v
        NAME.partial exists and equals the local prefix? -> resume there
                                              | no
                                              v
        write from the offset: throttle(n), send block, progress(n)
                                              v
        flush; SHA-256 of what was sent == given? size on mirror == size?
        (bytes sent from memory were hashed by the caller as it made them)
                                              v
        rename NAME.partial -> NAME (never replacing)
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType

from appliance.errors import LocalSourceError, MirrorConflictError, TransportError
from appliance.replication.transports.names import (
    PARTIAL_SUFFIX,
    is_partial,
    is_valid_name,
    parent_of,
    partial_name,
    validate_name,
    validate_prefix,
)

logger = logging.getLogger(__name__)

# Called with a byte count: ``throttle`` before a block is sent (it may
# sleep), ``progress`` after it was handed to the mirror.
ByteCallback = Callable[[int], None]

BLOCK_SIZE = 1024 * 1024

# What an upload sends: a local file, or the file's bytes held in memory.
LocalBytes = Path | bytes | bytearray


class RemoteWriter(ABC):
    """An open partial file on the mirror, written from a given offset."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Send ``data`` after what was written so far."""

    @abstractmethod
    def commit(self) -> None:
        """Make every byte written durable on the mirror, or raise."""

    @abstractmethod
    def discard(self) -> None:
        """Close without committing; never raises (used on failure paths)."""


class Transport(ABC):
    """A connection to the off-site mirror: put, get, size, list, delete.

    One transport object serves one thread at a time. Use it as a context
    manager or call :meth:`close` when done.
    """

    block_size: int = BLOCK_SIZE

    # -- the interface ------------------------------------------------------

    def put(
        self,
        name: str,
        source: LocalBytes,
        size: int,
        sha256: str,
        progress: ByteCallback | None = None,
        throttle: ByteCallback | None = None,
    ) -> None:
        """Upload ``source`` (``size`` bytes) as ``name``.

        ``sha256`` is the hex digest the file must have. ``source`` is a
        local file, whose bytes are hashed on the way and compared before
        the file is renamed into place; or the bytes themselves, held in
        memory by a caller that hashed them as it made them (a pack just
        written), sent without another hash (but for the part a resumed
        upload starts after, compared as a file's would be).

        ``throttle`` is called with each block's size before it is sent
        and may sleep (the bandwidth limit); ``progress`` receives the
        bytes sent, block by block (fewer than ``size`` in all when an
        earlier upload was resumed). Raises ValueError for a bad name,
        MirrorConflictError when other bytes hold the name,
        LocalSourceError when ``source`` is shorter than ``size`` or has
        another SHA-256, TransportError for any other failure; exceptions
        of the hooks pass through.
        """
        validate_name(name)
        started = time.monotonic()
        if self._complete_copy_exists(name, size, sha256):
            self._remove(partial_name(name))
            return
        offset, hasher = self._resume_point(name, source, size)
        self._send(name, source, size, offset, hasher, progress, throttle)
        sent = hasher.hexdigest() if hasher is not None else sha256
        self._check_upload(name, size, sha256, sent)
        self._place(name, size, sha256)
        self._log_done(name, size, offset, time.monotonic() - started)

    def get(self, name: str) -> Iterator[bytes]:
        """The bytes of ``name``, in chunks; raises at once if it is missing."""
        validate_name(name)
        return self._read(name, 0)

    def size(self, name: str) -> int | None:
        """The size of ``name`` on the mirror, None if it is not there."""
        validate_name(name)
        return self._size(name)

    def list(self, prefix: str = "", *, partial: bool = False) -> list[tuple[str, int]]:
        """``(name, size)`` of every file whose name starts with ``prefix``.

        With ``partial``, the unfinished uploads instead: the name each
        would complete, and the bytes it holds so far.
        """
        validate_prefix(prefix)
        found = []
        for path, size in self._walk(parent_of(prefix)):
            if not path.startswith(prefix) or is_partial(path) != partial:
                continue
            name = path.removesuffix(PARTIAL_SUFFIX) if partial else path
            if is_valid_name(name):
                found.append((name, size))
        return sorted(found)

    def delete(self, name: str, *, partial: bool = False) -> None:
        """Remove ``name``, or with ``partial`` only its unfinished upload.

        Removing what is not there is not an error.
        """
        validate_name(name)
        self._remove(partial_name(name) if partial else name)

    def sha256(self, name: str) -> str:
        """The hex SHA-256 of ``name`` as read back from the mirror."""
        hasher = hashlib.sha256()
        for chunk in self.get(name):
            hasher.update(chunk)
        return hasher.hexdigest()

    def connect(self) -> None:  # noqa: B027 (optional: most mirrors need none)
        """Open the connection now, if the mirror has one; otherwise the
        first operation opens it. Lets a caller overlap the SSH handshake
        with other work."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; the transport may not be used again."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    # -- what each backend provides ----------------------------------------
    # ``path`` is a checked name, or a checked name with the partial suffix.

    @abstractmethod
    def _size(self, path: str) -> int | None:
        """The size of a regular file, None when there is none."""

    @abstractmethod
    def _read(self, path: str, offset: int) -> Iterator[bytes]:
        """Open ``path`` now (raising if missing); its bytes from ``offset``."""

    @abstractmethod
    def _writer(self, path: str, offset: int) -> RemoteWriter:
        """Open ``path`` for writing at ``offset``, cutting off anything after
        it; creates the folders above it."""

    @abstractmethod
    def _rename_new(self, path: str, new_path: str) -> bool:
        """Rename ``path`` to ``new_path`` unless ``new_path`` exists (False)."""

    @abstractmethod
    def _remove(self, path: str) -> None:
        """Remove a file; no error if it is not there."""

    @abstractmethod
    def _walk(self, folder: str) -> Iterator[tuple[str, int]]:
        """``(path, size)`` of every regular file under ``folder``, at any
        depth ("" is the root); nothing if the folder does not exist."""

    def _waiting_for_throttle(self) -> AbstractContextManager[None]:
        """Hook: the uploader waits for its bandwidth limiter (not a stall)."""
        return nullcontext()

    def _note_progress(self) -> None:  # noqa: B027 (optional hook)
        """Hook: bytes moved to or from the mirror (for a stall watchdog)."""

    # -- the steps of an upload ---------------------------------------------

    def _complete_copy_exists(self, name: str, size: int, sha256: str) -> bool:
        """True if ``name`` already holds these bytes; raise if other bytes."""
        existing = self._size(name)
        if existing is None:
            return False
        if existing == size and self._digest(name) == sha256:
            logger.info("mirror: %s is already there, %d bytes", name, size)
            return True
        raise MirrorConflictError(
            f"{name} is already on the mirror with other content ({existing} "
            f"bytes, expected {size} with SHA-256 {sha256[:16]}...): files on "
            "the mirror are never overwritten; nothing was sent"
        )

    def _resume_point(
        self, name: str, source: LocalBytes, size: int
    ) -> tuple[int, hashlib._Hash | None]:
        """Where to start sending, and the hash of the local bytes before it
        (None for bytes in memory sent whole: their caller hashed them).

        A partial file from an earlier attempt counts only if it reads back
        equal to the start of the local file: a crash may leave a torn or
        zero-filled tail, or the file may belong to other bytes entirely.
        """
        partial = partial_name(name)
        held = self._size(partial)
        if held and held > size:
            logger.info("mirror: %s is longer than %s; restarting", partial, name)
            held = 0
        if not held:
            return 0, None if _in_memory(source) else hashlib.sha256()
        local = _hash_prefix(source, held)
        remote, count = hashlib.sha256(), 0
        for chunk in self._read(partial, 0):
            remote.update(chunk)
            count += len(chunk)
            self._note_progress()
        if count != held or remote.digest() != local.digest():
            logger.warning(
                "mirror: %s does not match the start of %s; restarting from 0",
                partial,
                source if isinstance(source, Path) else "the bytes to send",
            )
            return 0, None if _in_memory(source) else hashlib.sha256()
        logger.info("mirror: resuming %s at byte %d of %d", name, held, size)
        return held, local

    def _send(
        self,
        name: str,
        source: LocalBytes,
        size: int,
        offset: int,
        hasher: hashlib._Hash | None,
        progress: ByteCallback | None,
        throttle: ByteCallback | None,
    ) -> None:
        """Write the local file from ``offset`` to the partial file."""
        writer = self._writer(partial_name(name), offset)
        try:
            for block in _blocks(source, offset, size, self.block_size):
                if throttle is not None:
                    with self._waiting_for_throttle():
                        throttle(len(block))
                writer.write(block)
                if hasher is not None:
                    hasher.update(block)
                self._note_progress()
                if progress is not None:
                    progress(len(block))
            writer.commit()
        finally:
            writer.discard()

    def _check_upload(self, name: str, size: int, sha256: str, sent: str) -> None:
        """Refuse to rename a partial file that is not what it should be."""
        partial = partial_name(name)
        if sent != sha256:
            self._remove(partial)
            raise LocalSourceError(
                f"the local file for {name} does not have the SHA-256 given "
                f"({sent[:16]}... instead of {sha256[:16]}...): it changed or "
                "is damaged; nothing was stored"
            )
        held = self._size(partial)
        if held != size:
            raise TransportError(
                f"the mirror holds {held} bytes of {partial} after the upload, "
                f"not {size}; the next attempt checks and resumes it"
            )

    def _place(self, name: str, size: int, sha256: str) -> None:
        """Rename the checked partial file to ``name`` without replacing."""
        partial = partial_name(name)
        if self._rename_new(partial, name):
            return
        # Someone (or an earlier attempt whose answer was lost) put a file
        # there since we looked: fine if it is these very bytes.
        if self._complete_copy_exists(name, size, sha256):
            self._remove(partial)
            return
        raise MirrorConflictError(
            f"{name} on the mirror is taken by something that is not a file "
            f"(a folder?); the upload waits in {partial} until it is moved"
        )

    def _digest(self, path: str) -> str:
        hasher = hashlib.sha256()
        for chunk in self._read(path, 0):
            hasher.update(chunk)
            self._note_progress()
        return hasher.hexdigest()

    def _log_done(self, name: str, size: int, offset: int, seconds: float) -> None:
        rate = (size - offset) / seconds / 1e6 if seconds > 0 else 0.0
        resumed = f", resumed at byte {offset}" if offset else ""
        logger.info(
            "mirror: stored %s, %d bytes%s, in %.1f s (%.1f MB/s)",
            name,
            size,
            resumed,
            seconds,
            rate,
        )


def _in_memory(source: LocalBytes) -> bool:
    return not isinstance(source, Path)


def _hash_prefix(source: LocalBytes, length: int) -> hashlib._Hash:
    """The SHA-256 state after the first ``length`` local bytes."""
    hasher = hashlib.sha256()
    for block in _blocks(source, 0, length, BLOCK_SIZE):
        hasher.update(block)
    return hasher


def _blocks(
    source: LocalBytes, offset: int, end: int, block_size: int
) -> Iterator[bytes | memoryview]:
    """The local bytes from ``offset`` to ``end``, in blocks."""
    if not isinstance(source, Path):
        yield from _memory_blocks(memoryview(source), offset, end, block_size)
        return
    try:
        with open(source, "rb") as file:
            file.seek(offset)
            position = offset
            while position < end:
                block = file.read(min(block_size, end - position))
                if not block:
                    raise LocalSourceError(
                        f"{source} ends at byte {position}, before the "
                        f"{end} bytes expected; nothing was stored"
                    )
                position += len(block)
                yield block
    except OSError as exc:
        raise TransportError(f"cannot read {source}: {exc.strerror or exc}") from exc


def _memory_blocks(
    data: memoryview, offset: int, end: int, block_size: int
) -> Iterator[memoryview]:
    if len(data) < end:
        raise LocalSourceError(
            f"the bytes to send end at byte {len(data)}, before the {end} "
            "expected; nothing was stored"
        )
    for start in range(offset, end, block_size):
        yield data[start : min(start + block_size, end)]
