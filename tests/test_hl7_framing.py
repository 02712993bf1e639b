"""MLLP framing: messages come out whole and in order however the bytes are
cut, with noise between frames skipped and oversized frames refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.hl7.framing import FrameReader, frame

MESSAGE = st.binary(min_size=1, max_size=300).filter(
    lambda data: b"\x0b" not in data and b"\x1c\r" not in data
)
NOISE = st.binary(max_size=20).filter(lambda data: b"\x0b" not in data)


def feed_in_pieces(reader: FrameReader, stream: bytes, cuts: list[int]) -> list[bytes]:
    found: list[bytes] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut > start:
            found += reader.feed(stream[start:cut]).messages
            start = cut
    return found


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(NOISE, MESSAGE), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_messages_survive_any_cutting_and_noise_between_frames(
    parts: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(noise + frame(message) for noise, message in parts)

    found = feed_in_pieces(FrameReader(max_message_bytes=1000), stream, cuts)

    assert found == [message for _noise, message in parts]


def test_byte_by_byte_and_two_in_one_read() -> None:
    reader = FrameReader(max_message_bytes=100)
    one, two = frame(b"MSH|first"), frame(b"MSH|second")

    by_byte = [m for i in range(len(one)) for m in reader.feed(one[i : i + 1]).messages]
    together = reader.feed(one + two).messages

    assert by_byte == [b"MSH|first"]
    assert together == [b"MSH|first", b"MSH|second"]
    assert reader.pending == 0


def test_noise_is_counted_and_an_abandoned_frame_is_dropped() -> None:
    reader = FrameReader(max_message_bytes=100)

    received = reader.feed(b"\r\n garbage" + b"\x0bMSH|cut off" + frame(b"MSH|whole"))

    assert received.messages == [b"MSH|whole"]
    assert received.skipped_bytes == len(b"\r\n garbage") + len(b"\x0bMSH|cut off")


def test_an_oversized_frame_is_refused_and_the_next_one_read() -> None:
    reader = FrameReader(max_message_bytes=10)
    big = frame(b"MSH|" + b"x" * 50)

    first = reader.feed(big[:30])
    second = reader.feed(big[30:] + frame(b"MSH|ok"))

    assert first.messages == [] and first.oversized == []
    assert second.oversized == [b""]  # its first segment never ended
    assert second.messages == [b"MSH|ok"]
    assert reader.pending == 0


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
@pytest.mark.parametrize("cut", [5, 25, 40, 200])
def test_an_oversized_frame_keeps_its_first_segment(end: bytes, cut: int) -> None:
    reader = FrameReader(max_message_bytes=30)
    header = b"MSH|^~\\&|RIS|H|PACS|H|20261205||ADT^A08|C1|P|2.5"
    big = frame(header + end + b"PID|" + b"y" * 300 + end)

    received = [reader.feed(big[:cut]), reader.feed(big[cut:])]

    assert [r.oversized for r in received] == [[], [header]]
    assert reader.pending == 0
