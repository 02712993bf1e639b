"""Tests for the structural walker of Part 10 files (appliance.part10).

The corpus is pydicom's own data folder; generated files use made-up names
and UIDs only.
"""

import contextlib
import io
import struct
import time
import tracemalloc
import warnings
import zlib
from functools import cache
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info

from appliance.part10 import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    StructureError,
    check_structure,
    read_file_meta,
)

DATA = Path(pydicom.__file__).parent / "data"
TEST_FILES = DATA / "test_files"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# Files pydicom reads as Part 10 whose structure is broken all the same.
BROKEN = {
    "MR_truncated.dcm": "runs past the end of the file",
    "rtplan_truncated.dcm": "runs past the end of the file",
    # Built by deleting elements without fixing the length of their item.
    "DICOMDIR-nooffset": "runs past the end of the file",
    # Its deflated data set is not padded to an even length.
    "image_dfl.dcm": "odd length",
    "nested_priv_SQ.dcm": "odd length",
    # Declares JPEG baseline (explicit VR) but is written in implicit VR.
    "SC_rgb_jpeg.dcm": "written in implicit VR but its transfer syntax says explicit",
}
NO_TRANSFER_SYNTAX = {"meta_missing_tsyntax.dcm"}

# Valid files cut and mutated by the property tests, one per encoding.
SAMPLES = [
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small.dcm",  # explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, encapsulated Pixel Data
    "image_dfl.dcm",  # deflated explicit VR little endian
    "rtplan.dcm",  # nested sequences, implicit VR
    "dicomdirtests/DICOMDIR",  # nested sequences of undefined length, explicit
]
LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV"}
LONG_LENGTH_VRS |= {"UC", "UN", "UR", "UT", "UV"}
MIB = 1024 * 1024


def corpus() -> list[Path]:
    """Every file of pydicom's data folder but its Python modules."""
    files = (path for path in sorted(DATA.rglob("*")) if path.is_file())
    return [path for path in files if path.suffix not in (".py", ".pyc")]


def check(path: Path) -> None:
    """Read the file meta and walk the data set."""
    offset, transfer_syntax = read_file_meta(path)
    check_structure(path, offset, transfer_syntax)


def pydicom_reads(path: Path) -> bool:
    """Whether pydicom reads the file as Part 10 (with DICM prefix)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(path)
    except InvalidDicomError:
        return False
    return True


@cache
def pydicom_boundaries(path: Path) -> tuple[int, ...]:
    """Offsets where pydicom says top-level elements start, and the file end."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(path)
    implicit, _ = dataset.original_encoding

    starts = []
    for tag in sorted(dataset.keys()):
        element = dataset.get_item(tag)
        value_offset = getattr(element, "value_tell", None)
        if value_offset is None:
            value_offset = element.file_tell
        long_header = not implicit and element.VR in LONG_LENGTH_VRS
        starts.append(value_offset - (12 if long_header else 8))
    return (*sorted(starts), path.stat().st_size)


# --------------------------------------------------------------------------
# pydicom's corpus


@pytest.mark.parametrize("path", corpus(), ids=lambda path: str(path.relative_to(DATA)))
def test_corpus(path: Path) -> None:
    """Part 10 files pass unless broken; other files have no file meta."""
    if not pydicom_reads(path):
        with pytest.raises(StructureError, match="no DICM prefix"):
            read_file_meta(path)
    elif path.name in NO_TRANSFER_SYNTAX:
        with pytest.raises(StructureError, match="no Transfer Syntax UID"):
            read_file_meta(path)
    elif path.name in BROKEN:
        with pytest.raises(StructureError, match=BROKEN[path.name]):
            check(path)
    else:
        check(path)


@pytest.mark.parametrize(
    "path",
    [
        path
        for path in corpus()
        if pydicom_reads(path) and path.name not in NO_TRANSFER_SYNTAX
    ],
    ids=lambda path: str(path.relative_to(DATA)),
)
def test_meta_agrees_with_pydicom(path: Path) -> None:
    """The transfer syntax, and where the data set starts, are pydicom's."""
    offset, transfer_syntax = read_file_meta(path)

    meta = pydicom.filereader.read_file_meta_info(path)
    assert transfer_syntax == meta.TransferSyntaxUID
    if transfer_syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        assert offset == pydicom_boundaries(path)[0]


def test_truncated_files_say_where() -> None:
    """The message names the offset and the tag of the element cut short."""
    with pytest.raises(StructureError) as raised:
        check(TEST_FILES / "MR_truncated.dcm")

    assert raised.value.tag == 0x7FE00010
    assert "offset 1488" in str(raised.value)
    assert "(7FE0,0010)" in str(raised.value)


