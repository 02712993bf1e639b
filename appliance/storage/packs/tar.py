"""The tar layer of a pack: POSIX ustar headers, fixed-size records, blocks.

Packs hold regular files with short ASCII names only, so this module writes
one fixed form of the POSIX ustar header and, on reading, checks every byte
of a header against that form: a flipped byte in a header is found even
where tar's own checksum would not notice (the checksum field's last byte).

A ustar header block (512 bytes) as packs write it::

    offset  size  field     written as
         0   100  name      member name, ASCII, NUL padded
       100     8  mode      "0000644" NUL
       108     8  uid       "0000000" NUL
       116     8  gid       "0000000" NUL
       124    12  size      11 octal digits NUL; 0 when a pax record holds it
       136    12  mtime     11 octal digits NUL (the pack's creation time)
       148     8  chksum    6 octal digits NUL space
       156     1  typeflag  "0" regular file, "x" pax extended header
       157   100  linkname  NULs
       257     6  magic     "ustar" NUL
       263     2  version   "00"
       265    32  uname     NULs
       297    32  gname     NULs
       329     8  devmajor  "0000000" NUL
       337     8  devminor  "0000000" NUL
       345   155  prefix    NULs
       500    12  (unused)  NULs

``chksum`` is the sum of the 512 bytes as unsigned numbers, counting the
checksum field itself as eight spaces. A member's data follows its header
and is padded with NULs to a multiple of 512 bytes. A member of 8 GiB or
more is preceded by a pax extended header (typeflag "x", named
``PaxHeaders/<name>``) whose data is the single record
``"<length> size=<decimal size>\\n"``. The archive ends with two blocks of
NULs and is padded with NULs to a whole number of records.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from appliance.storage import durable

logger = logging.getLogger(__name__)

BLOCK = 512
DEFAULT_RECORD_SIZE = 20 * BLOCK  # what tar itself writes: 10,240 bytes
TAPE_RECORD_SIZE = 512 * BLOCK  # 256 KiB records for tape drives
MAX_RECORD_SIZE = 32768 * BLOCK  # 16 MiB
MAX_NAME = 100
# Sizes from here on do not fit the 11 octal digits of the ustar size field.
PAX_SIZE_THRESHOLD = 8**11

REGULAR = b"0"
PAX = b"x"
_ZEROS = bytes(BLOCK)
_MAGIC = b"ustar\x0000"
_CHKSUM = slice(148, 156)


class TarFormatError(ValueError):
    """A tar block is not what packs write; ``offset`` is where it starts."""

    def __init__(self, offset: int, reason: str) -> None:
        self.offset = offset
        self.reason = reason
        super().__init__(f"at byte {offset}: {reason}")


@dataclass(frozen=True)
class Member:
    """A member's name and size, and where its headers and data start."""

    name: str
    size: int
    mtime: int
    header_offset: int
    data_offset: int

    @property
    def end(self) -> int:
        """The offset just after the member's padded data."""
        return self.data_offset + self.size + padding(self.size)


def padding(size: int) -> int:
    """NULs that follow ``size`` bytes of data to end a 512-byte block."""
    return -size % BLOCK


def member_headers(name: str, size: int, mtime: int) -> bytes:
    """The header block(s) of a regular file member: 512 or 1536 bytes."""
    if size < PAX_SIZE_THRESHOLD:
        return _ustar_block(name, size, mtime, REGULAR)
    record = _pax_size_record(size)
    pax_name = f"PaxHeaders/{name}"[:MAX_NAME]
    pax_header = _ustar_block(pax_name, len(record), mtime, PAX)
    padded = record + bytes(padding(len(record)))
    return pax_header + padded + _ustar_block(name, 0, mtime, REGULAR)


def _ustar_block(name: str, size: int, mtime: int, typeflag: bytes) -> bytes:
    encoded = name.encode("ascii")
    if not encoded or len(encoded) > MAX_NAME:
        raise ValueError(f"member name must be 1 to {MAX_NAME} ASCII bytes: {name!r}")
    block = bytearray(BLOCK)
    block[0 : len(encoded)] = encoded
    block[100:108] = b"0000644\x00"
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % mtime
    block[156:157] = typeflag
    block[257:265] = _MAGIC
    block[329:337] = b"0000000\x00"
    block[337:345] = b"0000000\x00"
    block[_CHKSUM] = b" " * 8
    block[_CHKSUM] = b"%06o\x00 " % sum(block)
    return bytes(block)


def _pax_size_record(size: int) -> bytes:
    """``"<length> size=<size>\\n"`` where length counts the whole record."""
    body = f" size={size}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return f"{length}{body}".encode("ascii")


def parse_block(block: bytes, offset: int) -> tuple[str, int, int, bytes]:
    """(name, size, mtime, typeflag) of a header block packs wrote.

    The block is rebuilt from those values and must match byte for byte.
    """
    typeflag = block[156:157]
    try:
        name = block[0:MAX_NAME].split(b"\x00", 1)[0].decode("ascii")
        size = int(block[124:135], 8)
        mtime = int(block[136:147], 8)
        expected = _ustar_block(name, size, mtime, typeflag)
    except ValueError:
        raise TarFormatError(offset, "not a tar header written by a pack") from None
    if block != expected:
        raise TarFormatError(offset, "tar header altered or damaged")
    return name, size, mtime, typeflag


def parse_pax_size(data: bytes, offset: int) -> int:
    """The size in a pax extended header's data (one ``size`` record)."""
    try:
        text = data.rstrip(b"\x00").decode("ascii")
        size = int(text.split("size=", 1)[1])
    except (ValueError, IndexError):
        raise TarFormatError(offset, "pax header is not a size record") from None
    record = _pax_size_record(size)
    if data != record + bytes(padding(len(record))):
        raise TarFormatError(offset, "pax header altered or damaged")
    return size


