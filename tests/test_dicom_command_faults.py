"""Requests whose command set holds a value pynetdicom cannot decode, sent
by pynetdicom on an open association with the command set written by hand
(pynetdicom's client side refuses to encode these values).

An Affected SOP Class UID over 64 characters, empty or missing, on a
C-ECHO, C-FIND, C-MOVE, C-GET or C-STORE, used to abort the association:
now each is answered 0x0122 (Refused: SOP Class not supported, PS3.7
9.1.1.1.9, 9.1.2.1.6, 9.1.3.1.6, 9.1.4.1.7, 9.1.5.1.4) with an Error
Comment and one log line, and the association stays usable. A C-STORE
whose Move Originator AE title or Move Originator Message ID is malformed
is stored: those say only who asked for the C-MOVE, and an instance sent
on behalf of a faulty requester is still the instance (one log line).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance, incoming_files, started

CT_STORAGE = datasets.CT_IMAGE_STORAGE
VERIFICATION = str(client.Verification)
STUDY_FIND = client.STUDY_FIND
STUDY_MOVE = client.STUDY_MOVE
STUDY_GET = client.STUDY_GET
SOP_CLASS_NOT_SUPPORTED = 0x0122
PENDING = (0xFF00, 0xFF01)
# Command Field (0000,0100) of each request (PS3.7 E.1).
COMMANDS = {
    "C-ECHO": (0x0030, VERIFICATION),
    "C-FIND": (0x0020, STUDY_FIND),
    "C-MOVE": (0x0021, STUDY_MOVE),
    "C-GET": (0x0010, STUDY_GET),
    "C-STORE": (0x0001, CT_STORAGE),
}
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 50
MISSING = None
# (0000,0002) as sent (None leaves the element out), and what the Error
# Comment says.
SOP_CLASSES: dict[str, tuple[bytes | None, str]] = {
    "over 64 characters": (LONG_UID.encode(), "characters long, over 64"),
    "empty": (b"", "no Affected SOP Class UID"),
    "missing": (MISSING, "no Affected SOP Class UID"),
    "two values": (VERIFICATION.encode() + b"\\1.2.3", "has 2 values"),
}
# Well-formed or not, UIDs of no SOP class served by the request (a C-STORE
# on a CT context is refused for them as for any class but CT's).
UNSERVED = {
    "unknown": (b"1.2.3", "1.2.3"),
    "with letters": (b"1.2.abc", "1.2.abc"),
    "not ASCII": (b"1.2.\xe9", "1.2."),
    "of another service": (b"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4"),
    # pynetdicom's Worklist service, handed a Query/Retrieve context,
    # raised and left the request unanswered.
    "of Modality Worklist": (b"1.2.840.10008.5.1.4.31", "1.2.840.10008.5.1.4.31"),
    "of Hanging Protocol": (b"1.2.840.10008.5.1.4.38.2", "1.2.840.10008.5.1.4.38.2"),
    # Shown without it, so that the log line stays one line.
    "with a line break": (b"1.2\n3.4", "SOP class 1.2?3.4 has no"),
}


def element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element, ``value`` padded to even: UIDs
    (group 0000 elements 0002 and 1000) with a NUL, others with a space."""
    pad = b"\x00" if tag in (0x00000002, 0x00001000) else b" "
    value += pad * (len(value) % 2)
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def request(
    command: str,
    sop_class: bytes | None,
    extra: list[tuple[int, bytes]],
    message_id: bytes = us(7),
    priority: bytes = us(0),
) -> bytes:
    """A request's command set (PS3.7 9.3), group length first; a data set
    follows every request but C-ECHO, which has no Priority."""
    field, _ = COMMANDS[command]
    elements = [(0x00000100, us(field)), (0x00000110, message_id)]
    if sop_class is not None:
        elements.append((0x00000002, sop_class))
    if command != "C-ECHO":
        elements.append((0x00000700, priority))
    elements.append((0x00000800, us(0x0101 if command == "C-ECHO" else 0x0001)))
    body = b"".join(element(tag, value) for tag, value in sorted(elements + extra))
    return element(0x00000000, struct.pack("<I", len(body))) + body


