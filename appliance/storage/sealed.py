"""Sealed files: one compressed, encrypted blob, such as a catalog snapshot
or a journal segment on the mirror.

A pack holds instances; a sealed file holds anything else the mirror must
keep for a rebuild. The blob is compressed with zstd, cut into chunks of
1 MiB, and each chunk encrypted with AES-256-GCM under a data key of its
own, wrapped by a master key::

    b"PACS-SEALED\\n"                        magic, 12 bytes
    header length (4, big endian) | header  JSON: format, version, name,
                                            key_id, wrapped_key (hex)
    chunk 0: length (4) | nonce (12) | ciphertext | tag (16)
    chunk 1: ...
    last chunk (may be empty)

    associated data of chunk i = b"pacs-appliance-sealed/1" 0x00 name 0x00
                                 i (8 bytes, big endian) | last (1 byte)

so that a chunk moved, dropped, repeated or grafted from another file, a
file cut short, or a file renamed on the mirror, fails to open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import StorageError
from appliance.storage.keys import KeyStore

logger = logging.getLogger(__name__)

MAGIC = b"PACS-SEALED\n"
FORMAT = "pacs-appliance sealed file"
VERSION = 1
CHUNK = 1 << 20
_NONCE = 12
_TAG = 16
_AAD = b"pacs-appliance-sealed/1\x00"
_MAX_HEADER = 64 * 1024


class SealedFileError(StorageError):
    """A sealed file does not open: damaged, cut short, renamed, or its
    master key is missing."""


def seal(source: BinaryIO, destination: BinaryIO, name: str, keys: KeyStore) -> str:
    """Compress and encrypt ``source`` into ``destination``; the SHA-256 of
    what was written."""
    key = keys.new_data_key()
    header = json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "key_id": key.master_key_id,
            "wrapped_key": key.wrapped.hex(),
        },
        sort_keys=True,
    ).encode()
    digest = hashlib.sha256()

    def write(data: bytes) -> None:
        digest.update(data)
        destination.write(data)

    write(MAGIC + struct.pack(">I", len(header)) + header)
    cipher = AESGCM(key.secret)
    for index, (chunk, last) in enumerate(_with_last(_compressed(source))):
        nonce = secrets.token_bytes(_NONCE)
        sealed = cipher.encrypt(nonce, chunk, _associated(name, index, last))
        write(struct.pack(">I", len(sealed)) + nonce + sealed)
    return digest.hexdigest()


def seal_file(source: Path, destination: Path, name: str, keys: KeyStore) -> str:
    """:func:`seal` from one file into another; the SHA-256 written."""
    try:
        with open(source, "rb") as clear, open(destination, "wb") as out:
            return seal(clear, out, name, keys)
    except OSError as exc:
        raise StorageError(f"cannot seal {source}: {exc}") from exc


def open_sealed(source: BinaryIO, name: str, keys: KeyStore, out: BinaryIO) -> int:
    """Decrypt and decompress a sealed file into ``out``; the bytes written.

    ``name`` is the name it was sealed under. Bytes reach ``out`` before the
    last chunk is checked: discard them on SealedFileError.
    """
    header = _read_header(source, name)
    try:
        data_key = keys.unwrap(header["key_id"], bytes.fromhex(header["wrapped_key"]))
    except (KeyError, ValueError) as exc:
        raise SealedFileError(f"sealed file {name}: bad header: {exc}") from exc
    cipher = AESGCM(data_key.secret)
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    written = 0
    index = 0
    while True:
        nonce, sealed = _read_chunk(source, name, index)
        chunk, last = _open_chunk(cipher, nonce, sealed, name, index)
        try:
            plain = decompressor.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise SealedFileError(f"sealed file {name}: {exc}") from exc
        out.write(plain)
        written += len(plain)
        index += 1
        if last:
            break
    if source.read(1):
        raise SealedFileError(f"sealed file {name}: bytes after its last chunk")
    return written


def _compressed(source: BinaryIO) -> Iterator[bytes]:
    """``source`` as a zstd frame, in chunks of at most CHUNK bytes."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()
    pending = b""
    while block := source.read(CHUNK):
        pending += compressor.compress(block)
        while len(pending) >= CHUNK:
            yield pending[:CHUNK]
            pending = pending[CHUNK:]
    pending += compressor.flush()
    while len(pending) > CHUNK:
        yield pending[:CHUNK]
        pending = pending[CHUNK:]
    yield pending


def _with_last(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    previous = next(chunks)
    for chunk in chunks:
        yield previous, False
        previous = chunk
    yield previous, True


def _associated(name: str, index: int, last: bool) -> bytes:
    return _AAD + name.encode() + b"\x00" + struct.pack(">QB", index, last)


def _read_header(source: BinaryIO, name: str) -> dict[str, str]:
    if source.read(len(MAGIC)) != MAGIC:
        raise SealedFileError(f"{name} is not a sealed file")
    length = _read_exactly(source, 4, name)
    size = struct.unpack(">I", length)[0]
    if size > _MAX_HEADER:
        raise SealedFileError(f"sealed file {name}: header of {size} bytes")
    try:
        header = json.loads(_read_exactly(source, size, name))
    except ValueError as exc:
        raise SealedFileError(f"sealed file {name}: damaged header") from exc
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise SealedFileError(f"sealed file {name}: unknown format or version")
    if header.get("name") != name:
        raise SealedFileError(
            f"sealed file {name} was sealed as {header.get('name')!r}: renamed?"
        )
    return dict(header)


def _read_chunk(source: BinaryIO, name: str, index: int) -> tuple[bytes, bytes]:
    size = struct.unpack(">I", _read_exactly(source, 4, name))[0]
    if not _TAG <= size <= CHUNK + _TAG:
        raise SealedFileError(f"sealed file {name}: chunk {index} has a bad length")
    nonce = _read_exactly(source, _NONCE, name)
    return nonce, _read_exactly(source, size, name)


def _open_chunk(
    cipher: AESGCM, nonce: bytes, sealed: bytes, name: str, index: int
) -> tuple[bytes, bool]:
    """The chunk's plaintext and whether it is the last one."""
    for last in (False, True):
        try:
            return cipher.decrypt(nonce, sealed, _associated(name, index, last)), last
        except InvalidTag:
            continue
    raise SealedFileError(
        f"sealed file {name}: chunk {index} fails its check (damaged, moved or "
        "from another file)"
    )


def _read_exactly(source: BinaryIO, count: int, name: str) -> bytes:
    data = source.read(count)
    if len(data) != count:
        raise SealedFileError(f"sealed file {name} is cut short")
    return data
