"""C-STORE behaviour: duplicates, identity checks, UIDs that are not file
names, concurrent stores, access control and the association limit."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests import datasets
from tests import dicom_client as client
from tests.conftest import incoming_files

SOP = datasets.CT_IMAGE_STORAGE
EXPLICIT = "1.2.840.10008.1.2.1"


def _one(tmp_path: Path, name: str, **attributes: object) -> Path:
    study = datasets.uid("study", name)
    series = datasets.uid("series", name)
    dataset = datasets.instance(study, series, 1, **attributes)  # type: ignore
    return datasets.write(dataset, tmp_path / name)


def _variant(path: Path, directory: Path, **changes: object) -> Path:
    """The same SOP Instance UID with different content."""
    dataset = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    return datasets.write(dataset, directory)


def _get_bytes(appliance, uid: str) -> bytes:
    identifier = client.study_identifier("IMAGE", SOPInstanceUID=uid)
    got, responses = client.get(appliance.port, identifier, [(SOP, [EXPLICIT])])
    assert int(responses[-1].Status) == 0x0000
    return got[uid]


def _object_files(appliance) -> list[Path]:
    return list((appliance.data_dir / "online" / "objects").rglob("*.dcm"))


def test_identical_resend_is_success_and_changes_nothing(appliance, tmp_path):
    path = _one(tmp_path, "resend")
    assert client.store_files(appliance.port, [path]) == {path: 0}
    files = _object_files(appliance)

    assert client.store_files(appliance.port, [path]) == {path: 0}
    assert _object_files(appliance) == files
    assert appliance.status()["instances"] == 1
    # The association's closing line does not count the resend as stored.
    closed = _closing_lines(appliance, 2)
    assert closed[0].endswith(": 1 stored, 0 already there, 0 refused, 0 queries")
    assert closed[1].endswith(": 0 stored, 1 already there, 0 refused, 0 queries")


def _closing_lines(appliance, count: int) -> list[str]:
    """The first ``count`` associations' closing log lines, once written
    (a worker logs one just after its peer has gone)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [
            line
            for line in appliance.log().splitlines()
            if re.search(r"association from .* closed: ", line)
        ]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines[:count]
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("policy", "status", "kept", "logged"),
    [
        ("refuse", 0x0111, "first", "another instance with different content"),
        ("keep_first", 0x0000, "first", "kept the stored copy"),
        ("replace", 0x0000, "second", "replaced it"),
    ],
)
def test_different_bytes_under_one_uid_follow_the_policy(
    appliance_factory, tmp_path, policy, status, kept, logged
):
    appliance = appliance_factory(
        settings={"storage": {"duplicate_policy": policy}}
    ).start()
    first = _one(tmp_path, "conflict")
    second = _variant(first, tmp_path / "v2", StudyDescription="Changed")
    uid = str(client.file_meta(first).MediaStorageSOPInstanceUID)

    assert client.store_files(appliance.port, [first]) == {first: 0}
    assert client.store_files(appliance.port, [second]) == {second: status}

    expected = first if kept == "first" else second
    assert _get_bytes(appliance, uid) == client.dataset_bytes(expected)
    assert len(_object_files(appliance)) == 1
    assert appliance.log().count(logged) == 1


@pytest.mark.parametrize(
    "missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
)
def test_missing_uid_is_refused_and_nothing_stored(appliance, tmp_path, missing):
    path = _one(tmp_path, f"missing-{missing}")
    dataset = pydicom.dcmread(path)
    delattr(dataset, missing)
    dataset.save_as(path, enforce_file_format=True)

    statuses = client.store_files(appliance.port, [path])
    assert statuses[path] in (0xA900, None)
    assert not _object_files(appliance)
    assert not incoming_files(appliance.data_dir / "online")