def implicit(dataset: Dataset) -> bytes:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, dataset)
    return encoded.getvalue()


def send(
    assoc: Association, abstract_syntax: str, command: bytes, data: bytes | None
) -> list[Dataset]:
    """Send one message as given on the context of ``abstract_syntax``;
    return the responses' command sets until the final one, or none when
    the association ended first.

    pynetdicom's reactor stays paused from then on: the responses are taken
    here, not by a reactor that would see one before a send_*() did.
    """
    context_id = assoc._get_valid_context(abstract_syntax, "", "scu").context_id
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    parts = [(0x03, command)] + ([(0x02, data)] if data is not None else [])
    for header, fragment in parts:
        pdata = P_DATA()
        pdata.presentation_data_value_list.append(
            [context_id, bytes([header]) + fragment]
        )
        assoc.dul.send_pdu(pdata)
    responses: list[Dataset] = []
    while True:
        _, primitive = assoc.dimse.get_msg(block=True)
        if primitive is None:
            return responses
        status = Dataset()
        status.Status = primitive.Status
        if primitive.ErrorComment:
            status.ErrorComment = primitive.ErrorComment
        responses.append(status)
        if primitive.Status not in PENDING:
            return responses


def assert_aborted(assoc: Association) -> None:
    """The reactor, resumed, sees the abort and ends the association."""
    assoc._reactor_checkpoint.set()
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not assoc.is_established


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("command-faults")
    with started(root / "appliance") as node:
        yield node


@contextmanager
def open_association(appliance: Appliance) -> Iterator[Association]:
    contexts = [
        (abstract, [ImplicitVRLittleEndian]) for _, abstract in COMMANDS.values()
    ]
    with client.associate(appliance.port, contexts) as assoc:
        assert assoc.is_established
        # A request that goes unanswered fails the test in seconds.
        assoc.dimse_timeout = 10
        yield assoc


def assert_usable(assoc: Association) -> None:
    """A C-ECHO and a C-FIND on the same association are answered."""
    assert assoc.is_established
    echo = request("C-ECHO", VERIFICATION.encode(), [])
    assert [int(r.Status) for r in send(assoc, VERIFICATION, echo, None)] == [0]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3.4"
    find = request("C-FIND", STUDY_FIND.encode(), [])
    found = send(assoc, STUDY_FIND, find, implicit(query))
    assert [int(r.Status) for r in found] == [0x0000]


def problems(appliance: Appliance, start: int) -> list[str]:
    """Log lines since ``start`` but INFO ones, once the association's
    closing line is there."""
    deadline = time.monotonic() + 20
    while f"association from {client.CLIENT_AE}" not in appliance.log()[start:]:
        assert time.monotonic() < deadline, appliance.log()[start:]
        time.sleep(0.05)
    log = appliance.log()[start:]
    assert "Traceback" not in log
    return [line for line in log.splitlines() if " INFO " not in line]


def payload(command: str, instance: Dataset) -> bytes | None:
    if command == "C-ECHO":
        return None
    if command == "C-STORE":
        return implicit(instance)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = instance.StudyInstanceUID
    return implicit(query)


def extra_elements(command: str, instance: Dataset) -> list[tuple[int, bytes]]:
    if command == "C-MOVE":
        return [(0x00000600, b"NOWHERE")]
    if command == "C-STORE":
        return [(0x00001000, instance.SOPInstanceUID.encode())]
    return []


