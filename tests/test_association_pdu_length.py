"""Peers that announce a Maximum Length Received too short for any message.

A P-DATA-TF carries a message in presentation data value items of a length
(4 bytes), a presentation context ID and a message control header (1 byte
each) and at least one byte of the message (PS3.8 9.3.5, E.2): a peer that
takes at most 1 to 6 bytes per PDU can be sent nothing. Such a requester
is rejected at association, with one log line; before, its association was
accepted and the first answer failed inside pynetdicom with a traceback.
A C-MOVE destination that answers so fails the move with one log line,
where the move's handler failed and its requester got no final response.
Zero (no limit) and 7 bytes are served.

All patients, names and IDs are made up.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.ports import held_port

CT = datasets.CT_IMAGE_STORAGE
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = b"1.2.840.10008.1.2"
ALL_FAILED = 0xA702
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
INSTANCES = 3


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("pdu-length")
    # Held for the module: the destination listens only in its test.
    destination = held_port()
    peers = [{"ae_title": "TINYPDU", "host": "127.0.0.1", "port": destination.port}]
    node = Appliance(root / "appliance", {"replication": {"enabled": False}}, peers)
    node.directory.mkdir()
    node.start()
    try:
        paths = datasets.study_files(
            root / "files", "pdu-length", INSTANCES, patient_id="PDU-01"
        )
        assert set(client.store_files(node.port, paths).values()) == {0}
        yield node
    finally:
        node.stop()
        destination.release()


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _associate_rq(maximum: int) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification announcing
    ``maximum`` as its Maximum Length Received."""
    context = _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT)
    user = _item(0x51, struct.pack(">L", maximum)) + _item(0x52, b"1.2.3.4")
    body = struct.pack(">HH", 1, 0) + b"APPLIANCE".ljust(16) + b"TINY".ljust(16)
    body += b"\x00" * 32 + _item(0x10, b"1.2.840.10008.3.1.1.1")
    body += _item(0x20, bytes([1, 0, 0, 0]) + context) + _item(0x50, user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _answer(port: int, maximum: int) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(_associate_rq(maximum))
        header = connection.recv(6, socket.MSG_WAITALL)
        kind, _reserved, length = struct.unpack(">BBL", header)
        return kind, connection.recv(length, socket.MSG_WAITALL)


def _problems(appliance: Appliance, start: int) -> list[str]:
    log = appliance.log()[start:]
    assert "Traceback" not in log
    return [line for line in log.splitlines() if " INFO " not in line]


@pytest.mark.parametrize("maximum", [1, 6])
def test_a_requester_that_takes_too_short_a_pdu_is_rejected(
    appliance: Appliance, maximum: int
) -> None:
    start = len(appliance.log())
    kind, body = _answer(appliance.port, maximum)
    assert kind == A_ASSOCIATE_RJ
    # Result, source, reason: permanent, service user, no reason given.
    assert body[1:4] == bytes([0x01, 0x01, 0x01])
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert "rejected" in problems[0] and f"at most {maximum} bytes" in problems[0]
    assert client.echo(appliance.port) == 0


@pytest.mark.parametrize("maximum", [0, 7])
def test_no_limit_and_the_shortest_usable_pdu_are_served(
    appliance: Appliance, maximum: int
) -> None:
    ae = AE(ae_title="TINY")
    ae.maximum_pdu_size = maximum
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(client.STUDY_FIND)
    assoc = ae.associate("127.0.0.1", appliance.port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = datasets.uid("study", "pdu-length")
        query.PatientID = ""
        statuses = [
            (int(status.Status), found.PatientID if found else None)
            for status, found in assoc.send_c_find(query, client.STUDY_FIND)
        ]
        assert statuses == [(0xFF00, "PDU-01"), (0x0000, None)]
    finally:
        assoc.release()


def test_a_move_destination_that_takes_too_short_a_pdu_fails_with_one_line(
    appliance: Appliance,
) -> None:
    port = next(p["port"] for p in appliance.peers if p["ae_title"] == "TINYPDU")
    destination = AE(ae_title="TINYPDU")
    destination.maximum_pdu_size = 6
    destination.add_supported_context(CT, ALL_TRANSFER_SYNTAXES)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = destination.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = datasets.uid("study", "pdu-length")
    start = len(appliance.log())
    try:
        responses = client.move(appliance.port, identifier, "TINYPDU")
    finally:
        server.shutdown()

    assert received == []
    final = responses[-1]
    assert int(final.Status) == ALL_FAILED
    assert final.NumberOfFailedSuboperations == INSTANCES
    assert final.NumberOfCompletedSuboperations == 0
    deadline = time.monotonic() + 20
    while "association from TESTCLIENT" not in appliance.log()[start:]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert "TINYPDU" in problems[0] and "at most 6 bytes" in problems[0]
    assert client.echo(appliance.port) == 0
