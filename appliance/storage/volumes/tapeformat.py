"""How packs are laid out on a tape: files of fixed-size records.

One volume::

    file 0   [label record] FM
    file 1   [header] [data] [data] ... [data, zero padded] [trailer] FM
    file 2   [header] [data] ... [trailer] FM
    ...      (end of data)

Every record is RECORD_SIZE bytes (256 KiB by default); the label, header
and trailer records are a magic line, one line of JSON and zero padding::

    label    b"PACS-VOLUME 1\\n"  {"label", "capacity", "record_size", "archive"}
    header   b"PACS-PACK 1\\n"    {"pack_id", "volume"}
    trailer  b"PACS-END 1\\n"     {"pack_id", "size", "sha256"}

``archive`` (the id of the archive that labelled the tape) is absent
from labels written before labels named an archive.

A tape file counts as a pack only when its last record is a trailer that
matches its data: a pack cut off by the end of the tape, or by a crash,
leaves a file without one, which readers skip. The pack's own bytes (a tar
stream) sit unchanged in the data records, so ``dd`` and ``tar`` can get
them back without this code.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from appliance.errors import VolumeError

DEFAULT_RECORD_SIZE = 256 * 1024
LABEL_MAGIC = b"PACS-VOLUME 1\n"
HEADER_MAGIC = b"PACS-PACK 1\n"
TRAILER_MAGIC = b"PACS-END 1\n"


def make_record(magic: bytes, fields: dict[str, Any], record_size: int) -> bytes:
    """A label, header or trailer record: magic, JSON, zero padding."""
    body = magic + json.dumps(fields, sort_keys=True).encode() + b"\n"
    if len(body) > record_size:
        raise ValueError(f"record size {record_size} is too small for {magic!r}")
    return body.ljust(record_size, b"\0")


def read_record(record: bytes, magic: bytes) -> dict[str, Any] | None:
    """The fields of a record made by :func:`make_record`, or None."""
    if not record.startswith(magic):
        return None
    text = record[len(magic) :].split(b"\n", 1)[0]
    try:
        fields = json.loads(text)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


class PackDigest:
    """Size and SHA-256 of the data that went through :func:`to_records`."""

    def __init__(self) -> None:
        self.size = 0
        self._sha256 = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._sha256.update(chunk)

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


def to_records(
    chunks: Iterable[bytes], record_size: int, digest: PackDigest
) -> Iterator[bytes]:
    """Cut a byte stream into records of ``record_size``, padding the last."""
    buffer = bytearray()
    for chunk in chunks:
        digest.update(chunk)
        buffer += chunk
        while len(buffer) >= record_size:
            yield bytes(buffer[:record_size])
            del buffer[:record_size]
    if buffer:
        yield bytes(buffer.ljust(record_size, b"\0"))


def from_records(
    records: Iterable[bytes], where: str, trailer_out: dict[str, Any] | None = None
) -> Iterator[bytes]:
    """The pack data held in a tape file's records after its header.

    Records are passed on two behind, since only the trailer (the last
    record) tells how much of the record before it is padding. Raises
    VolumeError, naming ``where``, if the file ends without a trailer; the
    trailer's fields go into ``trailer_out`` when given.
    """
    pending: deque[bytes] = deque()
    passed = 0
    for record in records:
        pending.append(record)
        if len(pending) > 2:
            data = pending.popleft()
            passed += len(data)
            yield data

    trailer = read_record(pending[-1], TRAILER_MAGIC) if pending else None
    if trailer is None:
        raise VolumeError(f"{where} holds an incomplete pack (no trailer)")
    remaining = int(trailer["size"]) - passed
    last = pending[0] if len(pending) == 2 else b""
    if not 0 <= remaining <= len(last) or (remaining == 0 and last):
        raise VolumeError(f"{where}: the trailer's size does not match the data")
    if trailer_out is not None:
        trailer_out.update(trailer)
    if remaining:
        yield last[:remaining]
