"""The audit trail of a running appliance: real DICOM peers store, query
and retrieve; the records reach a syslog collector over TLS, also after the
collector was down and across a restart of the appliance."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE

from appliance.audit.rotation import LOCK_NAME
from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import CT_IMAGE_STORAGE, study_files, uid
from tests.syslog_receiver import Syslog, TlsCollector, make_certificates


def _tls_settings(  # type: ignore[no-untyped-def]
    tmp_path: Path, collector_port: int, certs
) -> dict:
    return {
        "audit": {
            "syslog_transport": "tls",
            "syslog_host": "127.0.0.1",
            "syslog_port": collector_port,
            "ca_file": str(certs.ca),
        }
    }


def _certs(tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "certs"
    folder.mkdir()
    return make_certificates(folder)


def _study_query(**keys: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


def _kind(message: Syslog) -> tuple[str, str]:
    event = message.xml.find("EventIdentification")
    assert event is not None
    return message.event_id, event.get("EventActionCode", "")


def _objects(message: Syslog, id_type: str) -> list:  # type: ignore[type-arg]
    return [
        item
        for item in message.xml.findall("ParticipantObjectIdentification")
        if (code := item.find("ParticipantObjectIDTypeCode")) is not None
        and code.get("csd-code") == id_type
    ]


def _show(appliance: Appliance, *options: str) -> list[dict]:  # type: ignore[type-arg]
    output = appliance.cli("audit", "show", "--json", *options).stdout
    return [json.loads(line) for line in output.splitlines()]


def test_store_find_get_and_rejection_are_audited(
    appliance_factory, tmp_path: Path
) -> None:
    certs = _certs(tmp_path)
    collector = TlsCollector(certs).start()
    try:
        appliance = appliance_factory(
            settings=_tls_settings(tmp_path, collector.port, certs)
        ).start()
        first = study_files(
            tmp_path / "a", "audit-a", 3, patient_id="AUD-1", patient_name="Audit^A"
        )
        second = study_files(
            tmp_path / "b", "audit-b", 2, patient_id="AUD-2", accession="ACC-B"
        )
        statuses = dicom_client.store_files(appliance.port, first + second)
        assert set(statuses.values()) == {0}
        matches, final = dicom_client.find(
            appliance.port, _study_query(PatientID="AUD-1")
        )
        assert final == 0 and len(matches) == 1
        retrieve = Dataset()
        retrieve.QueryRetrieveLevel = "STUDY"
        retrieve.StudyInstanceUID = uid("study", "audit-a")
        received, _responses = dicom_client.get(
            appliance.port, retrieve, dicom_client.storage_contexts_for(first)
        )
        assert len(received) == 3
        with dicom_client.associate(
            appliance.port, [(dicom_client.Verification, [])], called="NOT-US"
        ) as refused:
            assert not refused.is_established

        got = collector.wait_for(6)
    finally:
        collector.stop()

    assert len(got) == 6, [_kind(m) for m in got]
    assert _kind(got[0]) == ("110100", "E")
    assert got[0].event_types == ["110120"]
    kinds = sorted(_kind(m) for m in got[1:])
    assert kinds == [
        ("110104", "C"),
        ("110104", "C"),
        ("110104", "R"),
        ("110112", "E"),
        ("110113", "E"),
    ]
    stored = {
        _objects(m, "110180")[0].get("ParticipantObjectID"): m
        for m in got
        if _kind(m) == ("110104", "C")
    }
    study_b = stored[uid("study", "audit-b")]
    sop_class = _objects(study_b, "110180")[0].find("SOPClass")
    assert sop_class.get("UID") == CT_IMAGE_STORAGE
    assert sop_class.get("NumberOfInstances") == "2"
    accession = _objects(study_b, "110180")[0].find("Accession")
    assert accession.get("Number") == "ACC-B"
    assert _objects(study_b, "2")[0].get("ParticipantObjectID") == "AUD-2"
    source = study_b.xml.find("ActiveParticipant")
    assert source.get("UserID") == dicom_client.CLIENT_AE
    assert source.get("UserIsRequestor") == "true"

    (alert,) = [m for m in got if m.event_id == "110113"]
    assert alert.pri == 10 * 8 + 4
    assert "NOT-US" in alert.xml.findtext("EventIdentification/EventOutcomeDescription")
    (retrieved,) = [m for m in got if _kind(m) == ("110104", "R")]
    count = _objects(retrieved, "110180")[0].find("SOPClass").get("NumberOfInstances")
    assert count == "3"

    # audit show filters by patient, event and time.
    names = [r["name"] for r in _show(appliance, "--patient", "AUD-1")]
    assert sorted(names) == ["instances-retrieved", "instances-stored", "query"]
    alerts = _show(appliance, "--event", "security-alert")
    assert len(alerts) == 1 and alerts[0]["outcome"] == 4
    assert _show(appliance, "--since", "2999-01-01") == []
    table = appliance.cli("audit", "show", "--patient", "AUD-2").stdout
    assert "Audit records: 1" in table


def test_records_wait_for_the_collector_and_survive_a_restart(
    appliance_factory, tmp_path: Path
) -> None:
    certs = _certs(tmp_path)
    collector = TlsCollector(certs).start()
    port = collector.port
    collector.stop()
    appliance = appliance_factory(settings=_tls_settings(tmp_path, port, certs)).start()
    try:
        for patient in ("NOBODY-1", "NOBODY-2"):
            _matches, final = dicom_client.find(
                appliance.port, _study_query(PatientID=patient)
            )
            assert final == 0
        assert len(_show(appliance)) == 3  # kept while the collector is down
        assert collector.messages() == []
        status = appliance.cli("audit", "status").stdout
        assert "0 record(s) sent" in status
        assert "waiting: 4 record(s)" in status  # audit show is recorded too

        collector.start()
        assert len(collector.wait_for(4)) == 4
        appliance.stop()
        appliance.start()
        dicom_client.find(appliance.port, _study_query(PatientID="NOBODY-3"))
        got = collector.wait_for(7)
        appliance.stop()
        got = collector.wait_for(8)
    finally:
        collector.stop()

    kinds = [(m.event_id, m.event_types) for m in got]
    assert kinds == [
        ("110100", ["110120"]),
        ("110112", []),
        ("110112", []),
        ("110101", []),
        ("110100", ["110121"]),
        ("110100", ["110120"]),
        ("110112", []),
        ("110100", ["110121"]),
    ]
    assert [m.sequence for m in got] == list(range(1, 9))
    assert len({ET.tostring(m.xml) for m in got}) == 8
    patients = [
        _objects(m, "2")[0].get("ParticipantObjectID")
        for m in got
        if m.event_id == "110112"
    ]
    assert patients == ["NOBODY-1", "NOBODY-2", "NOBODY-3"]


@contextlib.contextmanager
def _audit_log_held(appliance: Appliance) -> Iterator[None]:
    """The audit log's lock held, as a slow flush or a rotation holds it:
    whatever the appliance records waits meanwhile."""
    folder = appliance.data_dir / "audit"
    folder.mkdir(exist_ok=True)
    lock = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _client() -> AE:
    ae = AE(ae_title=dicom_client.CLIENT_AE)
    # Waiting for the lock (held until the test ends), the answer would come
    # only once the caller has given up: an abort, not a rejection. Long
    # enough for a worker's first answer on a busy machine.
    ae.acse_timeout = 30
    ae.add_requested_context(dicom_client.Verification)
    return ae


def test_a_rejected_caller_is_answered_while_the_audit_log_waits(
    appliance: Appliance,
) -> None:
    """The security alert of a rejection is written after the answer: a
    caller is not kept waiting on the audit log's disk (here, its lock)."""
    with _audit_log_held(appliance):
        refused = _client().associate("127.0.0.1", appliance.port, ae_title="NOT-US")
        assert refused.is_rejected

    # Once the lock is free, the alert is recorded all the same.
    deadline = time.monotonic() + 30
    while not _show(appliance, "--event", "security-alert"):
        assert time.monotonic() < deadline, "the rejection was never audited"
        time.sleep(0.2)
    assert dicom_client.echo(appliance.port) == 0


def test_a_caller_is_admitted_while_a_rejection_waits_for_the_audit_log(
    appliance_factory,
) -> None:
    """A rejected caller already answered, whose alert still waits for the
    audit log, holds no place under node.max_associations: the next caller
    is admitted, not refused with no log line and no alert."""
    appliance = appliance_factory(
        settings={"node": {"max_associations": 1}}, workers=1
    ).start()
    ae = _client()
    with _audit_log_held(appliance):
        refused = ae.associate("127.0.0.1", appliance.port, ae_title="NOT-US")
        assert refused.is_rejected
        time.sleep(1)
        admitted = ae.associate("127.0.0.1", appliance.port, ae_title="APPLIANCE")
        established = admitted.is_established
        if established:
            admitted.abort()
    assert established, appliance.log()[-2000:]