@pytest.mark.parametrize("fault", list(SOP_CLASSES) + list(UNSERVED))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unusable_sop_class_is_refused_and_the_association_kept(
    appliance: Appliance, command: str, fault: str
) -> None:
    sop_class, comment = (SOP_CLASSES | UNSERVED)[fault]
    if command == "C-STORE" and fault in UNSERVED:
        comment = "SOP class is not the presentation context's abstract syntax"
    instance = datasets.instance(
        datasets.uid("study", command, fault),
        datasets.uid("series", command, fault),
        1,
    )
    sent = request(command, sop_class, extra_elements(command, instance))
    objects = appliance.data_dir / "online" / "objects"
    before = set(objects.rglob("*.dcm"))
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        _, abstract = COMMANDS[command]
        responses = send(assoc, abstract, sent, payload(command, instance))
        assert [int(r.Status) for r in responses] == [SOP_CLASS_NOT_SUPPORTED]
        assert comment in responses[0].ErrorComment
        assert_usable(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    said, _, why = lines[0].partition(" refused: ")
    assert " WARNING appliance.dicom." in said
    assert said.split(": ", 1)[1].startswith(command)
    assert said.endswith(f" from {client.CLIENT_AE}@127.0.0.1")
    if command != "C-STORE" or fault not in UNSERVED:
        assert why == responses[0].ErrorComment
    assert set(objects.rglob("*.dcm")) == before
    assert incoming_files(appliance.data_dir / "online") == []


ORIGINATORS = {
    "AE title over 16 characters": [(0x00001030, b"ABCDEFGHIJKLMNOPQ")],
    "AE title not ASCII": [(0x00001030, b"MOVE\xe9R")],
    "message ID of three bytes": [
        (0x00001030, b"MOVER"),
        (0x00001031, b"\x01\x02\x03"),
    ],
    "message ID of two values": [
        (0x00001030, b"MOVER"),
        (0x00001031, b"\x01\x00\x02\x00"),
    ],
}


@pytest.mark.parametrize("fault", list(ORIGINATORS))
def test_a_malformed_move_originator_is_stored_with_one_line(
    appliance: Appliance, fault: str
) -> None:
    instance = datasets.instance(
        datasets.uid("study", fault), datasets.uid("series", fault), 1
    )
    uid = instance.SOPInstanceUID
    extra = [*ORIGINATORS[fault], (0x00001000, uid.encode())]
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        sent = request("C-STORE", CT_STORAGE.encode(), extra)
        responses = send(assoc, CT_STORAGE, sent, implicit(instance))
        assert [int(r.Status) for r in responses] == [0x0000]
        assert_usable(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    assert " WARNING appliance.dicom." in lines[0]
    assert f"from {client.CLIENT_AE}@127.0.0.1: Move Originator left out" in lines[0]
    objects = appliance.data_dir / "online" / "objects"
    assert any(uid.encode() in p.read_bytes() for p in objects.rglob("*.dcm"))


STRAY = {
    "one value": b"\x05\x00",
    "three bytes": b"\x05\x00\x07",
    "two values": b"\x05\x00\x06\x00",
}


@pytest.mark.parametrize("fault", list(STRAY))
def test_a_store_with_a_message_id_being_responded_to(
    appliance: Appliance, fault: str
) -> None:
    instance = datasets.instance(
        datasets.uid("study", "stray", fault), datasets.uid("series", fault), 1
    )
    uid = instance.SOPInstanceUID
    extra = [(0x00000120, STRAY[fault]), (0x00001000, uid.encode())]
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        sent = request("C-STORE", CT_STORAGE.encode(), extra)
        responses = send(assoc, CT_STORAGE, sent, implicit(instance))
        assert [int(r.Status) for r in responses] == [0x0000]
        assert_usable(assoc)

    lines = problems(appliance, start)
    if fault == "one value":
        assert lines == []
        return
    assert len(lines) == 1, lines
    assert " WARNING appliance.dicom." in lines[0]
    assert "Message ID Being Responded To left out" in lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_request_without_a_message_id(appliance: Appliance, command: str) -> None:
    instance = datasets.instance(
        datasets.uid("study", "no-id", command), datasets.uid("series", command), 1
    )
    _, abstract = COMMANDS[command]
    sent = request(command, abstract.encode(), extra_elements(command, instance))
    # Message ID (0000,0110) is the request's third element: its 10 bytes out.
    at = sent.index(struct.pack("<HH", 0, 0x0110))
    body = sent[12:at] + sent[at + 10 :]
    sent = element(0x00000000, struct.pack("<I", len(body))) + body
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        responses = send(assoc, abstract, sent, payload(command, instance))
        assert responses == []
        assert_aborted(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    assert f"with {client.CLIENT_AE}@127.0.0.1: {command} request without a" in lines[0]
    assert incoming_files(appliance.data_dir / "online") == []


def test_a_command_field_of_no_request_aborts_with_one_line(
    appliance: Appliance,
) -> None:
    """No DIMSE message can be made of it, so none can be answered."""
    sent = request("C-ECHO", VERIFICATION.encode(), [])
    sent = sent.replace(
        element(0x00000100, us(0x0030)), element(0x00000100, us(0x0F0F))
    )
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        assert send(assoc, VERIFICATION, sent, None) == []
        assert_aborted(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    assert "aborting association with" in lines[0]


# Each Query/Retrieve request naming a SOP class of another request, sent on
# the presentation context negotiated for that class. The appliance's
# Query/Retrieve service went by the request's kind alone: a C-GET naming
# a FIND class was answered 0x0000, a C-MOVE naming one was served as a move.
OTHER_REQUESTS_CLASSES = [
    ("C-FIND", STUDY_MOVE),
    ("C-FIND", STUDY_GET),
    ("C-MOVE", STUDY_FIND),
    ("C-MOVE", STUDY_GET),
    ("C-GET", STUDY_FIND),
    ("C-GET", STUDY_MOVE),
]


@pytest.mark.parametrize(("command", "sop_class"), OTHER_REQUESTS_CLASSES)
def test_a_class_of_another_request_is_refused(
    appliance: Appliance, command: str, sop_class: str
) -> None:
    instance = datasets.instance(
        datasets.uid("study", "other", command, sop_class),
        datasets.uid("series", "other", command, sop_class),
        1,
    )
    sent = request(command, sop_class.encode(), extra_elements(command, instance))
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        responses = send(assoc, sop_class, sent, payload(command, instance))
        assert [int(r.Status) for r in responses] == [SOP_CLASS_NOT_SUPPORTED]
        comment = f"SOP class {sop_class} has no {command} service"
        assert responses[0].ErrorComment == comment
        assert_usable(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    assert " WARNING appliance.dicom." in lines[0]
    assert lines[0].endswith(
        f"{command} from {client.CLIENT_AE}@127.0.0.1 refused: {comment}"
    )


# A C-STORE naming the SOP class of the (non-storage) context it comes on,
# its data set claiming that class too: the request and the context agree,
# so it reached ingest, which stored it or refused it 0xA900 by what else
# the data set held.
OTHER_SERVICES = {"Query/Retrieve": STUDY_FIND, "Verification": VERIFICATION}


@pytest.mark.parametrize("service", list(OTHER_SERVICES))
def test_a_store_of_a_class_of_another_service_is_refused(
    appliance: Appliance, service: str
) -> None:
    sop_class = OTHER_SERVICES[service]
    instance = datasets.instance(
        datasets.uid("study", "not-storage", service),
        datasets.uid("series", "not-storage", service),
        1,
    )
    instance.SOPClassUID = sop_class
    instance.file_meta.MediaStorageSOPClassUID = sop_class
    extra = [(0x00001000, instance.SOPInstanceUID.encode())]
    sent = request("C-STORE", sop_class.encode(), extra)
    objects = appliance.data_dir / "online" / "objects"
    before = set(objects.rglob("*.dcm"))
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        responses = send(assoc, sop_class, sent, implicit(instance))
        assert [int(r.Status) for r in responses] == [SOP_CLASS_NOT_SUPPORTED]
        comment = f"SOP class {sop_class} has no C-STORE service"
        assert responses[0].ErrorComment == comment
        assert_usable(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    assert " WARNING appliance.dicom." in lines[0]
    assert f"C-STORE of instance {instance.SOPInstanceUID} from" in lines[0]
    assert lines[0].endswith(f" refused: {comment}")
    assert set(objects.rglob("*.dcm")) == before
    assert incoming_files(appliance.data_dir / "online") == []


# A Message ID (US, VM 1, PS3.7 9.3) that is not one number: pynetdicom
# answered the first of its values, with a line that named no peer.
MESSAGE_IDS = {"two values": b"\x07\x00\x08\x00", "three bytes": b"\x07\x00\x08"}


@pytest.mark.parametrize("fault", list(MESSAGE_IDS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_message_id_of_several_values_aborts(
    appliance: Appliance, command: str, fault: str
) -> None:
    instance = datasets.instance(
        datasets.uid("study", "ids", command, fault),
        datasets.uid("series", "ids", command, fault),
        1,
    )
    _, abstract = COMMANDS[command]
    extra = extra_elements(command, instance)
    sent = request(command, abstract.encode(), extra, message_id=MESSAGE_IDS[fault])
    objects = appliance.data_dir / "online" / "objects"
    before = set(objects.rglob("*.dcm"))
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        responses = send(assoc, abstract, sent, payload(command, instance))
        assert responses == []
        assert_aborted(assoc)

    lines = problems(appliance, start)
    assert len(lines) == 1, lines
    assert " WARNING appliance.dicom." in lines[0]
    assert lines[0].endswith(
        f"with {client.CLIENT_AE}@127.0.0.1: {command} request whose Message ID"
        " is not one US value"
    )
    assert set(objects.rglob("*.dcm")) == before
    assert incoming_files(appliance.data_dir / "online") == []


# A Priority that is not LOW, MEDIUM or HIGH (PS3.7 9.1.1.1.3), with what
# the line says: pynetdicom aborted the association for any of them.
PRIORITIES = {
    "out of range": (us(5), "0x0005 is not LOW, MEDIUM or HIGH"),
    "empty": (b"", "empty"),
    "three bytes": (b"\x00\x00\x01", "not one US value"),
}


@pytest.mark.parametrize("fault", list(PRIORITIES))
@pytest.mark.parametrize("command", ["C-STORE", "C-FIND", "C-GET", "C-MOVE"])
def test_a_malformed_priority_is_served_with_one_line(
    appliance: Appliance, command: str, fault: str
) -> None:
    instance = datasets.instance(
        datasets.uid("study", "priority", command, fault),
        datasets.uid("series", "priority", command, fault),
        1,
    )
    _, abstract = COMMANDS[command]
    value, reason = PRIORITIES[fault]
    extra = extra_elements(command, instance)
    sent = request(command, abstract.encode(), extra, priority=value)
    start = len(appliance.log())

    with open_association(appliance) as assoc:
        responses = send(assoc, abstract, sent, payload(command, instance))
        # The move names no known peer: refused as without the fault.
        expected = 0xA801 if command == "C-MOVE" else 0x0000
        assert [int(r.Status) for r in responses] == [expected]
        assert_usable(assoc)

    lines = problems(appliance, start)
    assert " WARNING appliance.dicom.command_faults" in lines[0]
    assert f"{command}" in lines[0]
    assert lines[0].endswith(
        f" from {client.CLIENT_AE}@127.0.0.1: Priority left out: {reason}"
    )
    # The move's own refusal is its second line.
    assert len(lines) == (2 if command == "C-MOVE" else 1), lines
    if command == "C-STORE":
        objects = appliance.data_dir / "online" / "objects"
        uid = instance.SOPInstanceUID.encode()
        assert any(uid in path.read_bytes() for path in objects.rglob("*.dcm"))
