"""A C-STORE data set that carries a file meta (group 0002) of its own.

Some senders put the whole Part 10 file on the wire, file meta included.
Group 0002 belongs to the file meta alone (PS3.10 7.1), and the file the
appliance writes already has one: readers take both groups as its file
meta, so the sender's transfer syntax and UIDs would override what was
negotiated. Before, such an instance was stored as received (its
data set read back under the sender's meta), or refused with an error
about a length far into the file when that meta named another transfer
syntax. The file meta is read up to the first tag that does not ascend:
the instance is refused with 0xC000 and a reason that names the group.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from tests import dicom_client as client
from tests.conftest import Appliance, incoming_files, started
from tests.test_store_wire import CT_STORAGE, data_set, send_store

CANNOT_UNDERSTAND = 0xC000


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("embedded-meta")
    with started(root / "appliance") as node:
        yield node


def _with_file_meta(uid: str, meta_uid: str, syntax: str) -> bytes:
    """CT_small's data set under ``uid``, headed by a file meta group."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = meta_uid
    meta.TransferSyntaxUID = syntax
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_file_meta_info(encoded, meta)
    return encoded.getvalue() + data_set(uid)


def _stored(appliance: Appliance, uid: str) -> list[str]:
    objects = appliance.data_dir / "online" / "objects"
    return [p.name for p in objects.rglob("*.dcm") if uid.encode() in p.read_bytes()]


@pytest.mark.parametrize(
    "meta", ["the same", "another"], ids=["same meta", "other meta"]
)
def test_a_data_set_with_a_file_meta_is_refused(
    appliance: Appliance, meta: str
) -> None:
    uid = f"1.2.826.0.1.3680043.8.498.{time.time_ns()}"
    if meta == "the same":
        sent = _with_file_meta(uid, uid, ExplicitVRLittleEndian)
    else:
        sent = _with_file_meta(uid, "1.2.3.4", ExplicitVRBigEndian)
    start = len(appliance.log())
    assert send_store(appliance.port, uid.encode(), [sent]) == CANNOT_UNDERSTAND

    log = appliance.log()[start:]
    problems = [line for line in log.splitlines() if " INFO " not in line]
    assert len(problems) == 1, problems
    assert "file meta element (group 0002)" in problems[0]
    assert _stored(appliance, uid) == []
    assert incoming_files(appliance.data_dir / "online") == []
    assert client.echo(appliance.port) == 0


def test_a_data_set_without_a_file_meta_is_stored(appliance: Appliance) -> None:
    uid = f"1.2.826.0.1.3680043.8.498.{time.time_ns()}"
    assert send_store(appliance.port, uid.encode(), [data_set(uid)]) == 0
    assert len(_stored(appliance, uid)) == 1