class RecordWriter:
    """Writes a tar stream in whole records, counting and hashing every byte.

    Each ``write`` call on the output is exactly one record, as a tape drive
    needs, unless the output is a regular file: a file gets several records
    per call, which saves system calls and changes nothing on disk. The
    output need not be seekable.
    """

    def __init__(self, out: BinaryIO, record_size: int = DEFAULT_RECORD_SIZE):
        if record_size % BLOCK or not BLOCK <= record_size <= MAX_RECORD_SIZE:
            raise ValueError(
                f"record_size must be a multiple of {BLOCK} up to "
                f"{MAX_RECORD_SIZE}: {record_size}"
            )
        self.record_size = record_size
        self.offset = 0
        self._out = out
        self._pending = bytearray()
        self._digest = hashlib.sha256()
        self._write_size = 0 if _is_regular_file(out) else record_size

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the stream."""
        self._digest.update(data)
        self.offset += len(data)
        if self._write_size or len(self._pending) + len(data) < self.record_size:
            self._pending += data
        else:
            # A file takes whole records straight from ``data``; only the
            # rest waits (one copy fewer of every member's bytes).
            view = memoryview(data)
            fill = -len(self._pending) % self.record_size
            self._pending += view[:fill]
            self._emit(len(self._pending))
            rest = view[fill:]
            whole = len(rest) - len(rest) % self.record_size
            self._write_through(rest[:whole])
            self._pending += rest[whole:]
        if len(self._pending) >= self.record_size:
            self._emit(len(self._pending) - len(self._pending) % self.record_size)

    def pad_block(self) -> None:
        """NULs up to the next 512-byte boundary."""
        self.write(bytes(padding(self.offset)))

    def finish(self) -> str:
        """End the archive (two NUL blocks, NULs to a whole record); its SHA-256."""
        self.write(bytes(2 * BLOCK))
        self.write(bytes(-self.offset % self.record_size))
        self._emit(len(self._pending))
        try:
            self._out.flush()
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot write the pack") from exc
        return self._digest.hexdigest()

    def _write_through(self, view: memoryview) -> None:
        try:
            if view:
                self._out.write(view)
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot write the pack") from exc

    def _emit(self, length: int) -> None:
        view = memoryview(self._pending)
        step = self._write_size or max(length, 1)  # 0: all in one call
        try:
            for start in range(0, length, step):
                self._out.write(view[start : start + step])
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot write the pack") from exc
        finally:
            view.release()
        del self._pending[:length]


class BlockReader:
    """Reads a tar stream from a file or a pipe, counting the offset.

    For a seekable source, offsets count from where the source stood when
    the reader was made, and the pack is taken to run to the source's end.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.seekable = _is_seekable(raw)
        self._base = raw.tell() if self.seekable else 0
        self.offset = 0

    def read_exact(self, size: int) -> bytes:
        """``size`` bytes; TarFormatError if the stream ends first."""
        data = self.read_some(size)
        if len(data) < size:
            raise TarFormatError(self.offset, "the pack ends early (cut short)")
        return data

    def read_some(self, size: int) -> bytes:
        """Up to ``size`` bytes, fewer only at the end of the stream."""
        chunks = []
        wanted = size
        try:
            while wanted > 0:
                chunk = self._raw.read(wanted)
                if not chunk:
                    break
                chunks.append(chunk)
                wanted -= len(chunk)
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot read the pack") from exc
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.offset += len(data)
        return data

    def skip(self, size: int) -> None:
        """Move ``size`` bytes forward (a seek when the source allows it)."""
        if self.seekable:
            self.seek(self.offset + size)
            return
        while size > 0:
            size -= len(self.read_exact(min(size, 1 << 20)))

    def seek(self, offset: int) -> None:
        """Go to ``offset`` (seekable sources only)."""
        try:
            self._raw.seek(self._base + offset)
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot read the pack") from exc
        self.offset = offset

    def length(self) -> int:
        """Bytes from the pack's start to the source's end (seekable only)."""
        try:
            end = self._raw.seek(0, 2)
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot read the pack") from exc
        self._raw.seek(self._base + self.offset)
        return end - self._base

    def read_member(self) -> Member | None:
        """The next member's headers; None at the end-of-archive blocks."""
        header_offset = self.offset
        block = self.read_exact(BLOCK)
        if block == _ZEROS:
            return None
        name, size, mtime, typeflag = parse_block(block, header_offset)
        if typeflag == PAX:
            pax_name = name
            pax_offset = self.offset
            size = parse_pax_size(self.read_exact(size + padding(size)), pax_offset)
            block_offset = self.offset
            block = self.read_exact(BLOCK)
            name, zero, mtime, typeflag = parse_block(block, block_offset)
            if pax_name != f"PaxHeaders/{name}"[:MAX_NAME]:
                raise TarFormatError(header_offset, "pax header names another member")
            if zero != 0 or size < PAX_SIZE_THRESHOLD:
                raise TarFormatError(block_offset, "pax header used for a small size")
        if typeflag != REGULAR:
            raise TarFormatError(header_offset, f"member type {typeflag!r} in a pack")
        return Member(name, size, mtime, header_offset, self.offset)

    def read_padding(self, member: Member) -> bool:
        """Read the NULs after ``member``'s data; False if any byte is not NUL."""
        return self.read_exact(padding(member.size)) == bytes(padding(member.size))


def _is_regular_file(out: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


def _is_seekable(raw: BinaryIO) -> bool:
    try:
        return bool(raw.seekable())
    except (AttributeError, ValueError):
        return False
