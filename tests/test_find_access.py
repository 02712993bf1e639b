"""C-FIND from a caller that may store but not query (``access.query``).

Such a caller gets no Query/Retrieve presentation context. pynetdicom picks
the service for a request by the SOP class the request names, not by the
context it comes on, so a C-FIND sent on the caller's storage context
reached the C-FIND service, which answered every match: a modality allowed
to store could read the archive's patients. It is refused with 0x0124, as
C-MOVE and C-GET already were, now each with one log line.

All patients, names and IDs are made up.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.test_store_wire import associate_rq, p_data, read_pdu

STUDY_FIND = client.STUDY_FIND
STUDY_MOVE = client.STUDY_MOVE
C_FIND = 0x0020
C_MOVE = 0x0021
NOT_AUTHORISED = 0x0124
PENDING = 0xFF00
# (0000,0900) Status, US, in an Implicit VR Little Endian command set.
STATUS_TAG = b"\x00\x00\x00\x09\x02\x00\x00\x00"


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("find-access")
    settings = {
        "replication": {"enabled": False},
        "access": {"restrict_query": True, "query": ["READER"]},
    }
    peers = [
        {"ae_title": "WIRE", "host": "127.0.0.1", "port": 104},
        {"ae_title": "READER", "host": "127.0.0.1", "port": 105},
    ]
    node = Appliance(root / "appliance", settings, peers)
    node.directory.mkdir()
    node.start()
    try:
        paths = datasets.study_files(root / "files", "find-access", 2)
        assert set(client.store_files(node.port, paths, "WIRE").values()) == {0}
        yield node
    finally:
        node.stop()


def _implicit(dataset: Dataset) -> bytes:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, dataset)
    return encoded.getvalue()


def _explicit(dataset: Dataset) -> bytes:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, dataset)
    return encoded.getvalue()


def _request(sop_class: str, field: int) -> bytes:
    """A C-FIND-RQ (PS3.7 9.3.2.1) or C-MOVE-RQ (9.3.4.1) command set; a
    move names READER, a known peer, as its destination."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = field
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0001
    if field == C_MOVE:
        command.MoveDestination = "READER"
    body = _implicit(command)
    length = Dataset()
    length.CommandGroupLength = len(body)
    return _implicit(length) + body


def _statuses_on_the_storage_context(
    port: int, sop_class: str, field: int
) -> list[int]:
    """The statuses answered to a request sent on context 1, CT storage."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientID = ""
    statuses: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(associate_rq())
        assert read_pdu(connection)[0] == 0x02  # A-ASSOCIATE-AC
        connection.sendall(p_data(0x03, _request(sop_class, field)))
        connection.sendall(p_data(0x02, _explicit(identifier)))
        while not statuses or statuses[-1] == PENDING:
            kind, body = read_pdu(connection)
            assert kind == 0x04, f"PDU type 0x{kind:02X} instead of an answer"
            if STATUS_TAG in body:
                at = body.index(STATUS_TAG) + len(STATUS_TAG)
                statuses.append(struct.unpack("<H", body[at : at + 2])[0])
        connection.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4)
        read_pdu(connection)  # A-RELEASE-RP
    return statuses


@pytest.mark.parametrize(
    ("sop_class", "field", "what"),
    [(STUDY_FIND, C_FIND, "C-FIND"), (STUDY_MOVE, C_MOVE, "retrieve")],
)
def test_a_storage_only_caller_is_refused_on_its_storage_context(
    appliance: Appliance, sop_class: str, field: int, what: str
) -> None:
    start = len(appliance.log())
    statuses = _statuses_on_the_storage_context(appliance.port, sop_class, field)
    assert statuses == [NOT_AUTHORISED]
    log = appliance.log()[start:]
    refusals = [line for line in log.splitlines() if " WARNING " in line]
    assert len(refusals) == 1, refusals
    assert f"{what} from WIRE@127.0.0.1 refused" in refusals[0]


def test_a_caller_allowed_to_query_still_finds(appliance: Appliance) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = datasets.uid("study", "find-access")
    matches, status = client.find(appliance.port, query, ae_title="READER")
    assert status == 0 and len(matches) == 1
