"""multipart/related bodies: what a client writes is split back into the
exact bytes of each part, whatever bytes the parts hold; malformed bodies
are refused and leave no file behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from appliance.web.multipart import BadMultipart, MediaType, split

BOUNDARY = "b0undary"


def body(parts: list[bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += part + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def split_bytes(raw: bytes, folder: Path) -> list[tuple[MediaType, bytes]]:
    spooled = folder / "body"
    spooled.write_bytes(raw)
    return [
        (kind, path.read_bytes()) for kind, path in split(spooled, BOUNDARY, folder)
    ]


# Parts that hold line breaks and pieces of the delimiter, as DICOM data may.
part_bytes = st.lists(
    st.sampled_from([b"\r\n", b"--", BOUNDARY.encode(), b"x", b"\x00", b"DICM"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(part_bytes, min_size=1, max_size=4), st.sampled_from([b"", b"hi\r\n"]))
def test_parts_come_back_byte_for_byte(parts: list[bytes], preamble: bytes) -> None:
    # A part holding CRLF--boundary cannot be told from a delimiter: the
    # sender picks a boundary that occurs in no part (RFC 2046 5.1.1).
    assume(all(f"\r\n--{BOUNDARY}".encode() not in part for part in parts))
    raw = body(parts, preamble)
    with tempfile.TemporaryDirectory() as folder:
        got = split_bytes(raw, Path(folder))
        assert [content for _kind, content in got] == parts
        assert {kind.type for kind, _content in got} == {"application/dicom"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"no boundary anywhere", "no part starts"),
        (f"--{BOUNDARY}\r\nContent-Type: x".encode(), "headers never end"),
        (f"--{BOUNDARY}\r\n\r\nunfinished".encode(), "before the closing boundary"),
        (f"--{BOUNDARY}junk\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "boundary line"),
        (f"--{BOUNDARY}\r\nno colon\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "header"),
    ],
)
def test_malformed_bodies_are_refused_without_leftovers(
    tmp_path: Path, raw: bytes, message: str
) -> None:
    with pytest.raises(BadMultipart, match=message):
        split_bytes(raw, tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["body"]


def test_a_later_malformed_part_removes_the_earlier_files(tmp_path: Path) -> None:
    raw = body([b"first"])[: -len(f"--{BOUNDARY}--\r\n")]
    raw += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nsecond".encode()
    with pytest.raises(BadMultipart, match="part 2"):
        split_bytes(raw, tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["body"]


def test_media_type_parameters() -> None:
    parsed = MediaType.parse(
        'Multipart/Related; type="application/dicom"; boundary=abc; start="<x>"'
    )
    assert parsed.type == "multipart/related"
    assert parsed.parameters == {
        "type": "application/dicom",
        "boundary": "abc",
        "start": "<x>",
    }
