"""File objects over other things, for readers that want a file."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

_BUFFER = 1024 * 1024


class IteratorReader(io.RawIOBase):
    """A read-only, sequential file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        # A generator left half-read holds its source (a tape drive, a
        # network channel) until it is closed.
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


def reader_over(chunks: Iterator[bytes]) -> BinaryIO:
    """A buffered binary file reading ``chunks`` in order; close it after use."""
    return cast(BinaryIO, io.BufferedReader(IteratorReader(chunks), _BUFFER))