@pytest.mark.parametrize(
    "odd_uid",
    # (A UID longer than 64 characters cannot be sent: pynetdicom and DCMTK
    # refuse it in the C-STORE command; test_ingest covers it on import.)
    ["1.2.3.abc", "..", "1.2.03.4 "],
)
def test_non_conformant_uids_are_stored_findable_and_harmless(
    appliance, tmp_path, odd_uid
):
    path = _one(tmp_path, "odd", sop_instance_uid=odd_uid.strip())
    with datasets.unvalidated():
        assert client.store_files(appliance.port, [path]) == {path: 0}

    with datasets.unvalidated():
        identifier = client.study_identifier("IMAGE", SOPInstanceUID=odd_uid.strip())
        identifier.StudyInstanceUID = datasets.uid("study", "odd")
        matches, status = client.find(appliance.port, identifier)
        found = [str(m.SOPInstanceUID) for m in matches]
    assert status == 0
    assert found == [odd_uid.strip()]
    assert "non-conformant SOPInstanceUID" in appliance.log()

    # The file name comes from the catalog, never from the UID.
    files = _object_files(appliance)
    assert len(files) == 1
    assert files[0].is_relative_to(appliance.data_dir / "online" / "objects")
    assert odd_uid.strip() not in str(files[0]) and "passwd" not in str(files[0])
    assert re.fullmatch(r"[0-9a-f]{32}\.dcm", files[0].name)


def test_two_associations_storing_one_instance_end_with_one_copy(
    appliance_factory, tmp_path
):
    appliance = appliance_factory(workers=2).start()
    paths = [_one(tmp_path / f"r{n}", f"race-{n}") for n in range(8)]
    for path in paths:
        barrier = threading.Barrier(2)
        results: list[dict] = []

        def send(
            path: Path = path,
            barrier: threading.Barrier = barrier,
            results: list[dict] = results,
        ) -> None:
            barrier.wait()
            results.append(client.store_files(appliance.port, [path]))

        threads = [threading.Thread(target=send) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r[path] for r in results] == [0, 0]

    assert len(_object_files(appliance)) == len(paths)
    assert appliance.status()["instances"] == len(paths)


PEERS = [
    {"ae_title": "MODALITY", "host": "127.0.0.1", "port": 11999},
    {"ae_title": "VIEWER", "host": "127.0.0.1", "port": 11998},
    {"ae_title": "ELSEWHERE", "host": "127.0.0.2", "port": 11997},
]
RESTRICTED = {
    "access": {
        "restrict_storage": True,
        "storage": ["MODALITY", "ELSEWHERE"],
        "restrict_query": True,
        "query": ["VIEWER", "ELSEWHERE"],
    }
}


def test_access_lists_reject_unknown_callers_at_association(appliance_factory):
    appliance = appliance_factory(settings=RESTRICTED, peers=PEERS).start()

    assert client.echo(appliance.port, "STRANGER") is None
    # Known AE title, but calling from another host than the one configured.
    assert client.echo(appliance.port, "ELSEWHERE") is None
    assert client.echo(appliance.port, "MODALITY") == 0
    assert client.echo(appliance.port, "VIEWER") == 0
    assert appliance.log().count("rejected: caller not allowed") == 2


def test_storage_and_query_permissions_are_separate(appliance_factory, tmp_path):
    appliance = appliance_factory(settings=RESTRICTED, peers=PEERS).start()
    path = _one(tmp_path, "perm")

    assert client.store_files(appliance.port, [path], "VIEWER") == {path: 0x0124}
    assert client.store_files(appliance.port, [path], "MODALITY") == {path: 0}

    identifier = client.study_identifier("STUDY", StudyInstanceUID="")
    matches, status = client.find(appliance.port, identifier, ae_title="VIEWER")
    assert (len(matches), status) == (1, 0)
    with client.associate(
        appliance.port, [(client.STUDY_FIND, [])], ae_title="MODALITY"
    ) as assoc:
        # The appliance rejects the query context of a storage-only caller;
        # with nothing accepted, pynetdicom gives the association up.
        assert not assoc.is_established
    assert "presentation context(s) rejected: Study Root" in appliance.log()


def test_association_limit_is_shared_and_released(appliance_factory):
    appliance = appliance_factory(settings={"node": {"max_associations": 2}}, workers=2)
    appliance.start()
    ae = AE(ae_title="LIMIT")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", appliance.port, ae_title="APPLIANCE")
    second = ae.associate("127.0.0.1", appliance.port, ae_title="APPLIANCE")
    third = ae.associate("127.0.0.1", appliance.port, ae_title="APPLIANCE")
    try:
        assert first.is_established and second.is_established
        assert third.is_rejected, (third.is_aborted, appliance.log()[-3000:])
        assert "associations already open" in appliance.log()
    finally:
        first.release()
        second.abort()

    # Released and aborted associations free their places.
    for _ in range(4):
        assert client.echo(appliance.port) == 0


