"""One member's bytes: zstd compression, then AES-256-GCM when encrypted.

A member holds one zstd frame (content size and checksum recorded in the
frame header). In an encrypted pack the frame is encrypted under the pack's
data key, with a fresh random nonce per member::

    +----------------+---------------------------------+-------------+
    | nonce 12 bytes | AES-256-GCM ciphertext of frame | tag 16 bytes|
    +----------------+---------------------------------+-------------+

    associated data = b"pacs-appliance-pack/1" 0x00 pack id 0x00 member name

so that a member moved to another name, or into another pack, fails its tag.

Both directions stream: an instance of any size passes through in
chunks. When decrypting a stream the plaintext is released before the
tag is checked at the member's end, so callers keep what they extract
provisional until :func:`open_member` returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    Cipher,
    algorithms,
    modes,
)

from appliance.errors import PackError, SourceMismatchError

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
CHUNK = 1 << 20
# Instances up to this size are compressed in one call: a compression
# object copies its input into a window of its own first, which costs a
# tenth of the compression itself. Larger ones stream, chunk by chunk.
WHOLE_MAX = 16 << 20
# A compressed member up to this size stays in memory before it is written.
SPOOL_IN_MEMORY = 64 << 20
_AAD_PREFIX = b"pacs-appliance-pack/1\x00"
_FRAME_HEADER_MAX = 18


class MemberError(ValueError):
    """A member's bytes fail a check; str() says which."""


def associated_data(pack_id: str, member: str) -> bytes:
    """What a member's GCM tag binds besides its bytes: the pack and its name."""
    return _AAD_PREFIX + pack_id.encode("ascii") + b"\x00" + member.encode("ascii")


@dataclass
class Sealed:
    """A member's bytes ready to be written: a zstd frame, encrypted if keyed."""

    data: IO[bytes]
    member_size: int
    compressed_size: int

    def write_to(self, write: Callable[[bytes | memoryview], object]) -> None:
        """Hand the member's bytes to ``write`` in chunks."""
        if isinstance(self.data, io.BytesIO):
            # Held in memory: handed over as they are, without a copy.
            with self.data.getbuffer() as view:
                for start in range(0, len(view), CHUNK):
                    write(view[start : start + CHUNK])
            return
        self.data.seek(0)
        while chunk := self.data.read(CHUNK):
            write(chunk)

    def close(self) -> None:
        # A failed write may still hold a view of the bytes (in its
        # traceback): the buffer is then freed with the last view.
        with contextlib.suppress(BufferError):
            self.data.close()


def seal_source(
    source: BinaryIO,
    size: int,
    sha256: str,
    compressor: zstandard.ZstdCompressor,
    key: bytes | None,
    aad: bytes,
    spool_dir: Path | None = None,
) -> Sealed:
    """Compress (and encrypt) ``source`` into a spool, checking what it reads.

    Raises SourceMismatchError when the source is not ``size`` bytes long or
    its SHA-256 differs from ``sha256``.
    """
    reader = _HashingReader(source, size)
    # Handed to the caller inside Sealed, which closes it. zstd never makes
    # a frame much larger than its input, so a small instance stays in
    # memory, where its bytes are written out without another copy.
    spool: IO[bytes]
    if size + size // 64 + OVERHEAD + 1024 <= SPOOL_IN_MEMORY:
        spool = io.BytesIO()
    else:
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPOOL_IN_MEMORY, dir=str(spool_dir) if spool_dir else None
        )
    sink = _SealingSink(spool, key, aad)
    try:
        written = _compress(compressor, reader, size, sink)
        reader.check_end(sha256)
        sink.finish()
    except zstandard.ZstdError as exc:
        spool.close()
        reader.check_length()
        raise PackError(f"zstd cannot compress the instance: {exc}") from exc
    except BaseException:
        spool.close()
        raise
    return Sealed(spool, sink.written, written)


def _compress(
    compressor: zstandard.ZstdCompressor,
    reader: _HashingReader,
    size: int,
    sink: _SealingSink,
) -> int:
    """One zstd frame of ``size`` bytes read from ``reader`` into ``sink``;
    the frame's size. Whole, or chunk by chunk through a compression
    object; both let other threads run while they compress, where
    ``copy_stream`` holds the GIL (packs are written by several threads
    at once)."""
    if size <= WHOLE_MAX:
        data = reader.read(size)
        if len(data) == size:
            return sink.write_frame(compressor.compress(data))
        # A short read (a pipe, or a source that shrank): streamed on, so
        # that the frame holds what was read and the check says what is
        # missing.
        stream = compressor.compressobj(size=size)
        written = sink.write_frame(stream.compress(data))
    else:
        stream = compressor.compressobj(size=size)
        written = 0
    while chunk := reader.read(CHUNK):
        written += sink.write_frame(stream.compress(chunk))
    return written + sink.write_frame(stream.flush())


def seal_bytes(
    data: bytes, compressor: zstandard.ZstdCompressor, key: bytes | None, aad: bytes
) -> bytes:
    """``data`` as a member held in memory (the manifest)."""
    sealed = io.BytesIO()
    sink = _SealingSink(sealed, key, aad)
    sink.write(compressor.compress(data))
    sink.finish()
    return sealed.getvalue()


