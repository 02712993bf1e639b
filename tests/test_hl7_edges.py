"""MLLP at its edges: answers in the order of the messages when one over
the size cap comes among others, a message of exactly the cap whose end
block is split, answers in the message's own separators, and the idle
timeout of a message that follows a refused one. Made-up names and IDs."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest

from appliance.catalog.store import Catalog
from appliance.hl7 import acks
from appliance.hl7.framing import FrameReader, frame
from appliance.hl7.listener import Listener, ListenerSettings, bind
from appliance.hl7.messages import DATA_TYPE_ERROR, MessageError
from appliance.prefetch.intake import Intake
from tests.hl7_samples import siu


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    settings = ListenerSettings(max_message_bytes=4096, idle_timeout=5.0)
    running = Listener(bind("127.0.0.1", 0), Intake(catalog), settings)
    running.start()
    yield running
    running.stop()
    catalog.close()


def control_ids(listener: Listener, payload: bytes, answers: int) -> list[str]:
    """Send ``payload`` in one write; MSA-1 and MSA-2 of each ACK, in order."""
    reader = FrameReader(max_message_bytes=1 << 20)
    found: list[bytes] = []
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(payload)
        while len(found) < answers:
            data = sock.recv(65536)
            if not data:
                break
            found += reader.feed(data).messages
    result = []
    for ack in found:
        segment = next(s for s in ack.decode().split("\r") if s.startswith("MSA|"))
        result.append("|".join(segment.split("|")[1:3]))
    return result


def test_acks_follow_the_messages_order_when_oversized_ones_are_mixed_in(
    listener: Listener,
) -> None:
    # A RIS that pipelines matches ACKs to messages by their order, so an
    # AR sent ahead of the AA of an earlier message answers the wrong one.
    huge = b"NTE|" + b"x" * 6000 + b"\r"
    payload = b"".join(
        (
            frame(siu(control_id="M1", appointment="A1").encode()),
            frame(siu(control_id="M2", appointment="A2").encode() + huge),
            frame(siu(control_id="M3", appointment="A3").encode()),
            frame(siu(control_id="M4", appointment="A4").encode() + huge),
        )
    )

    answers = control_ids(listener, payload, answers=4)

    assert answers == ["AA|M1", "AR|M2", "AA|M3", "AR|M4"]


def test_a_message_of_exactly_the_cap_is_read_when_its_end_block_is_split() -> None:
    # Whether a message fits must not depend on where TCP cuts the bytes.
    message = b"MSH|^~\\&|RIS|CITYHOSP|PACS|CITYHOSP|||ADT^A08|C1|P|2.5\r"
    message += b"NTE|" + b"x" * (100 - len(message) - 5) + b"\r"
    assert len(message) == 100
    reader = FrameReader(max_message_bytes=100)

    first = reader.feed(b"\x0b" + message + b"\x1c")
    second = reader.feed(b"\x0d")

    assert first.frames == [] and second.oversized == []
    assert second.messages == [message]


def test_a_refusal_uses_the_field_separator_of_the_message(listener: Listener) -> None:
    # MSH-1 may be any character: an MSA-3 or ERR written with "|" after an
    # MSH written with "#" makes the sender read MSA-2 (the control ID it
    # matches the answer with) as "H1|message longer...".
    text = siu(control_id="H1").replace("|", "#") + "NTE#" + "x" * 5000 + "\r"
    reader = FrameReader(max_message_bytes=1 << 20)
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(frame(text.encode()))
        found: list[bytes] = []
        while not found:
            data = sock.recv(65536)
            assert data, "the connection closed without an answer"
            found += reader.feed(data).messages

    segments = found[0].decode().split("\r")
    msa = next(s for s in segments if s.startswith("MSA"))
    err = next(s for s in segments if s.startswith("ERR"))
    assert msa.split("#")[:3] == ["MSA", "AR", "H1"] and "|" not in msa
    assert err.split("#")[3] == "207^Application internal error^HL70357"


def test_an_error_location_uses_the_component_separator_of_the_message() -> None:
    # MSH-2 is "$~\\&": components are parted by $.
    text = siu(control_id="C7").replace("^", "$")
    error = MessageError("AE", DATA_TYPE_ERROR, "PID^1^3", "a bad identifier")

    ack = acks.refuse(hl7.parse(text), error).decode()

    err = next(s for s in ack.split("\r") if s.startswith("ERR"))
    assert err.split("|")[2:4] == ["PID$1$3", "102$Data type error$HL70357"]


def test_a_message_after_an_oversized_one_gets_its_own_idle_timeout(
    tmp_path: Path,
) -> None:
    # A message must arrive whole within idle_timeout of its first byte,
    # not of the first byte of the refused message before it.
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    settings = ListenerSettings(max_message_bytes=4096, idle_timeout=3.0)
    running = Listener(bind("127.0.0.1", 0), Intake(catalog), settings)
    running.start()
    huge = frame(siu(control_id="H1").encode() + b"NTE|" + b"x" * 6000 + b"\r")
    normal = frame(siu(control_id="N1").encode())
    reader = FrameReader(max_message_bytes=1 << 20)
    found: list[bytes] = []
    try:
        with socket.create_connection(running.address, timeout=10) as sock:
            for start in range(0, 4000, 1000):  # 1.5 s of the refused one
                sock.sendall(huge[start : start + 1000])
                time.sleep(0.5)
            sock.sendall(huge[4000:] + normal[:20])  # the next one begins
            time.sleep(1.5)  # past 3 s from the first, 1.5 s from its own
            sock.sendall(normal[20:])
            while len(found) < 2:
                data = sock.recv(65536)
                if not data:
                    break
                found += reader.feed(data).messages
    finally:
        running.stop()
        catalog.close()

    assert [answer.split(b"\r")[1][:9] for answer in found] == [
        b"MSA|AR|H1",
        b"MSA|AA|N1",
    ]
