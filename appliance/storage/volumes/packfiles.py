"""Packs kept as plain files: their names, and receiving one within a limit.

Directory volumes and optical images hold each pack as one file whose name
is its whole index entry, so that a single rename makes a pack count::

    000042-p-000123-<64 hex digits of SHA-256>.pack
    |      |        |
    |      |        +-- digest of the pack's bytes, checked on every read
    |      +----------- pack id (letters, digits, '-', '_')
    +------------------ position: 1 for the first pack on the volume

The size is the file's size. The names carry no patient data.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from appliance.errors import VolumeError, VolumeFull
from appliance.storage.volumes.base import PackLocation, refused_writes

PACK_SUFFIX = ".pack"
READ_CHUNK = 1 << 20

_NAME = re.compile(
    r"(?P<position>\d{6,})-(?P<pack_id>[A-Za-z0-9][A-Za-z0-9_-]{0,63})"
    r"-(?P<sha256>[0-9a-f]{64})\.pack"
)


def pack_file_name(position: int, pack_id: str, sha256: str) -> str:
    """The file name of a pack (see the module docstring)."""
    return f"{position:06d}-{pack_id}-{sha256}{PACK_SUFFIX}"


def location_from_name(volume: str, name: str, size: int) -> PackLocation | None:
    """The location a pack file name stands for, or None for any other name."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return PackLocation(
        volume=volume,
        position=int(match["position"]),
        pack_id=match["pack_id"],
        size=size,
        sha256=match["sha256"],
    )


def receive(
    chunks: Iterable[bytes], handle: BinaryIO, limit: int, volume: str
) -> tuple[int, str]:
    """Copy ``chunks`` into ``handle``; return (size, SHA-256 hex digest).

    Raises VolumeFull as soon as more than ``limit`` bytes arrive (or the
    file system is full), without reading the rest: the caller removes what
    was written. Errors of the source itself pass through unchanged.
    """
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise VolumeFull(
                f"volume {volume} is full: the pack needs more than the "
                f"{limit} bytes still free"
            )
        digest.update(chunk)
        _write(handle, chunk, volume)
    return size, digest.hexdigest()


def _write(handle: BinaryIO, chunk: bytes, volume: str) -> None:
    try:
        handle.write(chunk)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VolumeFull(f"volume {volume} is full: its disk is full") from exc
        # A file system remounted read only after an error, in mid-pack.
        refused = refused_writes(exc, volume)
        if refused is not None:
            raise refused from exc
        raise VolumeError(f"cannot write to volume {volume}: {exc}") from exc


def stream_file(path: Path) -> Iterator[bytes]:
    """Read ``path`` in 1 MiB chunks."""
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk
