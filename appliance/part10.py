"""Structural check of DICOM Part 10 files, without decoding any value.

The archive stores instances byte for byte, so it must refuse a file whose
encoding is broken (typically a file cut short in transit) even when a
forgiving reader such as pydicom opens it without complaint.  This module
walks the encoding only:

* the File Meta Information (PS3.10 7.1): 128-byte preamble, ``DICM`` and
  group 0002 in explicit VR little endian;
* every data element of the data set (PS3.5 7.1): tag, VR, value length;
* sequences and items, with defined or undefined length (PS3.5 7.5);
* encapsulated Pixel Data: fragments in items closed by a sequence delimiter
  (PS3.5 A.4);
* deflated data sets, inflated in a stream (PS3.5 A.5).

Values with a defined length are skipped with a seek, so Pixel Data is never
read into memory.  The walk is bounded by a nesting depth and an element
count so that hostile input can neither recurse too deep nor run for long.
"""

import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn, Protocol

logger = logging.getLogger(__name__)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
JPIP_HTJ2K_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.205"

MAX_DEPTH = 64
MAX_ELEMENTS = 10_000_000

_PREAMBLE_AND_PREFIX = 132
_TRANSFER_SYNTAX_TAG = 0x00020010
_MAX_UID_LENGTH = 64
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_CHUNK = 64 * 1024

# PS3.5 7.1.2: these VRs have 2 reserved bytes and a 4-byte value length.
_LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# PS3.5 6.2: every VR, for telling explicit from implicit VR data sets.
_SHORT_LENGTH_VRS = b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US"
_KNOWN_VRS = _LONG_LENGTH_VRS | frozenset(_SHORT_LENGTH_VRS.split())
# PS3.5 A.5, A.7 and A.12: the data set after the file meta is deflated.
_DEFLATED = frozenset(
    {
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        JPIP_REFERENCED_DEFLATE,
        JPIP_HTJ2K_REFERENCED_DEFLATE,
    }
)
_UPPERCASE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ITEM_TAGS = frozenset({_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER})


class StructureError(ValueError):
    """A Part 10 file whose structure is broken; str() says where and why.

    ``offset`` is where the faulty element (or header) starts: a byte offset
    in the file, or in the inflated data set when ``inflated`` is true.
    ``tag`` is the tag concerned as ``0xGGGGEEEE``, or None.
    """

    def __init__(
        self,
        why: str,
        offset: int | None = None,
        tag: int | None = None,
        inflated: bool = False,
    ) -> None:
        self.why = why
        self.offset = offset
        self.tag = tag
        self.inflated = inflated
        super().__init__(self._describe())

    def _describe(self) -> str:
        """Say where (offset, tag) and then why."""
        where = []
        if self.offset is not None:
            stream = "inflated data set" if self.inflated else "file"
            where.append(f"offset {self.offset} (0x{self.offset:X}) of the {stream}")
        if self.tag is not None:
            where.append(f"tag {format_tag(self.tag)}")
        if not where:
            return self.why
        return f"{', '.join(where)}: {self.why}"


def format_tag(tag: int) -> str:
    """Return ``tag`` (``0xGGGGEEEE``) as ``(GGGG,EEEE)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --------------------------------------------------------------------------
# File Meta Information (PS3.10 7.1)


def read_file_meta(path: Path) -> tuple[int, str]:
    """Return (offset where the data set starts, Transfer Syntax UID).

    The file must be a Part 10 file (PS3.10 7.1): a 128-byte preamble,
    ``b"DICM"``, then the group 0002 elements in explicit VR little endian.
    The meta group ends at the first element of another group, as readers
    do, rather than trusting the group length (0002,0000).

    Raise StructureError when the prefix is missing, the meta is cut short,
    badly encoded or followed by another, or it has no Transfer Syntax UID
    (0002,0010).  OSError
    from opening or reading the file is not translated.
    """
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        _check_prefix(file)

        offset, syntax = _walk_meta(file, size)

    if not syntax:
        raise StructureError(
            "the file meta has no Transfer Syntax UID",
            _PREAMBLE_AND_PREFIX,
            _TRANSFER_SYNTAX_TAG,
        )
    return offset, syntax


def _check_prefix(file: BinaryIO) -> None:
    """Raise StructureError unless ``DICM`` follows a 128-byte preamble."""
    head = file.read(_PREAMBLE_AND_PREFIX)
    if len(head) < _PREAMBLE_AND_PREFIX or head[128:] != b"DICM":
        raise StructureError("not a Part 10 file: no DICM prefix after the preamble")


def _walk_meta(file: BinaryIO, size: int) -> tuple[int, str | None]:
    """Walk the group 0002 elements; return (end offset, transfer syntax).

    Their tags must ascend (PS3.5 7.1): a tag again or back means a second
    file meta, e.g. a sender's that came with its data set, which readers
    would merge into the first.
    """
    offset = _PREAMBLE_AND_PREFIX
    syntax = None
    previous = -1
    while offset < size:
        head = file.read(8)
        if len(head) >= 2 and struct.unpack_from("<H", head)[0] != 0x0002:
            break

        tag, length, header = _meta_header(file, head, offset)
        if tag <= previous:
            raise StructureError(
                "a file meta element (group 0002) again after the file meta: "
                "a second file meta in the data set",
                offset,
                tag,
            )
        previous = tag
        if length > size - offset - header:
            raise StructureError(
                f"the file meta is cut short: value length {length} runs past "
                "the end of the file",
                offset,
                tag,
            )

        if tag == _TRANSFER_SYNTAX_TAG:
            syntax = _read_uid(file, length, offset)
        else:
            file.seek(length, os.SEEK_CUR)
        offset += header + length
    return offset, syntax


def _meta_header(file: BinaryIO, head: bytes, offset: int) -> tuple[int, int, int]:
    """Decode an explicit VR LE meta element header: (tag, length, size)."""
    if len(head) < 8:
        raise StructureError("the file meta is cut short in an element header", offset)
    group, element, vr, length = struct.unpack("<HH2sH", head)
    tag = group << 16 | element
    if not _is_vr(vr):
        raise StructureError(f"the file meta has an invalid VR {vr!r}", offset, tag)
    if vr not in _LONG_LENGTH_VRS:
        return tag, length, 8

    more = file.read(4)
    if len(more) < 4:
        raise StructureError("the file meta is cut short in an element header", offset)
    (length,) = struct.unpack("<I", more)
    if length == _UNDEFINED_LENGTH:
        raise StructureError("undefined length in the file meta", offset, tag)
    return tag, length, 12


def _read_uid(file: BinaryIO, length: int, offset: int) -> str:
    """Read the Transfer Syntax UID value, without its padding."""
    value = file.read(min(length, _MAX_UID_LENGTH + 1))
    uid = value.strip(b"\x00 ")
    if length > _MAX_UID_LENGTH or not uid.replace(b".", b"").isdigit():
        raise StructureError(
            f"the Transfer Syntax UID {value!r} is not a UID",
            offset,
            _TRANSFER_SYNTAX_TAG,
        )
    return uid.decode("ascii")


def _is_vr(vr: bytes) -> bool:
    """Whether ``vr`` is two uppercase letters (PS3.5 6.2)."""
    return vr[0] in _UPPERCASE and vr[1] in _UPPERCASE


# --------------------------------------------------------------------------
# Byte sources: the file itself, or the inflated data set


class _Source(Protocol):
    """Sequential bytes of a data set; ``end`` is None when not known."""

    position: int
    end: int | None
    inflated: bool

    def read(self, count: int) -> bytes: ...

    def peek(self, count: int) -> bytes: ...

    def skip(self, count: int) -> int: ...

    def at_end(self) -> bool: ...


class _FileSource:
    """The data set as stored in the file: values are skipped by seeking."""

    inflated = False

    def __init__(self, file: BinaryIO, offset: int, size: int) -> None:
        self._file = file
        self.position = offset
        self.end: int | None = size
        file.seek(offset)

    def read(self, count: int) -> bytes:
        """Return up to ``count`` bytes."""
        data = self._file.read(count)
        self.position += len(data)
        return data

    def peek(self, count: int) -> bytes:
        """Return up to ``count`` bytes without consuming them."""
        data = self._file.read(count)
        self._file.seek(-len(data), os.SEEK_CUR)
        return data

    def skip(self, count: int) -> int:
        """Skip ``count`` bytes; the walker checked they are in the file."""
        self._file.seek(count, os.SEEK_CUR)
        self.position += count
        return count

    def at_end(self) -> bool:
        """Whether the whole file has been walked."""
        return self.end is not None and self.position >= self.end


class _InflatingSource:
    """A deflated data set (PS3.5 A.5), inflated in chunks as it is walked.

    Memory stays bounded by the chunk size whatever the inflated size.  The
    raw deflate stream (RFC 1951) may be followed by one padding byte, or by
    the 8-byte trailer some writers append (CRC-32 and size, as in gzip),
    which is then checked; anything else after the stream is refused.
    """

    inflated = True

    def __init__(self, file: BinaryIO, offset: int) -> None:
        self._file = file
        self._inflater = zlib.decompressobj(-15)
        self._buffer = b""
        self._start = 0
        self._crc = 0
        self.position = 0
        self.end: int | None = None
        file.seek(offset)

    def read(self, count: int) -> bytes:
        """Return up to ``count`` inflated bytes."""
        data = self.peek(count)
        self._start += len(data)
        self.position += len(data)
        return data

    def peek(self, count: int) -> bytes:
        """Return up to ``count`` inflated bytes without consuming them."""
        while len(self._buffer) - self._start < count:
            more = self._inflate()
            if not more:
                break
            self._buffer = self._buffer[self._start :] + more
            self._start = 0
        return self._buffer[self._start : self._start + count]

    def skip(self, count: int) -> int:
        """Skip up to ``count`` inflated bytes; return how many were skipped."""
        skipped = 0
        while skipped < count:
            data = self.read(min(count - skipped, _CHUNK))
            if not data:
                break
            skipped += len(data)
        return skipped

    def at_end(self) -> bool:
        """Whether the inflated data set has been walked to its end."""
        if self._start < len(self._buffer):
            return False
        self._buffer = self._inflate()
        self._start = 0
        return not self._buffer

    def check_end(self) -> None:
        """Raise StructureError unless the deflate stream ended properly."""
        if not self._inflater.eof:
            raise StructureError(
                "the deflate stream is cut short", self.position, inflated=True
            )
        trailer = self._inflater.unused_data + self._file.read(9)
        if trailer in (b"", b"\x00"):
            return

        expected = struct.pack("<II", self._crc, self.position & 0xFFFFFFFF)
        if trailer != expected:
            raise StructureError(
                f"{len(trailer)} unexpected byte(s) after the deflate stream",
                self.position,
                inflated=True,
            )

    def _inflate(self) -> bytes:
        """Return the next inflated chunk, or b"" at the end of the stream."""
        try:
            data = self._next_chunk()
        except zlib.error as error:
            raise StructureError(
                f"corrupt deflate data: {error}", self.position, inflated=True
            ) from None
        self._crc = zlib.crc32(data, self._crc)
        return data

    def _next_chunk(self) -> bytes:
        """Feed the inflater until it yields bytes or the input runs out."""
        inflater = self._inflater
        while not inflater.eof:
            pending = inflater.unconsumed_tail or self._file.read(_CHUNK)
            if not pending:
                return b""
            data = inflater.decompress(pending, _CHUNK)
            if data:
                return data
        return b""


# --------------------------------------------------------------------------
# The walk of the data set (PS3.5 7.1 and 7.5)


@dataclass(frozen=True)
class _Encoding:
    """How element headers are encoded in (part of) a data set (PS3.5 7.1).

    ``tag_length`` decodes implicit VR headers and item headers (tag, 4-byte
    length); ``tag_vr_length`` decodes explicit VR headers with a 2-byte
    length; ``length`` decodes the 4-byte length of the other explicit VRs.
    """

    explicit: bool
    little_endian: bool
    tag_length: struct.Struct
    tag_vr_length: struct.Struct
    length: struct.Struct


def _make_encoding(explicit: bool, little_endian: bool) -> _Encoding:
    """Build an _Encoding with its struct formats."""
    order = "<" if little_endian else ">"
    return _Encoding(
        explicit,
        little_endian,
        tag_length=struct.Struct(order + "HHI"),
        tag_vr_length=struct.Struct(order + "HH2sH"),
        length=struct.Struct(order + "I"),
    )


_IMPLICIT_LE = _make_encoding(explicit=False, little_endian=True)
_EXPLICIT_LE = _make_encoding(explicit=True, little_endian=True)
_EXPLICIT_BE = _make_encoding(explicit=True, little_endian=False)


def check_structure(
    path: Path,
    offset: int,
    transfer_syntax: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_elements: int = MAX_ELEMENTS,
) -> None:
    """Walk every data element of the data set from ``offset`` to the end.

    Raise StructureError when a defined length runs past the end of the file
    or of its enclosing item or sequence, an item or sequence of undefined
    length is never closed by its delimiter, an item tag stands where a data
    element is expected, an explicit VR is not two uppercase letters, the
    deflate stream is corrupt or cut short, or the data set nests deeper
    than ``max_depth`` or has more than ``max_elements`` headers.

    Transfer syntaxes: implicit VR little endian, explicit VR big endian,
    and deflated explicit VR little endian (with the JPIP Referenced Deflate
    syntaxes, deflated the same way); any other, encapsulated ones included,
    is walked as explicit VR little endian.  In implicit VR an undefined
    length means a sequence, or encapsulated fragments for Pixel Data
    (7FE0,0010); UN of undefined length is an implicit VR little endian
    sequence (PS3.5 6.2.2).  A little endian data set whose first element
    contradicts the explicit/implicit VR of its syntax is refused.

    Not checked: values of defined length are opaque, so a sequence of
    defined length in implicit VR (no dictionary here) is skipped whole; tag
    order, odd lengths and value contents are not looked at.  OSError is not
    translated.
    """
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        _check_stream(file, offset, size, transfer_syntax, max_depth, max_elements)
    logger.debug("%s: structure checked", path)


def check_encoded(
    data: bytes,
    transfer_syntax: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_elements: int = MAX_ELEMENTS,
) -> None:
    """Like :func:`check_structure`, for a data set held in memory (e.g. a
    C-FIND identifier as it arrived on the network)."""
    stream = io.BytesIO(data)
    _check_stream(stream, 0, len(data), transfer_syntax, max_depth, max_elements)


def _check_stream(
    file: BinaryIO,
    offset: int,
    size: int,
    transfer_syntax: str,
    max_depth: int,
    max_elements: int,
) -> None:
    encoding = _encoding_of(transfer_syntax)
    if transfer_syntax in _DEFLATED:
        source: _Source = _InflatingSource(file, offset)
    else:
        source = _FileSource(file, offset, size)

    _check_vr_mode(source, encoding)
    walker = _Walker(source, max_depth, max_elements)
    walker.walk_data_set(encoding, source.end, depth=0, delimited=False)

    if isinstance(source, _InflatingSource):
        source.check_end()
    if (size - offset) % 2:
        # PS3.5 7.1.1 makes every value even, so a data set is even too;
        # a deflated one is padded (PS3.5 A.5). DIMSE peers refuse odd
        # fragments, so an odd data set could never be sent on.
        raise StructureError(
            f"the data set has an odd length ({size - offset} bytes)", offset
        )


def _encoding_of(transfer_syntax: str) -> _Encoding:
    """The encoding of the data set for a transfer syntax UID."""
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return _IMPLICIT_LE
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return _EXPLICIT_BE
    return _EXPLICIT_LE


def _check_vr_mode(source: _Source, declared: _Encoding) -> None:
    """Refuse a little endian data set whose VR mode contradicts its syntax.

    Some writers declare explicit VR and write implicit VR, or the reverse.
    pydicom guesses its way through such files, but a peer that trusts the
    transfer syntax cannot read them, so the archive does not keep them.
    The bytes after the first tag are a VR exactly when the data set is
    explicit.
    """
    head = source.peek(6)
    if not declared.little_endian or len(head) < 6:
        return

    explicit = head[4:6] in _KNOWN_VRS
    if explicit != declared.explicit:
        found, said = ("explicit", "implicit") if explicit else ("implicit", "explicit")
        raise StructureError(
            f"the data set is written in {found} VR but its transfer syntax "
            f"says {said} VR",
            offset=source.position,
            inflated=isinstance(source, _InflatingSource),
        )


class _Walker:
    """Walks the elements of a source, checking every length against limits.

    A *limit* is the offset where the enclosing item, sequence or data set
    ends, or None when that is not known (an inflated stream).
    """

    def __init__(self, source: _Source, max_depth: int, max_elements: int) -> None:
        self.source = source
        self.max_depth = max_depth
        self.max_elements = max_elements
        self.elements = 0

    def walk_data_set(
        self,
        encoding: _Encoding,
        limit: int | None,
        depth: int,
        delimited: bool,
        opened_at: int | None = None,
    ) -> None:
        """Walk elements to ``limit``, or to an item delimiter if ``delimited``.

        The top-level data set and items of defined length end at their
        limit; items of undefined length, opened at offset ``opened_at``, end
        with (FFFE,E00D) (PS3.5 7.5.1).
        """
        while True:
            if self._at_limit(limit):
                if delimited:
                    self.fail("an item of undefined length is never closed", opened_at)
                return

            start = self.source.position
            tag, vr, length = self._element_header(encoding, limit)

            if tag in _ITEM_TAGS:
                if tag == _ITEM_DELIMITER and delimited:
                    self._check_delimiter_length(length, start, tag)
                    return
                self.fail("an item tag where a data element is expected", start, tag)

            self._walk_value(encoding, tag, vr, length, limit, depth, start)

    def _walk_value(
        self,
        encoding: _Encoding,
        tag: int,
        vr: bytes | None,
        length: int,
        limit: int | None,
        depth: int,
        start: int,
    ) -> None:
        """Walk or skip the value of one element."""
        if length != _UNDEFINED_LENGTH:
            self._check_room(length, limit, start, tag)
            if vr == b"SQ":
                end = self.source.position + length
                self._walk_sequence(encoding, end, depth, False, start, tag)
            else:
                self._skip(length, start, tag)
            return

        if tag == _PIXEL_DATA:
            self._walk_fragments(encoding, limit, start)
        elif vr is None or vr == b"SQ":
            self._walk_sequence(encoding, limit, depth, True, start, tag)
        elif vr == b"UN":
            # PS3.5 6.2.2 note: UN of undefined length is an implicit VR LE SQ.
            self._walk_sequence(_IMPLICIT_LE, limit, depth, True, start, tag)
        else:
            self.fail(f"undefined length for VR {vr.decode()}", start, tag)

    def _walk_sequence(
        self,
        encoding: _Encoding,
        limit: int | None,
        depth: int,
        delimited: bool,
        start: int,
        tag: int,
    ) -> None:
        """Walk the items of a sequence (PS3.5 7.5.2)."""
        if depth >= self.max_depth:
            self.fail(f"sequences nested deeper than {self.max_depth}", start, tag)

        while True:
            if self._at_limit(limit):
                if delimited:
                    self.fail(
                        "a sequence of undefined length is never closed", start, tag
                    )
                return

            item_start = self.source.position
            item_tag, length = self._item_header(encoding, limit)

            if item_tag == _SEQUENCE_DELIMITER and delimited:
                self._check_delimiter_length(length, item_start, item_tag)
                return
            if item_tag != _ITEM:
                self.fail(
                    f"an item is expected in sequence {format_tag(tag)}",
                    item_start,
                    item_tag,
                )

            self._walk_item(encoding, length, limit, depth, item_start)

    def _walk_item(
        self,
        encoding: _Encoding,
        length: int,
        limit: int | None,
        depth: int,
        start: int,
    ) -> None:
        """Walk the data set of one item, of defined or undefined length."""
        if length == _UNDEFINED_LENGTH:
            self.walk_data_set(encoding, limit, depth + 1, True, start)
            return

        self._check_room(length, limit, start, _ITEM)
        end = self.source.position + length
        self.walk_data_set(encoding, end, depth + 1, delimited=False)

    def _walk_fragments(
        self, encoding: _Encoding, limit: int | None, start: int
    ) -> None:
        """Skip the items of encapsulated Pixel Data (PS3.5 A.4)."""
        while True:
            if self._at_limit(limit):
                self.fail("encapsulated Pixel Data is never closed", start, _PIXEL_DATA)

            item_start = self.source.position
            item_tag, length = self._item_header(encoding, limit)

            if item_tag == _SEQUENCE_DELIMITER:
                self._check_delimiter_length(length, item_start, item_tag)
                return
            if item_tag != _ITEM:
                self.fail(
                    "a fragment item is expected in Pixel Data", item_start, item_tag
                )
            if length == _UNDEFINED_LENGTH:
                self.fail("a fragment of undefined length", item_start, item_tag)

            self._check_room(length, limit, item_start, item_tag)
            self._skip(length, item_start, item_tag)

    def _element_header(
        self, encoding: _Encoding, limit: int | None
    ) -> tuple[int, bytes | None, int]:
        """Read a data element header (PS3.5 7.1): (tag, VR or None, length)."""
        start = self.source.position
        self._count(start)
        head = self._read(8, limit, start)
        if not encoding.explicit:
            group, element, length = encoding.tag_length.unpack(head)
            return group << 16 | element, None, length

        group, element, vr, length = encoding.tag_vr_length.unpack(head)
        tag = group << 16 | element
        if group == 0xFFFE:
            (length,) = encoding.length.unpack_from(head, 4)
            return tag, None, length
        if not _is_vr(vr):
            self.fail(f"explicit VR {vr!r} is not two uppercase letters", start, tag)
        if vr not in _LONG_LENGTH_VRS:
            return tag, vr, length

        (length,) = encoding.length.unpack(self._read(4, limit, start))
        return tag, vr, length

    def _item_header(self, encoding: _Encoding, limit: int | None) -> tuple[int, int]:
        """Read an item or delimiter header: (tag, length); never has a VR."""
        start = self.source.position
        self._count(start)
        head = self._read(8, limit, start)
        group, element, length = encoding.tag_length.unpack(head)
        return group << 16 | element, length

    def _count(self, start: int) -> None:
        """Count one more header; raise beyond the element count limit."""
        self.elements += 1
        if self.elements > self.max_elements:
            self.fail(f"more than {self.max_elements} element headers", start)

    def _read(self, count: int, limit: int | None, start: int) -> bytes:
        """Read ``count`` bytes of the header that starts at ``start``."""
        self._check_room(count, limit, start, None, "an element header")

        data = self.source.read(count)
        if len(data) < count:
            self.fail("the data set ends inside an element header", start)
        return data

    def _skip(self, length: int, start: int, tag: int) -> None:
        """Skip a value of defined length."""
        if self.source.skip(length) < length:
            self.fail(
                f"value length {length} runs past the end of the data set", start, tag
            )

    def _check_room(
        self,
        count: int,
        limit: int | None,
        start: int,
        tag: int | None,
        what: str = "",
    ) -> None:
        """Raise unless ``count`` bytes fit before ``limit``."""
        if limit is None:
            return
        room = limit - self.source.position
        if count <= room:
            return

        what = what or f"value length {count}"
        place = "file" if limit == self.source.end else "enclosing item or sequence"
        self.fail(
            f"{what} runs past the end of the {place} ({room} bytes left)", start, tag
        )

    def _check_delimiter_length(self, length: int, start: int, tag: int) -> None:
        """A delimiter's length must be zero (PS3.5 7.5.1, 7.5.2)."""
        if length != 0:
            self.fail(f"delimiter with length {length} instead of 0", start, tag)

    def _at_limit(self, limit: int | None) -> bool:
        """Whether the walk reached ``limit`` (or the end of the stream)."""
        if limit is None:
            return self.source.at_end()
        return self.source.position >= limit

    def fail(
        self, why: str, offset: int | None = None, tag: int | None = None
    ) -> NoReturn:
        """Raise StructureError at ``offset`` (default: the current position)."""
        if offset is None:
            offset = self.source.position
        raise StructureError(why, offset, tag, inflated=self.source.inflated)