# --------------------------------------------------------------------------
# Property tests: cut files, flipped bytes


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file to write mutated copies into (module scope, for hypothesis)."""
    return tmp_path_factory.mktemp("part10") / "mutant.dcm"


@cache
def sample(name: str) -> tuple[bytes, int, str]:
    """The bytes of a sample file, its data set offset and transfer syntax."""
    path = TEST_FILES / name
    offset, transfer_syntax = read_file_meta(path)
    return path.read_bytes(), offset, transfer_syntax


@cache
def valid_cuts(name: str) -> frozenset[int]:
    """Where a sample may be cut and stay valid.

    Top-level element boundaries, as pydicom reads them; for a deflated data
    set, only the end of the deflate stream (image_dfl.dcm has 8 more bytes).
    """
    content, offset, transfer_syntax = sample(name)
    if transfer_syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return frozenset(pydicom_boundaries(TEST_FILES / name))

    inflater = zlib.decompressobj(-15)
    inflater.decompress(content[offset:])
    return frozenset({len(content) - len(inflater.unused_data), len(content)})


def cut_and_check(scratch: Path, name: str, cut: int) -> None:
    """Cut a sample at ``cut``: it passes at a valid cut, else raises."""
    content, offset, transfer_syntax = sample(name)
    scratch.write_bytes(content[:cut])

    # A cut on a boundary is whole, but an odd-length data set never is.
    if cut in valid_cuts(name) and (cut - offset) % 2 == 0:
        check_structure(scratch, offset, transfer_syntax)
    else:
        with pytest.raises(StructureError):
            check_structure(scratch, offset, transfer_syntax)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(SAMPLES), data=st.data())
def test_cut_inside_an_element_is_detected(scratch: Path, name: str, data) -> None:
    """A cut passes exactly on a top-level boundary, and raises elsewhere."""
    content, offset, _ = sample(name)
    cut = data.draw(st.integers(offset, len(content) - 1), label="cut")

    cut_and_check(scratch, name, cut)


@pytest.mark.parametrize("name", ["rtplan.dcm", "UN_sequence.dcm", "image_dfl.dcm"])
def test_every_cut_of_small_files(scratch: Path, name: str) -> None:
    """The same, for every offset of a few small files."""
    content, offset, _ = sample(name)
    for cut in range(offset, len(content)):
        cut_and_check(scratch, name, cut)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(name=st.sampled_from(SAMPLES), data=st.data())
def test_flipped_bytes_only_raise_structure_error(
    scratch: Path, name: str, data
) -> None:
    """Corrupt bytes anywhere give success or StructureError, and quickly."""
    content = bytearray(sample(name)[0])
    position = st.integers(0, len(content) - 1)
    flips = st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=8)
    for index, mask in data.draw(flips, label="flips"):
        content[index] ^= mask
    scratch.write_bytes(content)

    started = time.perf_counter()
    with contextlib.suppress(StructureError):
        check(scratch)
    assert time.perf_counter() - started < 1.0


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=600))
def test_random_data_sets_only_raise_structure_error(scratch: Path, content) -> None:
    """Arbitrary bytes after a valid meta never escape as another error."""
    for transfer_syntax in (
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    ):
        scratch.write_bytes(meta(transfer_syntax) + content)
        with contextlib.suppress(StructureError):
            check(scratch)


# --------------------------------------------------------------------------
# Hand-built encodings (made-up values)


def meta(transfer_syntax: str) -> bytes:
    """Preamble, DICM and a file meta written by pydicom."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.99999.1"
    file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    return bytes(128) + b"DICM" + buffer.getvalue()


def explicit(tag: int, vr: bytes, value: bytes = b"", length: int | None = None):
    """An explicit VR little endian element (PS3.5 7.1.2)."""
    length = len(value) if length is None else length
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr)
    if vr.decode("latin-1") in LONG_LENGTH_VRS:
        return head + struct.pack("<HI", 0, length) + value
    return head + struct.pack("<H", length) + value


def implicit(tag: int, value: bytes = b"", length: int | None = None) -> bytes:
    """An implicit VR little endian element, item or delimiter (PS3.5 7.1.3)."""
    length = len(value) if length is None else length
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length) + value


UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
NAME = implicit(0x00100010, b"Doe^Jane")
EXPLICIT_NAME = explicit(0x00100010, b"PN", b"Doe^Jane")
SEQUENCE = 0x00081115
PIXEL_DATA = 0x7FE00010


def nested(depth: int) -> bytes:
    """``depth`` sequences of undefined length, each in an item of the last."""
    body = NAME
    for _ in range(depth):
        item = implicit(ITEM, body + implicit(ITEM_END), UNDEFINED)
        body = implicit(SEQUENCE, item + implicit(SEQUENCE_END), UNDEFINED)
    return body


UN_ITEMS = implicit(ITEM, nested(2) + implicit(ITEM_END), UNDEFINED)


