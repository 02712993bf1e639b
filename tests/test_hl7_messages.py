"""Reading SIU, ORM and OMI messages into appointments, and the variants
senders produce."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

import pytest

from appliance.hl7 import acks, messages
from appliance.hl7.messages import MessageError, PatientIdentifier
from tests.hl7_samples import omi, orm, siu


def read(text: str) -> messages.ScheduleMessage:
    return messages.read(messages.parse(text.encode()))


def local(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y%m%d%H%M%S"))


def test_a_booking_gives_the_appointment_time_patient_and_procedure() -> None:
    booked = read(siu())

    assert booked.action == "book" and booked.state == "booked"
    assert booked.appointment_id == "appointment:APT1001"
    assert booked.control_id == "MSG0001"
    assert booked.sender == "RIS^CITYHOSP"
    assert booked.start == local("20270115093000")
    assert booked.patients == (PatientIdentifier("PAT-0042", "CITYHOSP"),)
    assert (booked.procedure_code, booked.procedure_text) == (
        "CTHEAD",
        "CT head without contrast",
    )


@pytest.mark.parametrize(
    ("event", "action", "state"),
    [
        ("S13", "book", "rescheduled"),
        ("S14", "book", "modified"),
        ("S15", "cancel", "cancelled"),
        ("S17", "cancel", "deleted"),
        ("S26", "cancel", "no-show"),
    ],
)
def test_every_siu_event(event: str, action: str, state: str) -> None:
    found = read(siu(event=event))

    assert (found.action, found.state) == (action, state)


@pytest.mark.parametrize("separator", ["\n", "\r\n"])
def test_lf_or_crlf_between_segments(separator: str) -> None:
    text = siu().replace("\r", separator)

    assert read(text).start == local("20270115093000")


def test_a_trailing_empty_segment_and_blank_lines() -> None:
    text = siu() + "\r\r   \r"

    assert read(text).appointment_id == "appointment:APT1001"


def test_every_repetition_of_pid3_is_a_patient_identifier() -> None:
    text = siu(
        patient="PAT-0042^^^CITYHOSP^MR~99-12^^^REGION^PI~PAT-0042^^^CITYHOSP^MR"
    )

    assert read(text).patients == (
        PatientIdentifier("PAT-0042", "CITYHOSP"),
        PatientIdentifier("99-12", "REGION"),
    )


@pytest.mark.parametrize(("build", "repeated"), [(siu, "AIS"), (orm, "OBR")])
def test_many_identifiers_among_many_segments_are_read_at_once(
    build: Callable[..., str], repeated: str
) -> None:
    others = "~".join(f"PAT-X{n}^^^OTHER" for n in range(2000))
    text = build(patient=f"PAT-0042^^^CITYHOSP^MR~{others}")
    # Segments not read, and more of a kind read of which only the first is.
    text += "".join(f"ZXX|{n}\r{repeated}|{n + 2}\r" for n in range(8000))

    started = time.monotonic()
    found = read(text)
    took = time.monotonic() - started

    # Each repetition was looked up across every segment: about 40 s.
    assert took < 5
    assert len(found.patients) == 2001
    assert found.patients[0] == PatientIdentifier("PAT-0042", "CITYHOSP")


def test_escape_sequences_are_undone() -> None:
    text = siu(patient="PAT\\F\\1\\S\\2\\T\\3\\E\\^^^CITY\\T\\HOSP")

    assert read(text).patients == (PatientIdentifier("PAT|1^2&3\\", "CITY&HOSP"),)


def test_tq1_7_wins_and_stands_in_for_a_missing_sch11() -> None:
    both = read(siu(tq1="20270201120000"))
    tq1_only = read(siu(sch11="", tq1="20270202120000"))
    ais_only = read(siu(sch11=""))

    assert both.start == local("20270201120000")
    assert tq1_only.start == local("20270202120000")
    assert ais_only.start == local("20270115093000")


def test_a_time_zone_offset_is_honoured() -> None:
    found = read(omi(when="20270117080000+0100"))

    assert found.start == calendar.timegm((2027, 1, 17, 7, 0, 0, 0, 0, 0))


def test_orm_order_with_accession_modality_and_order_time() -> None:
    found = read(orm())

    assert found.appointment_id == "order:ORD5001"
    assert (found.action, found.state) == ("book", "booked")
    assert found.start == local("20270116140000")
    assert (found.modality, found.accession) == ("MR", "ACC7001")
    assert found.requested_procedure_id == "RPORD5001"
    assert found.procedure_code == "MRBRAIN"


@pytest.mark.parametrize(
    ("control", "action"),
    [
        ("NW", "book"),
        ("XO", "book"),
        ("CA", "cancel"),
        ("DC", "cancel"),
        ("SC", "ignore"),
    ],
)
def test_order_controls(control: str, action: str) -> None:
    assert read(orm(control=control)).action == action


def test_omi_takes_accession_and_modality_from_ipc() -> None:
    found = read(omi())

    assert (found.accession, found.modality) == ("ACC9001", "CR")
    assert found.requested_procedure_id == "RP9001"
    assert found.patients == (PatientIdentifier("PAT-0077", "CITYHOSP"),)


@pytest.mark.parametrize(
    ("text", "ack_code", "error_code", "words"),
    [
        (siu().replace("SIU^S12", "ADT^A01"), "AR", "200", "ADT^A01"),
        (siu(event="S99"), "AR", "201", "SIU^S99"),
        (orm(control="ZZ"), "AR", "201", "order control ZZ"),
        (siu(patient=""), "AE", "101", "PID-3"),
        (siu(sch11="", ais="AIS|1||CTHEAD"), "AE", "101", "appointment time"),
        (siu(sch11="^^30^tomorrow"), "AE", "102", "not an HL7 date"),
        (siu(sch11="^^30^20271341250000"), "AE", "102", "month out of range"),
        (siu(sch11="^^30^20270230120000"), "AE", "102", "day out of range"),
        (siu(appointment=""), "AE", "101", "SCH-1"),
        (siu(control_id=""), "AR", "101", "MSH-10"),
        ("PID|1||X\r", "AR", "100", "no MSH"),
        (siu(sch11="^^30^20270115093000+2500"), "AE", "102", "time zone"),
        (siu(sch11="^^30^00010101"), "AE", "102", "year out of range"),
        (siu(sch11="^^30^2027"), "AE", "102", "not an HL7 date"),
        (siu(appointment="APT-\\Z\\"), "AE", "102", "unknown escape"),
        (siu(patient="PAT\\X00\\1^^^"), "AE", "102", "control character"),
        (siu().replace("|P|2.5", "|P|2.5||||||KOI8"), "AR", "102", "KOI8"),
    ],
    ids=[
        "unknown-type",
        "unknown-event",
        "unknown-order-control",
        "no-patient",
        "no-time",
        "bad-time",
        "bad-month",
        "impossible-date",
        "no-appointment-id",
        "no-control-id",
        "no-msh",
        "zone-offset",
        "year-one",
        "year-only",
        "unknown-escape",
        "escaped-nul",
        "charset",
    ],
)
def test_problems_are_named_with_the_hl7_codes(
    text: str, ack_code: str, error_code: str, words: str
) -> None:
    with pytest.raises(MessageError) as raised:
        read(text)

    assert raised.value.ack_code == ack_code
    assert raised.value.error_code == error_code
    assert words in raised.value.reason


def test_ack_fields() -> None:
    parsed = messages.parse(siu(control_id="CTRL-77").encode())

    accepted = acks.accept(parsed).decode().split("\r")
    refused = acks.refuse(
        parsed, MessageError("AE", "101", "PID^1^3", "no patient | here")
    ).decode()

    msh = accepted[0].split("|")
    assert msh[2:6] == ["PACS", "CITYHOSP", "RIS", "CITYHOSP"]
    assert msh[8] == "ACK^S12^ACK"
    assert accepted[1] == "MSA|AA|CTRL-77"
    segments = refused.split("\r")
    assert segments[1] == "MSA|AE|CTRL-77|no patient \\F\\ here"
    err = segments[2].split("|")
    assert err[2] == "PID^1^3"
    assert err[3] == "101^Required field missing^HL70357"
    assert err[4] == "E"
    assert err[8] == "no patient \\F\\ here"


def test_latin_1_is_read_when_msh18_says_so_and_refused_otherwise() -> None:
    declared = siu(patient="M\u00fcller01^^^").replace("|P|2.5", "|P|2.5||||||8859/1")
    undeclared = siu(patient="M\u00fcller01^^^")

    found = messages.read(messages.parse(declared.encode("latin-1")))
    with pytest.raises(MessageError) as refused:
        messages.parse(undeclared.encode("latin-1"))

    assert found.patients == (PatientIdentifier("M\u00fcller01", ""),)
    assert refused.value.ack_code == "AE" and "not utf-8" in refused.value.reason


def test_a_header_without_a_message_type_still_gets_an_ack() -> None:
    raw = b"MSH|^~\\&|RIS|CITYHOSP|PACS|CITYHOSP|20261204120000|||C-NO9|P|2.5\r"
    parsed = messages.parse(raw)

    with pytest.raises(MessageError) as refused:
        messages.read(parsed)
    ack = acks.refuse(parsed, refused.value).decode()

    assert "\rMSA|AR|C-NO9|" in ack
    assert "\rERR||MSH^1^9|101^" in ack


def test_an_unknown_escape_is_named_by_its_field_not_quoted() -> None:
    text = siu().replace("Testperson^Alma", "Testperson\\Hidden\\x^Alma")
    assert "Hidden" in text
    with pytest.raises(MessageError) as raised:
        read(text)
    assert raised.value.error_code == "102"
    assert raised.value.location == "PID^1^5"
    assert raised.value.reason == "unknown escape sequence in PID-5"
    # The ACK is built from the header alone: the sender can match it.
    header = raised.value.header
    assert header is not None
    control_id = str(header["MSH.F10"])
    assert control_id
    ack = acks.refuse(header, raised.value).decode()
    assert f"\rMSA|AE|{control_id}|" in ack
    assert "\rERR||PID^1^5|102^" in ack
    assert "Hidden" not in ack


def test_escape_sequences_end_at_the_messages_own_field_separator() -> None:
    # Two lone escape characters, at the end of PID-5 and PID-8, are not one
    # sequence across the fields between them, whichever character
    # separates the fields: the first is a sequence left open in PID-5
    # (python-hl7 would drop the rest of that value).
    text = (
        siu()
        .replace("Testperson^Alma", "Testperson\\^Alma")
        .replace("||19700101|F", "||19700101|F\\")
    )

    for separator in ("|", "#"):
        with pytest.raises(MessageError) as raised:
            read(text.replace("|", separator))
        assert raised.value.location == "PID^1^5"
        assert raised.value.reason == "an escape sequence without its end in PID-5"
