"""What a hostile or broken RIS sends, through the real listener and intake
on loopback: escape sequences python-hl7 would undo wrongly, a header
without its version, a message in another character set than it says.
Each gets its AE or AR, one warning, no change in the catalog, and the next
message on the same connection is recorded. Made-up names and IDs."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.catalog.store import Catalog
from appliance.hl7.framing import FrameReader, frame
from appliance.hl7.listener import Listener, ListenerSettings, bind
from appliance.hl7.messages import parse_time
from appliance.prefetch import appointments
from appliance.prefetch.intake import Intake
from tests.hl7_samples import orm, siu

NO_VERSION = (
    "MSH|^~\\&|RIS|CITYHOSP|PACS|CITYHOSP|20261204101500||{kind}|{control_id}|P\r"
    "SCH|APT9001^RIS||||||||30|min|^^30^20270115093000\r"
    "PID|1||PAT-0042^^^CITYHOSP^MR||Testperson^Alma\r"
)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = Catalog(tmp_path / "catalog", map_size=2**26)
    yield opened
    opened.close()


@pytest.fixture
def listener(catalog: Catalog) -> Iterator[Listener]:
    settings = ListenerSettings(max_message_bytes=4096, idle_timeout=5.0)
    running = Listener(bind("127.0.0.1", 0), Intake(catalog), settings)
    running.start()
    yield running
    running.stop()


def exchange(listener: Listener, *messages: bytes) -> list[bytes]:
    """Each message framed, all on one connection; the ACKs, in order."""
    reader = FrameReader(max_message_bytes=1 << 20)
    found: list[bytes] = []
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(b"".join(frame(message) for message in messages))
        while len(found) < len(messages):
            data = sock.recv(65536)
            if not data:
                break
            found += reader.feed(data).messages
    return found


def segment(ack: bytes, name: str) -> list[str]:
    text = ack.decode()
    line = next(line for line in text.split("\r") if line.startswith(name + "|"))
    return line.split("|")


def recorded(catalog: Catalog) -> list[str]:
    return [a.appointment_id for a in appointments.appointments(catalog)]


def assert_refused_then_good_one_taken(
    listener: Listener,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
    bad: bytes,
    ack_code: str,
    control_id: str,
) -> tuple[list[str], list[str]]:
    """Send ``bad`` then a good booking on one connection; MSA and ERR of
    the refusal, once every common check has passed."""
    caplog.set_level(logging.INFO)
    good = siu(control_id="GOOD1", appointment="APT-GOOD").encode()

    refusal, accepted = exchange(listener, bad, good)

    assert segment(accepted, "MSA")[1:3] == ["AA", "GOOD1"]
    assert recorded(catalog) == ["appointment:APT-GOOD"]
    msa = segment(refusal, "MSA")
    assert msa[1:3] == [ack_code, control_id]
    # Every segment ends with CR, the last one too (HL7 v2.5 2.5.1).
    assert refusal.endswith(b"\r")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["appliance.prefetch.intake"]
    # Nobody else logs the message's values (python-hl7 would, whole).
    assert "PAT" not in caplog.text.replace("PAT-0042", "")
    return msa, segment(refusal, "ERR")


@pytest.mark.parametrize(
    ("patient", "reason"),
    [
        # python-hl7 drops the rest of a value after an escape left open:
        # the ID would become "PAT", another patient's.
        ("PAT\\F^^^CITYHOSP", "an escape sequence without its end in PID-3"),
        ("PAT^^^CITYHOSP\\T", "an escape sequence without its end in PID-3"),
        # Character set switches and unknown formatting: dropped from the
        # value with the whole field logged.
        ("PAT\\C2842\\X^^^CITYHOSP", "unknown escape sequence in PID-3"),
        ("PAT\\M244242\\X^^^CITYHOSP", "unknown escape sequence in PID-3"),
        ("PAT\\.zz\\X^^^CITYHOSP", "unknown escape sequence in PID-3"),
        # A count of spaces: 16 bytes that would become 100 MB.
        ("PAT\\.sk99999999\\X^^^CITYHOSP", "unknown escape sequence in PID-3"),
        # Half a byte of hex would become a control character or a wrong one.
        ("PAT\\X414\\^^^CITYHOSP", "unknown escape sequence in PID-3"),
    ],
)
def test_escapes_python_hl7_would_undo_wrongly_are_refused(
    listener: Listener,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
    patient: str,
    reason: str,
) -> None:
    bad = siu(control_id="BAD1", appointment="APT-BAD", patient=patient)

    msa, err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, bad.encode(), "AE", "BAD1"
    )

    assert msa[3] == reason
    assert err[2:4] == ["PID^1^3", "102^Data type error^HL70357"]


def test_escapes_python_hl7_undoes_are_still_taken(
    listener: Listener, catalog: Catalog
) -> None:
    patient = "A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\\\X4647\\^^^CITYHOSP"
    message = siu(control_id="ESC1", appointment="APT-ESC", patient=patient)

    (ack,) = exchange(listener, message.encode())

    assert segment(ack, "MSA")[1:3] == ["AA", "ESC1"]
    (booked,) = appointments.appointments(catalog)
    assert booked.patients[0].patient_id == "A|B^C&D~E\\FG"


@pytest.mark.parametrize("kind", ["SIU^S12", "ADT^A08"])
def test_a_header_without_its_version_gets_ar_101_with_its_control_id(
    listener: Listener, catalog: Catalog, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # python-hl7 cannot build an ACK without MSH-12: this was an AE 207
    # ("could not be read") with an ERROR line, as if the appliance failed.
    bad = NO_VERSION.format(kind=kind, control_id="NOVER1").encode()

    msa, err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, bad, "AR", "NOVER1"
    )

    assert msa[3] == "no version ID (MSH-12)"
    assert err[2:4] == ["MSH^1^12", "101^Required field missing^HL70357"]


@pytest.mark.parametrize(
    ("charset", "ack_code"), [("", "AE"), ("ASCII", "AE"), ("UNICODE UTF-16", "AR")]
)
def test_a_message_in_another_character_set_is_answered_with_its_control_id(
    listener: Listener,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
    charset: str,
    ack_code: str,
) -> None:
    text = siu(control_id="CS1", appointment="APT-CS")
    text = text.replace("|2.5\r", f"|2.5||||||{charset}\r", 1)
    bad = text.replace("Testperson", "Testp\xe9rson").encode("latin-1")

    msa, err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, bad, ack_code, "CS1"
    )

    assert err[2] == "MSH^1^18"
    assert "character set" in msa[3] or "not ascii" in msa[3] or "utf-8" in msa[3]
    # From whom the message was addressed to, not a fallback sender.
    (again,) = exchange(listener, bad)
    assert segment(again, "MSH")[2:6] == ["PACS", "CITYHOSP", "RIS", "CITYHOSP"]


def test_a_control_character_is_named_by_its_field(
    listener: Listener, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    bad = siu(control_id="CC1", appointment="APT-CC", patient="PAT\x00^^^CITYHOSP")

    msa, err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, bad.encode(), "AE", "CC1"
    )

    # Not "PID\S\1\S\3": the location's separators escaped into the text.
    assert msa[3] == "a control character in PID-3"
    assert err[2] == "PID^1^3"


def test_a_message_without_an_msh_gets_a_bare_ar_ending_in_cr(
    listener: Listener,
) -> None:
    (ack,) = exchange(listener, b"PID|1||PAT-0042\r")

    assert ack.endswith(b"\r")
    assert segment(ack, "MSA")[1] == "AR"


def test_two_messages_in_one_frame_are_refused_not_half_applied(
    listener: Listener, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the first was read and answered AA: the second was lost, and
    # the sender, resending the frame for the missing ACK, lost it again.
    first = siu(control_id="TWO1", appointment="APT-TWO1")
    second = siu(control_id="TWO2", appointment="APT-TWO2")

    msa, err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, (first + second).encode(), "AR", "TWO1"
    )

    assert msa[3] == "a second MSH segment (segment 6): one message per frame"
    assert err[2:4] == ["MSH^2", "100^Segment sequence error^HL70357"]


def test_escapes_are_checked_with_the_escape_character_python_hl7_uses(
    listener: Listener, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    # MSH-2 "^~" names no escape character: python-hl7 takes the default
    # (\), which the check did not, so "PAT\F" was cut to "PAT" unseen.
    bad = siu(control_id="SHORT1", appointment="APT-SHORT", patient="PAT\\F^^^CITY")
    bad = bad.replace("MSH|^~\\&|", "MSH|^~|", 1)

    msa, err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, bad.encode(), "AE", "SHORT1"
    )

    assert msa[3] == "an escape sequence without its end in PID-3"
    assert err[2] == "PID^1^3"


FORGED = "\\X0A\\2026-12-05 23:59:59,000 CRITICAL appliance.fake[1]: forged"


@pytest.mark.parametrize(
    ("place", "ack_code"),
    [("MSH-10", "AE"), ("MSH-3", "AE"), ("MSH-9", "AR"), ("ORC-1", "AR")],
)
def test_an_escaped_line_break_cannot_forge_a_line_of_the_log(
    listener: Listener,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
    place: str,
    ack_code: str,
) -> None:
    # python-hl7 undoes \X0A\ into a line break, which the refusal's
    # warning quoted as it was: a RIS could write lines of its own into the
    # appliance's log.
    message = orm(control_id="INJ1", order="ORD-INJ")
    header = "MSH|^~\\&|RIS|CITYHOSP|"
    message = {
        "MSH-10": message.replace("|INJ1|", f"|INJ1{FORGED}|"),
        "MSH-3": message.replace(header, f"MSH|^~\\&|RIS{FORGED}|CITYHOSP|"),
        "MSH-9": message.replace("|ORM^O01|", f"|ORM{FORGED}^O01|"),
        "ORC-1": message.replace("ORC|NW|", f"ORC|NW{FORGED}|"),
    }[place]
    control_id = f"INJ1{FORGED}" if place == "MSH-10" else "INJ1"

    msa, _err = assert_refused_then_good_one_taken(
        listener, catalog, caplog, message.encode(), ack_code, control_id
    )

    assert all("\n" not in record.getMessage() for record in caplog.records)
    assert "\n" not in msa[3] and "\\X a\\" not in msa[3]


def test_acks_are_stamped_with_the_local_time_and_its_offset(
    listener: Listener,
) -> None:
    # python-hl7 stamps MSH-7 with the UTC time and no offset, which HL7
    # reads as the sender's local time: hours off wherever that is not UTC.
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        accepted, refused = exchange(
            listener,
            siu(control_id="TZ1", appointment="APT-TZ").encode(),
            b"PID|1||PAT-0042\r",
        )
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()

    for ack in (accepted, refused):
        stamp = segment(ack, "MSH")[6]
        assert stamp.endswith("+0900")
        assert abs(parse_time(stamp, "MSH^1^7") - time.time()) < 120