def deflate(body: bytes) -> bytes:
    """Raw deflate (RFC 1951), as a deflated data set is stored (PS3.5 A.5)."""
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(body) + compressor.flush()


def write(tmp_path: Path, transfer_syntax: str, body: bytes) -> Path:
    """Write a Part 10 file with a hand-built data set."""
    path = tmp_path / "made_up.dcm"
    path.write_bytes(meta(transfer_syntax) + body)
    return path


VALID = [
    pytest.param(IMPLICIT_VR_LITTLE_ENDIAN, NAME + nested(3), id="nested-undefined"),
    pytest.param(
        IMPLICIT_VR_LITTLE_ENDIAN,
        implicit(SEQUENCE, implicit(ITEM, NAME)) + NAME,
        id="implicit-defined-sequence",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(SEQUENCE, b"SQ", implicit(ITEM, EXPLICIT_NAME)),
        id="explicit-defined-sequence",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(0x00091010, b"UN", UN_ITEMS + implicit(SEQUENCE_END), UNDEFINED),
        id="un-undefined-is-implicit-sequence",
    ),
    pytest.param(
        JPEG_BASELINE,
        explicit(
            PIXEL_DATA,
            b"OB",
            implicit(ITEM)
            + implicit(ITEM, b"\xff\xd8\xfe\xff\xdd\xe0")
            + implicit(SEQUENCE_END),
            UNDEFINED,
        ),
        id="fragments-with-delimiter-bytes",
    ),
    pytest.param(IMPLICIT_VR_LITTLE_ENDIAN, b"", id="empty-data-set"),
    pytest.param(
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        deflate(EXPLICIT_NAME * 2) + b"\0",  # 21 bytes, padded to 22
        id="deflated-with-padding-byte",
    ),
]


@pytest.mark.parametrize(("transfer_syntax", "body"), VALID)
def test_valid_encodings_pass(tmp_path: Path, transfer_syntax: str, body) -> None:
    check(write(tmp_path, transfer_syntax, body))


BROKEN_ENCODINGS = [
    pytest.param(
        IMPLICIT_VR_LITTLE_ENDIAN,
        NAME + implicit(ITEM, NAME),
        "item tag where",
        id="item-at-top-level",
    ),
    pytest.param(
        IMPLICIT_VR_LITTLE_ENDIAN,
        NAME + implicit(SEQUENCE_END),
        "item tag where",
        id="delimiter-at-top-level",
    ),
    pytest.param(
        IMPLICIT_VR_LITTLE_ENDIAN,
        nested(2)[:-8],
        "sequence of undefined length",
        id="sequence-never-closed",
    ),
    pytest.param(
        IMPLICIT_VR_LITTLE_ENDIAN,
        nested(1)[:-16],
        "item of undefined length",
        id="item-never-closed",
    ),
    pytest.param(
        IMPLICIT_VR_LITTLE_ENDIAN,
        nested(1)[:-8] + implicit(SEQUENCE_END, b"\0\0"),
        "delimiter with length 2",
        id="delimiter-with-length",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(SEQUENCE, b"SQ", implicit(ITEM, EXPLICIT_NAME, length=14))
        + EXPLICIT_NAME,
        "enclosing item",
        id="element-longer-than-item",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(SEQUENCE, b"SQ", EXPLICIT_NAME),
        "item is expected",
        id="element-in-place-of-item",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(0x00080060, b"CS", b"MR") + explicit(0x00100010, b"p\0", b"Doe^"),
        "not two uppercase letters",
        id="bad-explicit-vr",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(0x00080060, b"CS", b"MR")
        + explicit(0x00280010, b"UL", length=0xFFFF)
        + explicit(0x00280011, b"US", b"\1\0"),
        "runs past the end of the file",
        id="value-past-end-of-file",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(0x00080060, b"CS", b"MR") + explicit(0x00181000, b"LT", length=0)[:-1],
        "element header",
        id="header-cut-short",
    ),
    pytest.param(
        EXPLICIT_VR_LITTLE_ENDIAN,
        explicit(0x00080060, b"CS", b"MR")
        + explicit(0x00280010, b"OL", length=UNDEFINED),
        "undefined length for VR OL",
        id="undefined-length-not-sequence",
    ),
    pytest.param(
        JPEG_BASELINE,
        explicit(
            PIXEL_DATA, b"OB", implicit(ITEM) + implicit(ITEM, b"\xff\xd8"), UNDEFINED
        ),
        "Pixel Data is never closed",
        id="fragments-never-closed",
    ),
    pytest.param(
        JPEG_BASELINE,
        explicit(PIXEL_DATA, b"OB", implicit(ITEM, length=UNDEFINED), UNDEFINED),
        "fragment of undefined length",
        id="fragment-undefined-length",
    ),
    pytest.param(
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        deflate(EXPLICIT_NAME)[:-1],
        "deflate stream is cut short",
        id="deflate-cut-short",
    ),
    pytest.param(
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        deflate(EXPLICIT_NAME) + b"garbage!",
        "after the deflate stream",
        id="deflate-trailing-garbage",
    ),
    pytest.param(
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        b"\xff\xff\xff\xff",
        "corrupt deflate data",
        id="corrupt-deflate",
    ),
]


