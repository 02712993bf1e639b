"""multipart/related bodies (RFC 2387, RFC 2046 5.1): reading a STOW-RS
request spooled to a file, and writing a WADO-RS response.

A request is split into one file per part in the online tier's incoming
folder before anything is stored, so that a body that turns out to be
malformed stores nothing.
"""

from __future__ import annotations

import logging
import mmap
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)

_PARAMETER = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_CHUNK = 1 << 20


class BadMultipart(ValueError):
    """The body is not the multipart/related message it says it is."""


@dataclass(frozen=True)
class MediaType:
    """A Content-Type: the type and its parameters (names lower case)."""

    type: str
    parameters: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> MediaType:
        kind, _, rest = header.partition(";")
        parameters = {
            name.lower(): value.strip('"')
            for name, value in _PARAMETER.findall(";" + rest)
        }
        return cls(kind.strip().lower(), parameters)


def split(body: Path, boundary: str, folder: Path) -> list[tuple[MediaType, Path]]:
    """Write each part of the spooled ``body`` to a file of its own in
    ``folder``; their media types and paths, in order. Raises BadMultipart
    (having removed the files it wrote)."""
    written: list[tuple[MediaType, Path]] = []
    try:
        with open(body, "rb") as handle:
            if body.stat().st_size == 0:
                raise BadMultipart("the request body is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for media_type, start, end in _parts(data, boundary.encode()):
                    path = folder / f"{secrets.token_hex(16)}.part"
                    written.append((media_type, path))
                    with open(path, "wb") as out:
                        for offset in range(start, end, _CHUNK):
                            out.write(data[offset : min(end, offset + _CHUNK)])
    except BaseException:
        for _media_type, path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _parts(data: mmap.mmap, boundary: bytes) -> list[tuple[MediaType, int, int]]:
    """(media type, first byte, end) of every part, checked before any is
    written out."""
    delimiter = b"--" + boundary
    position = data.find(delimiter)
    if position < 0:
        raise BadMultipart("no part starts with the boundary the Content-Type names")
    parts: list[tuple[MediaType, int, int]] = []
    while True:
        position += len(delimiter)
        if data[position : position + 2] == b"--":
            return parts
        line_end = data.find(b"\r\n", position)
        if line_end < 0 or data[position:line_end].strip(b" \t"):
            raise BadMultipart(f"part {len(parts) + 1}: malformed boundary line")
        headers_end = data.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            raise BadMultipart(f"part {len(parts) + 1}: its headers never end")
        headers = _headers(bytes(data[line_end + 2 : headers_end]), len(parts) + 1)
        start = headers_end + 4
        following = data.find(b"\r\n" + delimiter, start)
        if following < 0:
            raise BadMultipart(
                f"part {len(parts) + 1}: the body ends before the closing boundary"
            )
        content_type = headers.get("content-type", "application/octet-stream")
        parts.append((MediaType.parse(content_type), start, following))
        position = following + 2


def _headers(raw: bytes, number: int) -> dict[str, str]:
    headers = {}
    for line in raw.split(b"\r\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadMultipart(f"part {number}: malformed header line")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode(
            "latin-1"
        )
    return headers


# -- responses ----------------------------------------------------------------


def new_boundary() -> str:
    return secrets.token_hex(16)


async def stream_files(
    parts: list[tuple[str, Path]],
    boundary: str,
) -> AsyncIterator[bytes]:
    """The body of a multipart/related response with each file as a part
    (``parts``: Content-Type and file), read off the event loop."""
    for content_type, path in parts:
        yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n").encode(
            "latin-1"
        )
        async for chunk in stream_file(path):
            yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")


async def stream_file(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes, read off the event loop."""
    handle = await run_in_threadpool(open, path, "rb")
    try:
        while chunk := await run_in_threadpool(handle.read, _CHUNK):
            yield chunk
    finally:
        handle.close()
