"""The MLLP listener with the real intake and catalog, talked to by python-hl7's
own clients (its ``mllp_send`` command and its asyncio connection) and by
raw sockets for what no well-behaved client sends."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from hl7.mllp import open_hl7_connection

from appliance.catalog.store import Catalog
from appliance.hl7.framing import FrameReader, frame
from appliance.hl7.listener import Listener, ListenerSettings, bind
from appliance.prefetch import appointments
from appliance.prefetch.intake import Intake
from tests.hl7_samples import orm, siu
from tests.loopback import connect_from, new_address

MLLP_SEND = Path(sys.executable).parent / "mllp_send"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = Catalog(tmp_path / "catalog", map_size=2**26)
    yield opened
    opened.close()


@pytest.fixture
def listener(catalog: Catalog) -> Iterator[Listener]:
    settings = ListenerSettings(max_message_bytes=4096, idle_timeout=2.0)
    running = Listener(bind("127.0.0.1", 0), Intake(catalog), settings)
    running.start()
    yield running
    running.stop()


def converse(
    listener: Listener, *payloads: bytes, answers: int, source: str = "127.0.0.1"
) -> list[str]:
    """Send raw bytes, one write each, from the loopback address ``source``,
    and read ``answers`` ACKs."""
    reader = FrameReader(max_message_bytes=1 << 20)
    found: list[bytes] = []
    with connect_from(source, listener.address[1], timeout=10) as sock:
        for payload in payloads:
            sock.sendall(payload)
        while len(found) < answers:
            data = sock.recv(65536)
            if not data:
                break
            found += reader.feed(data).messages
    return [answer.decode() for answer in found]


def msa(ack: str) -> list[str]:
    segment = next(line for line in ack.split("\r") if line.startswith("MSA|"))
    return segment.split("|")


def test_mllp_send_gets_an_ack_after_the_appointment_is_recorded(
    listener: Listener, catalog: Catalog, tmp_path: Path
) -> None:
    batch = tmp_path / "messages.hl7"
    batch.write_text(siu(control_id="A1") + "\n" + orm(control_id="A2"))
    host, port = listener.address

    sent = subprocess.run(
        [str(MLLP_SEND), "--loose", "--file", str(batch), "--port", str(port), host],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert sent.returncode == 0, sent.stderr
    # mllp_send prints each ACK with its segments on lines of their own.
    lines = sent.stdout.replace("\r", "\n").split("\n")
    answers = [line.split("|") for line in lines if line.startswith("MSA|")]
    assert [answer[1:3] for answer in answers] == [["AA", "A1"], ["AA", "A2"]]
    recorded = {a.appointment_id: a for a in appointments.appointments(catalog)}
    assert set(recorded) == {"appointment:APT1001", "order:ORD5001"}
    assert recorded["order:ORD5001"].accession == "ACC7001"


def test_many_messages_on_one_connection_with_python_hl7s_client(
    listener: Listener, catalog: Catalog
) -> None:
    async def send_all() -> list[str]:
        reader, writer = await open_hl7_connection(*listener.address)
        acks = []
        for number in range(5):
            text = siu(control_id=f"C{number}", appointment=f"APT{number}")
            writer.writemessage(hl7.parse(text))
            await writer.drain()
            acks.append(str(await asyncio.wait_for(reader.readmessage(), 10)))
        writer.close()
        await writer.wait_closed()
        return acks

    acks = asyncio.run(send_all())

    assert [msa(ack)[1:3] for ack in acks] == [["AA", f"C{n}"] for n in range(5)]
    assert len(appointments.appointments(catalog)) == 5


def test_a_resent_message_is_answered_again_and_applied_once(
    listener: Listener, catalog: Catalog
) -> None:
    booking = frame(siu(control_id="SAME").encode())
    first = converse(listener, booking, answers=1)
    # The RIS missed our ACK and sends again, after the appointment moved
    # on by another message: the resend must not undo that.
    converse(listener, frame(siu(event="S15", control_id="LATER").encode()), answers=1)

    again = converse(listener, booking, answers=1)

    assert again == first
    (appointment,) = appointments.appointments(catalog)
    assert appointment.state == "cancelled"


def test_garbage_split_bytes_and_two_in_one_write(listener: Listener) -> None:
    one = frame(siu(control_id="G1").encode())
    two = frame(siu(control_id="G2", appointment="APT2").encode())
    three = frame(siu(control_id="G3", appointment="APT3").encode())
    pieces = [
        b"\x00\xffnoise\r\n",
        *[one[i : i + 1] for i in range(len(one))],
        two + three,
    ]

    acks = converse(listener, *pieces, answers=3)

    assert [msa(ack)[1:3] for ack in acks] == [["AA", "G1"], ["AA", "G2"], ["AA", "G3"]]


def test_noise_from_one_address_is_logged_once(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that sends noise on connection after connection gets one line
    a minute, not one per connection; its messages are still answered, and
    another address gets its own line."""
    flooding, other = new_address(), new_address()
    sources = [flooding] * 3 + [other]

    with caplog.at_level(logging.WARNING, logger="appliance.hl7.listener"):
        for number, source in enumerate(sources):
            message = frame(siu(control_id=f"N{number}").encode())
            acks = converse(listener, b"noise\r\n" + message, answers=1, source=source)
            assert [msa(ack)[1:3] for ack in acks] == [["AA", f"N{number}"]]

    noted = [r.getMessage() for r in caplog.records if "outside MLLP" in r.getMessage()]
    assert sum(f"HL7 from {flooding}:" in line for line in noted) == 1, noted
    assert sum(f"HL7 from {other}:" in line for line in noted) == 1, noted


