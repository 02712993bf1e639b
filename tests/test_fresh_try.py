"""Faults found by trying the day's changes as a new administrator would:
each test failed before its fix. All names and IDs are made up."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.catalog.store import Catalog
from appliance.hl7.framing import FrameReader, frame
from appliance.hl7.listener import Listener, ListenerSettings, bind
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