@pytest.mark.parametrize(("transfer_syntax", "body", "why"), BROKEN_ENCODINGS)
def test_broken_encodings_raise(tmp_path: Path, transfer_syntax: str, body, why):
    path = write(tmp_path, transfer_syntax, body)

    with pytest.raises(StructureError, match=why):
        check(path)


def test_vr_mode_against_the_syntax_is_refused(tmp_path: Path) -> None:
    """Implicit VR written under an explicit syntax cannot be read by a peer."""
    path = write(tmp_path, EXPLICIT_VR_LITTLE_ENDIAN, NAME + nested(2))

    with pytest.raises(StructureError, match="written in implicit VR"):
        check(path)


def test_nesting_depth_is_limited(tmp_path: Path) -> None:
    """Deep nesting raises at the limit, and passes under a larger one."""
    path = write(tmp_path, IMPLICIT_VR_LITTLE_ENDIAN, nested(100))
    offset, transfer_syntax = read_file_meta(path)

    with pytest.raises(StructureError, match="nested deeper than 64"):
        check_structure(path, offset, transfer_syntax)
    check_structure(path, offset, transfer_syntax, max_depth=101)


def test_element_count_is_limited(tmp_path: Path) -> None:
    path = write(tmp_path, IMPLICIT_VR_LITTLE_ENDIAN, NAME * 20)
    offset, transfer_syntax = read_file_meta(path)

    check_structure(path, offset, transfer_syntax, max_elements=20)
    with pytest.raises(StructureError, match="more than 19 element headers"):
        check_structure(path, offset, transfer_syntax, max_elements=19)


# --------------------------------------------------------------------------
# File meta


def test_meta_of_a_file_written_by_pydicom(tmp_path: Path) -> None:
    content = meta(EXPLICIT_VR_BIG_ENDIAN)
    path = tmp_path / "made_up.dcm"
    path.write_bytes(content)

    assert read_file_meta(path) == (len(content), EXPLICIT_VR_BIG_ENDIAN)


def raw_meta(transfer_syntax: bytes | None) -> bytes:
    """A hand-built file meta (pydicom refuses to write bad UIDs), then a name."""
    elements = explicit(0x00020001, b"OB", b"\0\1")
    if transfer_syntax is not None:
        elements += explicit(0x00020010, b"UI", transfer_syntax)
    return bytes(128) + b"DICM" + elements + NAME


@pytest.mark.parametrize(
    ("content", "why"),
    [
        pytest.param(b"", "no DICM prefix", id="empty"),
        pytest.param(bytes(128) + b"DICO", "no DICM prefix", id="wrong-prefix"),
        pytest.param(meta(JPEG_BASELINE)[:-3], "cut short", id="meta-cut-short"),
        pytest.param(meta(JPEG_BASELINE)[:140], "cut short", id="meta-header-cut"),
        pytest.param(raw_meta(b"1.2." * 17), "not a UID", id="uid-too-long"),
        pytest.param(raw_meta(b"1.2.x\0"), "not a UID", id="uid-not-digits"),
        pytest.param(raw_meta(None), "no Transfer Syntax", id="no-transfer-syntax"),
    ],
)
def test_broken_meta_raises(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "made_up.dcm"
    path.write_bytes(content)

    with pytest.raises(StructureError, match=why):
        read_file_meta(path)


# --------------------------------------------------------------------------
# Large Pixel Data is skipped, not read


def large_image(path: Path, transfer_syntax: str, size: int) -> None:
    """Write a made-up image whose Pixel Data value has ``size`` bytes."""
    dataset = Dataset()
    dataset.PatientName = "Doe^Jane"
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.99999.2"
    if transfer_syntax == JPEG_BASELINE:
        dataset.PixelData = encapsulate([bytes(MIB)] * (size // MIB))
    else:
        dataset.PixelData = bytes(size)
    dataset["PixelData"].VR = "OB"

    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        JPEG_BASELINE,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    ],
)
def test_large_pixel_data_is_not_read_into_memory(
    tmp_path: Path, transfer_syntax: str
) -> None:
    """50 MiB of Pixel Data are walked with well under 4 MiB of memory."""
    path = tmp_path / "large.dcm"
    large_image(path, transfer_syntax, 50 * MIB)

    tracemalloc.start()
    started = time.perf_counter()
    check(path)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert peak < 4 * MIB
    assert elapsed < 5.0