def test_bad_messages_get_ar_or_ae_with_err_and_change_nothing(
    listener: Listener, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = siu(control_id="B1").replace("SIU^S12^SIU_S12", "MDM^T02^MDM_T02")
    no_patient = siu(control_id="B2", patient="")

    with caplog.at_level(logging.WARNING, logger="appliance.prefetch.intake"):
        acks = converse(
            listener, frame(unknown.encode()), frame(no_patient.encode()), answers=2
        )

    assert [msa(ack)[1:3] for ack in acks] == [["AR", "B1"], ["AE", "B2"]]
    assert all("\rERR|" in ack for ack in acks)
    assert "|200^Unsupported message type^HL70357|" in acks[0]
    assert "|PID^1^3|101^Required field missing^HL70357|" in acks[1]
    assert appointments.appointments(catalog) == []
    refusals = [r for r in caplog.records if r.name == "appliance.prefetch.intake"]
    assert len(refusals) == 2


def test_an_oversized_message_is_refused_and_the_connection_goes_on(
    listener: Listener,
) -> None:
    huge = frame(siu(control_id="H1").encode() + b"NTE|" + b"x" * 8000 + b"\r")
    normal = frame(siu(control_id="H2").encode())

    acks = converse(listener, huge, normal, answers=2)

    assert msa(acks[0])[1:3] == ["AR", "H1"] and "longer than 4096 bytes" in acks[0]
    # Answered from the application and facility it was sent to, as others.
    assert acks[0].startswith("MSH|^~\\&|PACS|CITYHOSP|RIS|CITYHOSP|")
    assert "|207^Application internal error^HL70357|" in acks[0]
    assert msa(acks[1])[1:3] == ["AA", "H2"]


def test_an_oversized_message_without_a_readable_header_is_still_answered(
    listener: Listener,
) -> None:
    # Its first segment does not end within the bytes kept of it.
    huge = frame(b"MSH|" + b"x" * 9000 + b"\r")

    [ack] = converse(listener, huge, answers=1)

    assert msa(ack)[1:3] == ["AR", ""] and "longer than 4096 bytes" in ack
    assert ack.startswith("MSH|^~\\&|PACS_APPLIANCE|")


def test_an_idle_connection_is_closed(listener: Listener) -> None:
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(b"\x0bMSH|half a message")
        started = time.monotonic()
        closed = sock.recv(100)

    assert closed == b""
    assert 1.5 < time.monotonic() - started < 8


def test_the_listener_stops_with_connections_open(catalog: Catalog) -> None:
    running = Listener(bind("127.0.0.1", 0), Intake(catalog), ListenerSettings())
    running.start()
    idle = socket.create_connection(running.address, timeout=10)
    idle.sendall(frame(siu(control_id="before-stop").encode()))
    assert b"MSA|AA|before-stop" in idle.recv(65536)

    running.stop()

    assert idle.recv(100) == b""
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(running.address, timeout=2).close()


def test_a_trickling_sender_is_cut_off_after_the_idle_timeout(
    listener: Listener,
) -> None:
    with socket.create_connection(listener.address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"\x0bMSH|")
        closed = False
        while time.monotonic() - started < 8:
            time.sleep(0.5)
            try:
                sock.sendall(b"x")  # a byte every half second, never an end
            except OSError:
                closed = True
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass

    assert closed
    assert time.monotonic() - started < 6


def test_a_failing_handler_still_answers(catalog: Catalog) -> None:
    def broken(message: bytes, peer: str) -> bytes:
        raise RuntimeError("made to fail")

    running = Listener(bind("127.0.0.1", 0), broken, ListenerSettings())
    running.start()
    try:
        (ack,) = converse(running, frame(siu(control_id="F1").encode()), answers=1)
    finally:
        running.stop()

    assert msa(ack)[1] == "AE"
    assert "207^Application internal error" in ack


def test_a_reused_control_id_with_other_content_is_not_applied_and_warned(
    listener: Listener, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    converse(listener, frame(siu(control_id="R1").encode()), answers=1)

    with caplog.at_level(logging.WARNING, logger="appliance.prefetch.appointments"):
        converse(
            listener,
            frame(siu(control_id="R1", appointment="OTHER").encode()),
            answers=1,
        )

    assert [a.appointment_id for a in appointments.appointments(catalog)] == [
        "appointment:APT1001"
    ]
    assert any(
        "was used before for another message" in r.message for r in caplog.records
    )
