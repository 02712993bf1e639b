"""C-STORE requests put on the wire byte by byte, as odd senders send them.

The file meta of a received file and the plain C-STORE-RSP are written by
the appliance itself; each request here must get its answer (a status, or
an abort for one that cannot be stored), leave no temporary file, and the
file stored must be what pydicom writes for the file meta and the data set
as sent.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from io import BytesIO

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta

from appliance.dicom import filemeta
from tests import dicom_client as client
from tests.conftest import TEST_FILES, Appliance, incoming_files, started

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SUCCESS = 0x0000
A_ABORT = 0x07
MAX_PDU = 262144  # node.max_pdu_size by default


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _uid(value: bytes) -> bytes:
    return value + b"\x00" * (len(value) % 2)


def associate_rq() -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) for CT storage, Explicit VR Little
    Endian, context 1, no maximum PDU length."""
    context = _item(0x30, CT_STORAGE.encode()) + _item(
        0x40, ExplicitVRLittleEndian.encode()
    )
    user = _item(0x51, struct.pack(">L", 0)) + _item(0x52, b"1.2.3.4")
    body = struct.pack(">HH", 1, 0) + b"APPLIANCE".ljust(16) + b"WIRE".ljust(16)
    body += b"\x00" * 32 + _item(0x10, b"1.2.840.10008.3.1.1.1")
    body += _item(0x20, bytes([1, 0, 0, 0]) + context) + _item(0x50, user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def store_request(instance_uid: bytes) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), Implicit VR Little Endian,
    with the Affected SOP Instance UID exactly as given."""

    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    body = element(0x00000002, _uid(CT_STORAGE.encode()))
    body += element(0x00000100, struct.pack("<H", 0x0001))
    body += element(0x00000110, struct.pack("<H", 7))
    body += element(0x00000700, struct.pack("<H", 0))
    body += element(0x00000800, struct.pack("<H", 0x0001))
    body += element(0x00001000, instance_uid)
    return element(0x00000000, struct.pack("<I", len(body))) + body


def p_data(header: int, fragment: bytes) -> bytes:
    """One P-DATA-TF of one PDV on context 1 (PS3.8 9.3.5, E.2)."""
    pdv = struct.pack(">LBB", len(fragment) + 2, 1, header) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def data_set(instance_uid: str, extra: int = 0) -> bytes:
    """CT_small's data set under another SOP Instance UID; ``extra`` bytes
    more in a private element."""
    dataset = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    dataset.SOPInstanceUID = instance_uid
    if extra:
        block = dataset.private_block(0x0009, "WIRE TEST", create=True)
        block.add_new(0x10, "OB", b"\x5a" * extra)
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, dataset)
    return encoded.getvalue()


def read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body; type 0 when the connection closed."""
    header = connection.recv(6, socket.MSG_WAITALL)
    if len(header) < 6:
        return 0, b""
    kind, _reserved, length = struct.unpack(">BBL", header)
    return kind, connection.recv(length, socket.MSG_WAITALL)


