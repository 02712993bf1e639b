"""The audit trail's parts: messages, the local log, syslog delivery."""

from __future__ import annotations

import multiprocessing
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from appliance import audit
from appliance import config as configuration
from appliance.audit import codes, events
from appliance.audit.log import AuditLog
from appliance.audit.messages import summarize, to_xml
from appliance.audit.sender import Sender
from appliance.audit.syslog import FACILITIES, Destination, TlsSender
from appliance.audit.trail import Trail
from appliance.errors import ConfigError
from tests.syslog_receiver import TlsCollector, UdpCollector, make_certificates

STUDY = events.StudyRef(
    "1.2.3.4",
    patient_id="PID-7",
    patient_name='O\'Brien^Ann <&> "x"\x00',
    accession="ACC\n1",
    sop_classes={"1.2.840.10008.5.1.4.1.1.2": 3},
)
CALLER = events.Peer("MODALITY", "127.0.0.1")


def stored_message() -> str:
    return to_xml(events.instances_stored(CALLER, "APPLIANCE", STUDY))


def test_message_has_the_required_elements() -> None:
    text = stored_message()
    assert "\n" not in text and "\x00" not in text
    root = ET.fromstring(text)
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventActionCode") == "C"
    assert event.get("EventOutcomeIndicator") == "0"
    assert event.get("EventDateTime", "").endswith("Z")
    event_id = event.find("EventID")
    assert event_id is not None
    assert (event_id.get("csd-code"), event_id.get("codeSystemName")) == (
        "110104",
        "DCM",
    )
    participants = root.findall("ActiveParticipant")
    codes = [p.find("RoleIDCode") for p in participants]
    roles = [code.get("csd-code") for code in codes if code is not None]
    assert roles == ["110153", "110152"]
    assert participants[0].get("UserIsRequestor") == "true"
    assert participants[0].get("NetworkAccessPointID") == "127.0.0.1"
    assert participants[0].get("NetworkAccessPointTypeCode") == "2"
    source = root.find("AuditSourceIdentification/AuditSourceTypeCode")
    assert source is not None
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == "1.2.3.4"
    sop_class = study.find("SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == "3"
    accession = study.find("Accession")
    assert accession is not None and accession.get("Number") == "ACC\n1"
    assert patient.get("ParticipantObjectID") == "PID-7"
    # Escaped, and the NUL that XML cannot carry is gone.
    assert patient.findtext("ParticipantObjectName") == 'O\'Brien^Ann <&> "x"'


def test_summary_names_users_patients_and_studies() -> None:
    summary = summarize(stored_message())
    assert summary.patients == ["PID-7"]
    assert summary.studies == ["1.2.3.4"]
    assert summary.users[0] == "MODALITY@127.0.0.1"
    assert summary.event == "DICOM Instances Transferred"


def test_query_carries_the_identifier() -> None:
    message = events.query(
        CALLER,
        "APPLIANCE",
        "1.2.840.10008.5.1.4.1.2.2.1",
        b"\x08\x00\x52\x00",
        "1.2.840.10008.1.2",
        "PID-7",
    )
    root = ET.fromstring(to_xml(message))
    query = root.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert query is not None and query.text == "CABSAA=="
    assert summarize(to_xml(message)).patients == ["PID-7"]


def _append_many(folder: str, writer: int, count: int) -> None:
    trail = Trail(Path(folder), f"W{writer}")
    for _ in range(count):
        trail.record(events.instances_stored(CALLER, f"W{writer}", STUDY))


def test_processes_append_whole_records(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_append_many, args=(str(tmp_path), n, 40))
        for n in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    records = list(AuditLog(tmp_path).records())
    assert len(records) == 160
    for record in records:
        ET.fromstring(record.message)
    assert records[-1].end == AuditLog(tmp_path).size()


def test_a_torn_line_is_ended_and_skipped(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    trail = Trail(tmp_path, "APPLIANCE")
    trail.record(events.application_activity(True, "APPLIANCE"))
    with open(log.path, "ab") as handle:
        handle.write(b'{"time": "2026-')  # a writer killed mid-line
    assert len(log.read_from(0, 10)) == 1  # the torn line is not whole yet
    trail.record(events.application_activity(False, "APPLIANCE"))
    assert [r.event for r in log.records()] == [
        "application-start",
        "application-stop",
    ]


def test_disabled_trail_writes_nothing(tmp_path: Path) -> None:
    Trail(tmp_path, "APPLIANCE", enabled=False).record(
        events.application_activity(True, "APPLIANCE")
    )
    assert not AuditLog(tmp_path).path.exists()


def test_config_checks_the_syslog_keys(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[audit]\nsyslog_transport = "tls"\nkey = "k.pem"\n')
    with pytest.raises(ConfigError) as caught:
        configuration.load(path)
    keys = {key for key, _message in caught.value.problems}
    assert keys == {"audit.syslog_host", "audit.ca_file", "audit.key"}
    assert set(configuration.AUDIT_FACILITIES) == set(FACILITIES)


# -- delivery ----------------------------------------------------------------------


def _record_some(folder: Path, count: int, first: int = 0) -> None:
    trail = Trail(folder, "APPLIANCE")
    for n in range(first, first + count):
        audit.security_alert(trail, f"alert {n}", events.Peer("X", "127.0.0.1"))


def _numbers(messages: list) -> list[int]:  # type: ignore[type-arg]
    found = []
    for message in messages:
        text = message.xml.findtext("EventIdentification/EventOutcomeDescription")
        found.append(int(text.split()[-1]))
    return found


@pytest.fixture
def certs(tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "certs"
    folder.mkdir()
    return make_certificates(folder)


def _tls(port: int, certs, **extra: str) -> Destination:  # type: ignore[no-untyped-def]
    return Destination("tls", "127.0.0.1", port, ca_file=str(certs.ca), **extra)


def test_tls_queue_survives_a_down_collector_and_a_restart(
    tmp_path: Path,
    certs,  # type: ignore[no-untyped-def]
) -> None:
    collector = TlsCollector(certs).start()
    port = collector.port
    collector.stop()  # down before anything is sent
    folder = tmp_path / "audit"
    _record_some(folder, 5)
    sender = Sender(AuditLog(folder), _tls(port, certs), FACILITIES["authpriv"])
    sender.start()
    try:
        time.sleep(1.5)  # a retry or two fail meanwhile
        assert sender.position.sent == 0
        collector.start()
        got = collector.wait_for(5)
        assert _numbers(got) == [0, 1, 2, 3, 4]
        # The collector goes away again; records wait, then arrive in order.
        collector.stop()
        _record_some(folder, 3, first=5)
        collector.start()
        got = collector.wait_for(8)
        assert _numbers(got) == list(range(8))
    finally:
        sender.stop()
    # A new sender (the service started again) sends only what is new.
    _record_some(folder, 2, first=8)
    again = Sender(AuditLog(folder), _tls(port, certs), FACILITIES["authpriv"])
    again.start()
    try:
        got = collector.wait_for(10)
        time.sleep(0.5)
        got = collector.messages()
    finally:
        again.stop()
        collector.stop()
    assert _numbers(got) == list(range(10))
    assert [m.sequence for m in got] == list(range(1, 11))
    first = got[0]
    assert first.pri == 10 * 8 + 4  # authpriv, warning: a security alert
    assert (first.app, first.msgid) == ("pacs-appliance", "DICOM+RFC3881")
    assert first.event_id == "110113"


def test_tls_keeps_its_connection_through_the_collectors_session_tickets(
    certs,  # type: ignore[no-untyped-def]
) -> None:
    # A TLS 1.3 collector sends session tickets after the handshake: bytes
    # to read that are not the collector closing. Taking them for a close
    # and reconnecting threw away the connection with its unread messages.
    collector = TlsCollector(certs).start()
    sender = TlsSender(_tls(collector.port, certs))
    try:
        sender.send(b"first")
        time.sleep(0.5)  # the tickets arrive meanwhile

        assert sender.connected
        sender.send(b"second")
        deadline = time.monotonic() + 10
        while len(collector.frames) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert collector.frames == [b"first", b"second"]
        assert len(collector._connections) == 1

        collector.stop()
        deadline = time.monotonic() + 10
        while sender.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sender.connected
    finally:
        sender.close()
        collector.stop()


def test_tls_refuses_a_collector_the_ca_did_not_sign(
    tmp_path: Path,
    certs,  # type: ignore[no-untyped-def]
) -> None:
    collector = TlsCollector(certs).start()
    folder = tmp_path / "audit"
    _record_some(folder, 2)
    wrong = Destination("tls", "127.0.0.1", collector.port, ca_file=str(certs.other_ca))
    sender = Sender(AuditLog(folder), wrong, FACILITIES["authpriv"])
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while not collector.handshake_failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert collector.handshake_failures
        assert collector.messages() == []
        assert sender.position.sent == 0
    finally:
        sender.stop()
        collector.stop()


def test_tls_with_a_client_certificate(
    tmp_path: Path,
    certs,  # type: ignore[no-untyped-def]
) -> None:
    collector = TlsCollector(certs, require_client=True).start()
    folder = tmp_path / "audit"
    _record_some(folder, 2)
    destination = _tls(
        collector.port,
        certs,
        certificate=str(certs.client_cert),
        key=str(certs.client_key),
    )
    sender = Sender(AuditLog(folder), destination, FACILITIES["local4"])
    sender.start()
    try:
        got = collector.wait_for(2)
    finally:
        sender.stop()
        collector.stop()
    assert _numbers(got) == [0, 1]
    assert got[0].pri == 20 * 8 + 4


def test_udp_delivery(tmp_path: Path) -> None:
    collector = UdpCollector()
    folder = tmp_path / "audit"
    trail = Trail(folder, "APPLIANCE", source_id="ARCHIVE-1")
    audit.application_started(trail)
    trail.record(events.instances_stored(CALLER, "APPLIANCE", STUDY))
    destination = Destination("udp", "127.0.0.1", collector.port)
    sender = Sender(AuditLog(folder), destination, FACILITIES["authpriv"], "archive1")
    sender.start()
    try:
        got = collector.wait_for(2)
    finally:
        sender.stop()
        collector.close()
    assert [m.event_id for m in got] == ["110100", "110104"]
    assert got[0].event_types == ["110120"]
    assert [m.pri for m in got] == [85, 85]
    assert got[0].host == "archive1"
    source = got[1].xml.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "ARCHIVE-1"
    assert codes.PATIENT_NUMBER.code == "2"


def test_the_api_for_patient_changes_and_alerts(tmp_path: Path) -> None:
    trail = Trail(tmp_path, "APPLIANCE")
    ris = events.Peer("RIS", "192.0.2.3")
    audit.patient_record_changed(
        trail, codes.UPDATE, "PID-1", "Doe^Jane", "ADT^A08", source=ris
    )
    audit.patient_record_changed(
        trail,
        codes.UPDATE,
        "PID-1",
        description="ADT^A40",
        other_patient_ids=["PID-OLD"],
    )
    audit.security_alert(trail, "TLS handshake failed", events.Peer("CT1", "::1"))
    records = list(trail.log.records())
    assert [r.event for r in records] == [
        "patient-record",
        "patient-record",
        "security-alert",
    ]
    update, merge, alert = (summarize(r.message) for r in records)
    assert (update.action, update.patients) == ("U", ["PID-1"])
    assert update.users[0] == "RIS@192.0.2.3"
    assert merge.patients == ["PID-1", "PID-OLD"]
    assert alert.outcome == 4 and alert.users[0] == "CT1@::1"
    assert alert.description == "TLS handshake failed"
    root = ET.fromstring(records[2].message)
    kind = root.find("EventIdentification/EventTypeCode")
    assert kind is not None and kind.get("csd-code") == "110126"
    point = root.find("ActiveParticipant[@UserID='CT1']")
    assert point is not None and point.get("NetworkAccessPointTypeCode") == "2"


def test_a_move_names_the_destination_and_the_requestor() -> None:
    viewer = events.Peer("VIEWER", "192.0.2.20")
    message = events.instances_retrieved(CALLER, "APPLIANCE", viewer, STUDY)
    root = ET.fromstring(to_xml(message))
    found = {}
    for participant in root.findall("ActiveParticipant"):
        role = participant.find("RoleIDCode")
        code = role.get("csd-code") if role is not None else None
        found[participant.get("UserID")] = (participant.get("UserIsRequestor"), code)
    assert found == {
        "APPLIANCE": ("false", "110153"),
        "VIEWER": ("false", "110152"),
        "MODALITY": ("true", None),
    }
