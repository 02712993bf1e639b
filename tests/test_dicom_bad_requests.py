"""C-MOVE and C-GET requests the appliance cannot serve, sent by pynetdicom
exactly as a faulty requester would put them on the wire.

Each must get one failure response with an Error Comment, one log line,
and leave the association usable: 0xA801 for a Move Destination that is
no configured peer (empty, blank, missing, malformed, of several values or
unknown, PS3.4 C.4.2.1.5), 0xA900 for an identifier without a valid level
and unique key, 0xC000 for one that cannot be decoded.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.ports import held_port

STUDY_MOVE = client.STUDY_MOVE
STUDY_GET = client.STUDY_GET
UNKNOWN_DESTINATION = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
# A configured peer; nothing listens there, and no test gets as far as
# opening an association to it.
PEER = "PYDEST"


def _implicit(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element; ``value`` as it comes."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


STUDY_LEVEL = _implicit(0x00080052, b"STUDY ")
# A StudyInstanceUID that claims 256 bytes of which 8 follow: pydicom reads
# it without complaint as "1.2.3.4".
TRUNCATED_UID = STUDY_LEVEL + b"\x20\x00\x0d\x00\x00\x01\x00\x00" + b"1.2.3.4\x00"
# Rows (US) with three bytes of value: not a whole number of values.
ODD_LENGTH = STUDY_LEVEL + _implicit(0x00280010, b"\x01\x02\x03")


@pytest.fixture(scope="module")
def archive(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Appliance, Dataset]]:
    """An appliance with one study of two instances and one known peer."""
    root = tmp_path_factory.mktemp("bad-requests")
    # Nothing is to listen there: held for the module, so nothing else can.
    peer = held_port()
    peers = [{"ae_title": PEER, "host": "127.0.0.1", "port": peer.port}]
    settings = {"replication": {"enabled": False}}
    appliance = Appliance(root / "appliance", settings, peers)
    appliance.directory.mkdir()
    appliance.start()
    try:
        study = datasets.uid("study", "bad-requests")
        series = datasets.uid("series", "bad-requests")
        paths = [
            datasets.write(datasets.instance(study, series, n), root / "source")
            for n in (1, 2)
        ]
        assert set(client.store_files(appliance.port, paths).values()) == {0}
        yield appliance, datasets.instance(study, series, 1)
    finally:
        appliance.stop()
        peer.release()


def identifier_bytes(level: str | None, **keys: object) -> bytes:
    dataset = Dataset()
    if level is not None:
        dataset.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(dataset, keyword, value)
    encoded = encode(dataset, True, True, False)
    assert encoded is not None
    return encoded


def send_raw(
    assoc: Association,
    model: str,
    identifier: bytes,
    destination: str | None = PEER,
) -> list[Dataset]:
    """Send a C-GET or C-MOVE (``model`` says which) as it is: the Move
    Destination and identifier reach the appliance unchecked. Returns the
    response statuses."""
    context = assoc._get_valid_context(model, "", "scu")
    request = C_MOVE() if model == STUDY_MOVE else C_GET()
    request.MessageID = 9
    request.AffectedSOPClassUID = model
    request.Priority = 2
    if isinstance(request, C_MOVE):
        # Bypasses pynetdicom's check; None leaves the element out.
        request._move_destination = destination
    request.Identifier = BytesIO(identifier)

    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, context.context_id)
    responses = assoc._wrap_get_move_responses(context.transfer_syntax[0])
    statuses = [status for status, _identifier in responses if status]
    # The next send_*() waits until the reactor pauses; a reactor that has
    # not yet seen this request's end still looks paused, and would take
    # that request's response for itself.
    deadline = time.monotonic() + 1
    while assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    return statuses


@contextmanager
def open_association(appliance: Appliance) -> Iterator[Association]:
    contexts = [
        (STUDY_MOVE, [ImplicitVRLittleEndian]),
        (STUDY_GET, [ImplicitVRLittleEndian]),
        (client.STUDY_FIND, []),
        (client.Verification, []),
    ]
    with client.associate(appliance.port, contexts) as assoc:
        assert assoc.is_established
        # A request that goes unanswered fails the test in seconds.
        assoc.dimse_timeout = 10
        yield assoc


def assert_association_usable(assoc: Association, study_uid: str) -> None:
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    query = client.study_identifier(StudyInstanceUID=study_uid)
    found = list(assoc.send_c_find(query, client.STUDY_FIND))
    assert [int(status.Status) for status, _ in found] == [0xFF00, 0x0000]


def new_lines(appliance: Appliance, start: int) -> list[str]:
    return [
        line
        for line in appliance.log()[start:].splitlines()
        if "appliance.dicom" in line or "pynetdicom" in line
    ]


DESTINATIONS = {
    "empty": ("", "no move destination given", "without a move destination"),
    "blank": ("    ", "no move destination given", "without a move destination"),
    "missing": (None, "no move destination given", "without a move destination"),
    "too long": (
        "ABCDEFGHIJKLMNOPQ",
        "unknown move destination",
        "unknown destination 'ABCDEFGHIJKLMNOPQ'",
    ),
    "unknown": ("NOWHERE", "unknown move destination", "unknown destination"),
    # Two AE titles, the first a configured peer: pynetdicom took that one
    # (with a line of its own) and the move went to it.
    "two values": (
        f"{PEER}\\OTHER",
        "unknown move destination",
        f"unknown destination '{PEER}\\\\OTHER'",
    ),
}


@pytest.mark.parametrize("case", list(DESTINATIONS), ids=list(DESTINATIONS))
def test_move_to_no_known_peer_is_refused_and_the_association_kept(
    archive: tuple[Appliance, Dataset], case: str
) -> None:
    appliance, instance = archive
    destination, comment, logged = DESTINATIONS[case]
    study_uid = str(instance.StudyInstanceUID)
    identifier = identifier_bytes("STUDY", StudyInstanceUID=study_uid)
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        with datasets.unvalidated():
            statuses = send_raw(assoc, STUDY_MOVE, identifier, destination)
        assert [int(status.Status) for status in statuses] == [UNKNOWN_DESTINATION]
        assert statuses[0].ErrorComment == comment
        assert_association_usable(assoc, study_uid)

    lines = new_lines(appliance, start)
    refusals = [line for line in lines if "WARNING" in line]
    assert len(refusals) == 1, lines
    assert logged in refusals[0]
    assert not [line for line in lines if "pynetdicom" in line or "ERROR" in line]


UID_LIST = [datasets.uid("instance", n) for n in (1, 2)]
IDENTIFIERS = {
    "no level": (
        identifier_bytes(None, StudyInstanceUID="1.2.3"),
        IDENTIFIER_DOES_NOT_MATCH,
        "QueryRetrieveLevel '' is not one of STUDY, SERIES, IMAGE",
    ),
    "unknown level": (
        identifier_bytes("FOO", StudyInstanceUID="1.2.3"),
        IDENTIFIER_DOES_NOT_MATCH,
        "QueryRetrieveLevel 'FOO' is not one of",
    ),
    "patient level in study root": (
        identifier_bytes("PATIENT", PatientID="TEST-0001"),
        IDENTIFIER_DOES_NOT_MATCH,
        "QueryRetrieveLevel 'PATIENT' is not one of STUDY, SERIES, IMAGE",
    ),
    "instance list at study level": (
        identifier_bytes("STUDY", SOPInstanceUID=UID_LIST),
        IDENTIFIER_DOES_NOT_MATCH,
        "StudyInstanceUID is required at STUDY level",
    ),
    "value cut short": (
        TRUNCATED_UID,
        UNABLE_TO_PROCESS,
        "cannot decode the identifier",
    ),
    "odd length": (ODD_LENGTH, UNABLE_TO_PROCESS, "cannot decode the identifier"),
}


@pytest.mark.parametrize("model", [STUDY_GET, STUDY_MOVE], ids=["C-GET", "C-MOVE"])
@pytest.mark.parametrize("case", list(IDENTIFIERS), ids=list(IDENTIFIERS))
def test_unusable_identifier_is_refused_and_the_association_kept(
    archive: tuple[Appliance, Dataset], case: str, model: str
) -> None:
    appliance, instance = archive
    identifier, status, reason = IDENTIFIERS[case]
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        statuses = send_raw(assoc, model, identifier)
        assert [int(response.Status) for response in statuses] == [status]
        assert statuses[0].get("NumberOfCompletedSuboperations") in (None, 0)
        assert reason.split(" is not")[0] in statuses[0].ErrorComment
        assert_association_usable(assoc, str(instance.StudyInstanceUID))

    lines = new_lines(appliance, start)
    refusals = [line for line in lines if "WARNING" in line]
    assert len(refusals) == 1, lines
    assert reason in refusals[0]
    assert not [line for line in lines if "pynetdicom" in line or "ERROR" in line]