def send_store(port: int, instance_uid: bytes, fragments: list[bytes]) -> int:
    """The C-STORE-RSP status, or A_ABORT when the association was aborted."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(associate_rq())
        assert read_pdu(connection)[0] == 0x02  # A-ASSOCIATE-AC
        connection.sendall(p_data(0x03, store_request(instance_uid)))
        last = len(fragments) - 1
        for index, fragment in enumerate(fragments):
            connection.sendall(p_data(0x02 if index == last else 0x00, fragment))
        kind, body = read_pdu(connection)
        if kind != 0x04:
            assert kind == A_ABORT
            return A_ABORT
        status_at = body.index(b"\x00\x00\x00\x09\x02\x00\x00\x00") + 8
        status: int = struct.unpack("<H", body[status_at : status_at + 2])[0]
        connection.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4)
        read_pdu(connection)  # A-RELEASE-RP
        return status


def stored_file(appliance: Appliance, instance_uid: bytes) -> bytes:
    objects = appliance.data_dir / "online" / "objects"
    found = [
        p.read_bytes() for p in objects.rglob("*.dcm") if instance_uid in p.read_bytes()
    ]
    assert len(found) == 1
    return found[0]


def pydicom_file(instance_uid: str, data: bytes) -> bytes:
    written = BytesIO()
    written.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(CT_STORAGE),
        sop_instance_uid=UID(instance_uid),
        transfer_syntax=ExplicitVRLittleEndian,
    )
    write_file_meta_info(written, meta)
    return written.getvalue() + data


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("store-wire")
    with started(root / "appliance") as node:
        yield node


def _uid_for(name: str) -> str:
    return f"1.2.826.0.1.3680043.8.498.{int(time.time())}.{name}"


def test_one_byte_fragments_store_the_bytes_pydicom_would_write(
    appliance: Appliance,
) -> None:
    uid = _uid_for("11")  # odd length, sent without padding
    data = data_set(uid)
    fragments = [data[i : i + 1] for i in range(len(data))]
    assert send_store(appliance.port, uid.encode(), fragments) == SUCCESS
    assert stored_file(appliance, uid.encode()) == pydicom_file(uid, data)
    assert client.echo(appliance.port) == 0


def test_a_uid_that_is_not_ascii_is_answered(appliance: Appliance) -> None:
    """Stored as it is (its data set says the same), so it gets its Success:
    before, encoding the response failed and the sender saw an abort for an
    instance the appliance had kept."""
    uid = _uid_for("2\u00e9")
    data = data_set(uid)
    assert send_store(appliance.port, uid.encode("latin-1"), [data]) == SUCCESS
    assert client.echo(appliance.port) == 0


def test_an_empty_affected_sop_instance_uid_is_aborted(appliance: Appliance) -> None:
    """Before, the request was left unanswered until the sender gave up."""
    start = len(appliance.log())
    data = data_set(_uid_for("3"))
    assert send_store(appliance.port, b"", [data]) == A_ABORT
    assert incoming_files(appliance.data_dir / "online") == []
    assert "aborting association" in appliance.log()[start:]
    assert client.echo(appliance.port) == 0


def test_fragments_of_the_largest_pdu_this_end_accepts(appliance: Appliance) -> None:
    """A data set of 3 MiB in P-DATA-TF PDUs of node.max_pdu_size bytes."""
    uid = _uid_for("4")
    data = data_set(uid, extra=3 << 20)
    size = MAX_PDU - 6  # PDV length (4) and its header (2)
    fragments = [data[i : i + size] for i in range(0, len(data), size)]
    assert send_store(appliance.port, uid.encode(), fragments) == SUCCESS
    assert stored_file(appliance, uid.encode()) == pydicom_file(uid, data)


def test_a_connection_closed_mid_data_set_leaves_nothing(
    appliance: Appliance,
) -> None:
    uid = _uid_for("5")
    data = data_set(uid)
    with socket.create_connection(("127.0.0.1", appliance.port)) as connection:
        connection.sendall(associate_rq())
        assert read_pdu(connection)[0] == 0x02
        connection.sendall(p_data(0x03, store_request(uid.encode())))
        connection.sendall(p_data(0x02, data)[: len(data) // 2])
    assert client.echo(appliance.port) == 0
    objects = appliance.data_dir / "online" / "objects"
    assert not any(uid.encode() in p.read_bytes() for p in objects.rglob("*.dcm"))
    assert incoming_files(appliance.data_dir / "online") == []


def test_file_meta_with_an_empty_uid_is_refused_as_pydicom_refuses_it() -> None:
    meta = filemeta.FileMeta(CT_STORAGE, "", ExplicitVRLittleEndian)
    with pytest.raises(AttributeError):
        filemeta._write(BytesIO(), meta)