def test_garbage_on_the_port_does_not_stop_the_service(appliance):
    for junk in (b"\x00" * 10, b"GET / HTTP/1.0\r\n\r\n", b"\x01\x00\xff\xff\xff\xff"):
        with socket.create_connection(("127.0.0.1", appliance.port), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                sock.recv(1024)
    assert client.echo(appliance.port) == 0


def test_instance_naming_another_patients_series_is_refused(appliance, tmp_path):
    first = _one(tmp_path, "tree", patient_id="TREE-1", patient_name="Tree^One")
    original = pydicom.dcmread(first)
    intruder = datasets.instance(
        datasets.uid("study", "intruder"),
        str(original.SeriesInstanceUID),
        1,
        patient_id="TREE-2",
        patient_name="Other^Patient",
    )
    second = datasets.write(intruder, tmp_path / "intruder")
    other_study = datasets.instance(
        str(original.StudyInstanceUID),
        datasets.uid("series", "other-study"),
        2,
        patient_id="TREE-3",
    )
    third = datasets.write(other_study, tmp_path / "other-study")

    assert client.store_files(appliance.port, [first]) == {first: 0}
    assert client.store_files(appliance.port, [second]) == {second: 0xA900}
    assert client.store_files(appliance.port, [third]) == {third: 0xA900}
    assert "belongs to study" in appliance.log()
    assert "belongs to another patient" in appliance.log()

    identifier = client.study_identifier(
        "IMAGE", SeriesInstanceUID=str(original.SeriesInstanceUID)
    )
    identifier.PatientID = ""
    identifier.StudyInstanceUID = ""
    matches, status = client.find(appliance.port, identifier)
    assert status == 0
    assert [(str(m.PatientID), str(m.StudyInstanceUID)) for m in matches] == [
        ("TREE-1", str(original.StudyInstanceUID))
    ]
    assert appliance.status()["instances"] == 1


def test_wildcards_are_refused_in_a_retrieve(appliance, tmp_path):
    path = _one(tmp_path, "wild")
    assert client.store_files(appliance.port, [path]) == {path: 0}
    for level, key in (("STUDY", "StudyInstanceUID"), ("PATIENT", "PatientID")):
        with datasets.unvalidated():
            identifier = client.study_identifier(level, **{key: "*"})
        model = (
            client.STUDY_GET
            if level == "STUDY"
            else client.PatientRootQueryRetrieveInformationModelGet
        )
        with datasets.unvalidated():
            got, responses = client.get(
                appliance.port, identifier, [(SOP, [EXPLICIT])], model=model
            )
        assert not got
        assert int(responses[-1].Status) == 0xA900
    assert appliance.log().count("may not hold wildcards") == 2


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Read until the peer closes the connection (True) or time runs out."""
    deadline = time.monotonic() + within
    sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_unfinished_association_requests_do_not_use_up_the_limit(appliance_factory):
    appliance = appliance_factory(
        settings={
            "node": {"max_associations": 2},
            "timeouts": {"association": 1, "network": 2},
        },
        workers=2,
    ).start()
    # An A-ASSOCIATE-RQ header that promises more bytes than ever come.
    half_request = b"\x01\x00\x00\x00\x01\x00\x00\x01"
    stalled = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", appliance.port), timeout=10)
        sock.sendall(half_request)
        stalled.append(sock)

    # The appliance closes them itself ...
    for sock in stalled:
        assert _closed_by_peer(sock, within=20)
        sock.close()
    time.sleep(0.5)

    # ... and every place is free again.
    echo = [(client.Verification, [])]
    with (
        client.associate(appliance.port, echo) as one,
        client.associate(appliance.port, echo) as two,
    ):
        assert one.is_established and two.is_established


def test_association_for_another_ae_title_is_rejected(appliance):
    with client.associate(
        appliance.port, [(client.Verification, [])], called="OTHERPACS"
    ) as assoc:
        assert assoc.is_rejected
    assert "it calls AE title 'OTHERPACS'" in appliance.log()
    assert client.echo(appliance.port) == 0