class _SealingSink:
    """Takes a zstd frame in pieces; writes it out, encrypted when keyed.

    Encrypting here, in the thread that compressed, leaves the thread that
    writes the pack only copying.
    """

    def __init__(self, out: IO[bytes], key: bytes | None, aad: bytes) -> None:
        self._out = out
        self._encryptor = None
        self.written = 0
        if key is not None:
            nonce = secrets.token_bytes(NONCE_BYTES)
            self._encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
            self._encryptor.authenticate_additional_data(aad)
            self._emit(nonce)

    def write(self, data: bytes) -> int:
        self._emit(self._encryptor.update(data) if self._encryptor else data)
        return len(data)

    def write_frame(self, data: bytes) -> int:
        """Write a piece of the frame (nothing when empty); its length."""
        return self.write(data) if data else 0

    def finish(self) -> None:
        """End the member: the GCM tag, when encrypted."""
        if self._encryptor is not None:
            self._emit(self._encryptor.finalize())
            self._emit(self._encryptor.tag)

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.written += len(data)


@dataclass(frozen=True)
class Opened:
    """What a member decoded to: its size and SHA-256, and the frame's size."""

    size: int
    sha256: str
    compressed_size: int


def open_member(
    read: Callable[[int], bytes],
    member_size: int,
    key: bytes | None,
    aad: bytes,
    sink: BinaryIO | None = None,
    limit: int | None = None,
) -> Opened:
    """Decrypt and decompress a member read through ``read``, into ``sink``.

    Reads exactly ``member_size`` bytes whatever happens, so that a reader
    of a stream stays at the member's end. Raises MemberError naming the
    first check that failed: the GCM tag first (an altered ciphertext also
    breaks the frame, but the tag is the real reason), then zstd, then the
    frame's recorded size; ``limit`` bounds the decoded size.
    """
    decryptor = None
    frame_size = member_size
    if key is not None:
        if member_size < OVERHEAD:
            read(member_size)
            raise MemberError(f"too short to be encrypted ({member_size} bytes)")
        nonce = read(NONCE_BYTES)
        decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
        decryptor.authenticate_additional_data(aad)
        frame_size = member_size - OVERHEAD

    frame = _FrameReader(read, frame_size, decryptor)
    size, sha256, problem = _decompress(frame, sink, limit)
    frame.drain()

    if decryptor is not None:
        try:
            decryptor.finalize_with_tag(read(TAG_BYTES))
        except InvalidTag:
            raise MemberError(
                "GCM tag does not match: the member was altered, damaged, "
                "moved, or belongs to another pack"
            ) from None
    if problem:
        raise MemberError(problem)
    recorded = frame.recorded_size()
    if recorded != size:
        raise MemberError(f"zstd frame incomplete: {size} bytes of {recorded} recorded")
    return Opened(size, sha256, frame_size)


def _decompress(
    frame: _FrameReader, sink: BinaryIO | None, limit: int | None
) -> tuple[int, str, str | None]:
    """Decode the frame into ``sink``: (size, SHA-256, zstd problem or None)."""
    digest = hashlib.sha256()
    size = 0
    chunks = zstandard.ZstdDecompressor().read_to_iter(
        cast(IO[bytes], frame), read_size=CHUNK, write_size=CHUNK
    )
    try:
        for chunk in chunks:
            size += len(chunk)
            if limit is not None and size > limit:
                return size, "", f"decodes to more than {limit} bytes"
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
    except zstandard.ZstdError as exc:
        return size, "", f"zstd cannot decode it: {exc}"
    return size, digest.hexdigest(), None


class _FrameReader:
    """The frame bytes of one member, decrypted on the way when encrypted."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        size: int,
        decryptor: AEADDecryptionContext | None,
    ) -> None:
        self._read = read
        self._remaining = size
        self._decryptor = decryptor
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        wanted = self._remaining if size < 0 else min(size, self._remaining)
        if wanted <= 0:
            return b""
        data = self._read(wanted)
        self._remaining -= len(data)
        if self._decryptor is not None:
            data = self._decryptor.update(data)
        if len(self.head) < _FRAME_HEADER_MAX:
            self.head += data[: _FRAME_HEADER_MAX - len(self.head)]
        return data

    def drain(self) -> None:
        """Read (and decrypt, so the tag covers it) whatever zstd left."""
        while self.read(CHUNK):
            pass

    def recorded_size(self) -> int:
        """The content size the frame header records; -1 if it does not."""
        try:
            recorded = zstandard.get_frame_parameters(self.head).content_size
        except zstandard.ZstdError:
            return -1
        return -1 if recorded == zstandard.CONTENTSIZE_UNKNOWN else int(recorded)


class _HashingReader:
    """Reads at most ``size`` bytes of a source, hashing them."""

    def __init__(self, source: BinaryIO, size: int) -> None:
        self._source = source
        self._remaining = size
        self.size = size
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        wanted = self._remaining if size < 0 else min(size, self._remaining)
        data = self._source.read(wanted) if wanted > 0 else b""
        self._remaining -= len(data)
        self.digest.update(data)
        return data

    def check_length(self) -> None:
        """SourceMismatchError if the source ended before ``size`` bytes."""
        if self._remaining > 0:
            read = self.size - self._remaining
            raise SourceMismatchError(
                f"the source ended after {read} bytes, {self.size} expected"
            )

    def check_end(self, sha256: str) -> None:
        """SourceMismatchError unless exactly ``size`` bytes had ``sha256``."""
        self.check_length()
        if self._source.read(1):
            raise SourceMismatchError(f"the source is longer than {self.size} bytes")
        actual = self.digest.hexdigest()
        if actual != sha256:
            raise SourceMismatchError(
                f"the source's SHA-256 is {actual}, {sha256} expected: the copy "
                "read is damaged or was replaced"
            )
