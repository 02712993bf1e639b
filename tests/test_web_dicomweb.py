"""DICOMweb against a running ``appliance serve``, with dicomweb-client (a
real client) for STOW-RS, QIDO-RS and WADO-RS, and plain HTTP for what a
client library would not send (garbage bodies, wrong credentials)."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass

from tests import dicom_client
from tests.conftest import PYDICOM_DATA, Appliance, incoming_files
from tests.datasets import ROOT, instance, uid, unvalidated, write
from tests.web_site import OPERATOR, VIEWER, Site, accounts

ACCEPT_DICOM = 'multipart/related; type="application/dicom"'
DUPLICATE = 0x0111
# Studies for the search tests: (label, patient name, patient ID, study date).
STUDIES = [
    ("s1", "Doe^Jane", "PID-001", "20200110"),
    ("s2", "Doe^John", "PID-002", "20200620"),
    ("s3", "Dobbs^Mary", "PID-003", "20211201"),
    ("s4", "Smith^Anna", "PID-004", "20190305"),
    ("s5", "Doerr^Paul", "PID-005", "20200101"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("dicomweb")
    appliance = Appliance(directory, {"web": {"accounts": accounts()}})
    appliance.start()
    try:
        yield Site(appliance)
    finally:
        appliance.stop()


def web_client(site: Site, account: tuple[str, str] = OPERATOR) -> DICOMwebClient:
    session = create_session_from_user_pass(*account)
    return DICOMwebClient(url=site.url, session=session)


def encoded(dataset: pydicom.Dataset) -> bytes:
    """The bytes dicomweb-client sends for ``dataset``."""
    with io.BytesIO() as out:
        pydicom.dcmwrite(out, dataset)
        return out.getvalue()


def sample_datasets() -> list[tuple[Path, pydicom.Dataset]]:
    """pydicom's sample files that pydicom itself can read and write."""
    found = []
    for path in sorted(PYDICOM_DATA.rglob("*")):
        if not path.is_file() or path.suffix in (".py", ".pyc"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = pydicom.dcmread(path)
                encoded(dataset)
            except Exception:
                continue
        found.append((path, dataset))
    return found


def wado_rs_bytes(site: Site, url: str) -> list[bytes]:
    """The parts of a WADO-RS answer, split here rather than by the code
    under test."""
    with site.client(VIEWER) as http:
        answer = http.get(url, headers={"Accept": ACCEPT_DICOM})
    assert answer.status_code == 200, answer.text
    content_type = answer.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"')
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    body = answer.content
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    chunks = body.split(b"--" + boundary)[1:-1]
    parts = []
    for chunk in chunks:
        headers, _, content = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom; transfer-syntax=" in headers
        assert content.endswith(b"\r\n")
        parts.append(content[:-2])
    return parts


def store(client: DICOMwebClient, dataset: pydicom.Dataset) -> tuple[int, Any]:
    """STOW-RS one data set: the HTTP status and the store response."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return 200, client.store_instances([dataset])
        except requests.HTTPError as exc:
            response = exc.response
            body = pydicom.Dataset.from_json(response.json())
            return response.status_code, (body, response.headers.get("warning", ""))


def test_sample_files_round_trip_byte_identical(site: Site) -> None:
    """What STOW-RS stores, WADO-RS gives back byte for byte; what the
    archive refuses comes back with a failure reason and its text."""
    client = web_client(site)
    kept: dict[str, bytes] = {}
    identical_to_file = 0
    refusals: dict[int, int] = {}
    for path, dataset in sample_datasets():
        sent = encoded(dataset)
        status, answer = store(client, dataset)
        if status == 200:
            (item,) = answer.ReferencedSOPSequence
            uid_ = str(item.ReferencedSOPInstanceUID)
            kept.setdefault(uid_, sent)
            # dicomweb-client sends a Host header without the port, and
            # RetrieveURL is built from the Host header: only its path counts.
            where = "/studies/" + str(item.RetrieveURL).split("/studies/", 1)[1]
            assert wado_rs_bytes(site, where) == [kept[uid_]]
            got = client.retrieve_instance(
                dataset.StudyInstanceUID, dataset.SeriesInstanceUID, uid_
            )
            assert encoded(got) == kept[uid_], path.name
            identical_to_file += sent == path.read_bytes()
            continue
        body, reasons = answer
        assert status == 409, path.name
        (item,) = body.FailedSOPSequence
        reason = int(item.FailureReason)
        refusals[reason] = refusals.get(reason, 0) + 1
        assert reasons.startswith('299 pacs-appliance "instance 1: '), path.name
        if reason == DUPLICATE:
            # The default duplicate policy refuses different bytes under a
            # UID already stored: the first copy stays.
            assert str(item.ReferencedSOPInstanceUID) in kept, path.name
        else:
            assert reason in (0xA900, 0xC000), (path.name, hex(reason))

    assert len(kept) >= 40
    assert identical_to_file >= 20
    assert set(refusals) <= {DUPLICATE, 0xA900, 0xC000}
    assert incoming_files(site.appliance.data_dir / "online") == []


def _store_studies(site: Site) -> None:
    client = web_client(site)
    for label, name, patient_id, date in STUDIES:
        datasets = [
            pydicom.dcmread(
                write(
                    instance(
                        uid("web", label),
                        uid("web-series", label),
                        number,
                        patient_id=patient_id,
                        patient_name=name,
                        study_date=date,
                        accession=f"ACC-{label}",
                    ),
                    site.appliance.directory / "made" / label,
                )
            )
            for number in (1, 2)
        ]
        answer = client.store_instances(datasets)
        assert len(answer.ReferencedSOPSequence) == 2


@pytest.fixture(scope="module")
def searchable(site: Site) -> Site:
    _store_studies(site)
    return site


@pytest.mark.parametrize(
    "keys",
    [
        {"PatientName": "Doe*"},
        {"PatientName": "D?e^J*"},
        {"PatientName": "doe^jane"},
        {"StudyDate": "20200101-20201231"},
        {"StudyDate": "-20200110"},
        {"PatientID": "PID-00*", "StudyDate": "20200101-"},
        {"PatientName": "Doe^J*", "PatientID": "PID-001\\PID-002"},
        {"AccessionNumber": "ACC-s3"},
    ],
)
def test_qido_matches_as_c_find_does(searchable: Site, keys: dict[str, str]) -> None:
    client = web_client(searchable, VIEWER)
    found = client.search_for_studies(search_filters=keys)
    by_web = {item["0020000D"]["Value"][0] for item in found}

    identifier = dicom_client.study_identifier(StudyInstanceUID="", **keys)
    matches, status = dicom_client.find(searchable.appliance.port, identifier)
    assert status == 0
    by_find = {str(match.StudyInstanceUID) for match in matches}

    assert by_web == by_find
    ours = {uid("web", label) for label, *_rest in STUDIES}
    assert by_web & ours, "the query should find some of the made-up studies"


def test_qido_pages_with_limit_and_offset(searchable: Site) -> None:
    client = web_client(searchable, VIEWER)
    everything = client.search_for_studies(search_filters={"PatientID": "PID-*"})
    assert len(everything) == len(STUDIES)
    pages = [
        client.search_for_studies(
            search_filters={"PatientID": "PID-*"}, offset=offset, limit=2
        )
        for offset in (0, 2, 4, 6)
    ]
    assert [len(page) for page in pages] == [2, 2, 1, 0]
    assert [item for page in pages for item in page] == everything


def test_qido_series_and_instances_and_includefield(searchable: Site) -> None:
    client = web_client(searchable, VIEWER)
    study = uid("web", "s2")
    series = client.search_for_series(study_instance_uid=study)
    assert [item["0020000E"]["Value"][0] for item in series] == [
        uid("web-series", "s2")
    ]
    assert series[0]["00201209"]["Value"] == [2]  # NumberOfSeriesRelatedInstances

    instances = client.search_for_instances(
        study_instance_uid=study, fields=["StudyDescription", "PatientName"]
    )
    assert len(instances) == 2
    assert instances[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
    assert "00081030" in instances[0]
    everything = client.search_for_instances(search_filters={"PatientID": "PID-002"})
    assert {item["00080018"]["Value"][0] for item in everything} == {
        item["00080018"]["Value"][0] for item in instances
    }


def test_qido_refuses_what_it_cannot_read(searchable: Site) -> None:
    with searchable.client(VIEWER) as http:
        assert http.get("/studies", params={"NoSuchKey": "x"}).status_code == 400
        assert http.get("/studies", params={"limit": "-1"}).status_code == 400
        assert http.get("/studies", params={"PatientID": "NOBODY"}).status_code == 204
        answer = http.get("/studies/*/series")
        assert answer.status_code == 400


def test_wado_rs_study_series_metadata_and_wado_uri(searchable: Site) -> None:
    client = web_client(searchable, VIEWER)
    study, series = uid("web", "s1"), uid("web-series", "s1")
    files = sorted((searchable.appliance.directory / "made" / "s1").iterdir())
    sent = sorted(path.read_bytes() for path in files)

    got = wado_rs_bytes(searchable, f"{searchable.url}/studies/{study}")
    assert sorted(got) == sent
    datasets = client.retrieve_series(study, series)
    assert len(datasets) == 2

    metadata = client.retrieve_study_metadata(study)
    assert len(metadata) == 2
    assert metadata[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert "7FE00010" not in metadata[0]

    sop = str(pydicom.dcmread(files[0]).SOPInstanceUID)
    with searchable.client(VIEWER) as http:
        answer = http.get(
            "/wado",
            params={
                "requestType": "WADO",
                "studyUID": study,
                "seriesUID": series,
                "objectUID": sop,
                "contentType": "application/dicom",
            },
        )
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/dicom"
    assert answer.content == files[0].read_bytes()


def test_metadata_is_json_or_406(searchable: Site) -> None:
    url = f"/studies/{uid('web', 's1')}/metadata"
    with searchable.client(VIEWER) as http:
        xml = http.get(url, headers={"Accept": "application/dicom+xml"})
        both = http.get(
            url, headers={"Accept": "application/dicom+xml, application/dicom+json"}
        )
    assert xml.status_code == 406
    assert both.status_code == 200
    assert both.headers["content-type"].startswith("application/dicom+json")


def test_unknown_study_is_404(searchable: Site) -> None:
    with searchable.client(VIEWER) as http:
        assert http.get("/studies/1.2.3.4.5.404").status_code == 404
        assert http.get("/studies/1.2.3.4.5.404/metadata").status_code == 404
        answer = http.get(
            "/wado",
            params={
                "requestType": "WADO",
                "studyUID": "1.2.3",
                "seriesUID": "1.2.4",
                "objectUID": "1.2.5",
            },
        )
        assert answer.status_code == 404


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=XYZ',
            b"this is not a multipart body at all",
            400,
            "no part starts with the boundary",
        ),
        (
            'multipart/related; type="application/dicom"; boundary=XYZ',
            b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nDICM-ish bytes",
            400,
            "ends before the closing boundary",
        ),
        (
            'multipart/related; type="application/dicom"; boundary=XYZ',
            b"--XYZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XYZ--\r\n",
            400,
            "part 1 is text/plain",
        ),
        ('multipart/related; type="application/dicom"', b"", 400, "no boundary"),
        ("application/json", b"{}", 415, "multipart/related"),
    ],
)
def test_garbage_is_refused_and_nothing_is_stored(
    searchable: Site, content_type: str, body: bytes, status: int, message: str
) -> None:
    before = _instance_count(searchable)
    with searchable.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=body, headers={"Content-Type": content_type}
        )
    assert answer.status_code == status
    assert message in answer.json()["error"]
    assert _instance_count(searchable) == before
    assert incoming_files(searchable.appliance.data_dir / "online") == []


def test_a_caller_hanging_up_mid_body_is_one_log_line(searchable: Site) -> None:
    """A body shorter than its Content-Length, then the connection closed:
    nothing stored, one WARNING line, no traceback, the server still up."""
    before = _instance_count(searchable)
    pair = base64.b64encode(":".join(OPERATOR).encode()).decode()
    head = (
        "POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Basic {pair}\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=XYZ\r\n'
        "Content-Length: 1000000\r\n\r\n"
    )
    port = searchable.appliance.web_port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"--XYZ\r\nContent-Type: application/dicom\r\n")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(4096)  # whatever the server does, it ends the connection
    ended = "the connection ended before the body did; nothing was stored"
    deadline = time.monotonic() + 30
    while ended not in searchable.appliance.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = searchable.appliance.log()
    assert log.count(ended) == 1
    assert "Exception in ASGI application" not in log
    assert "POST /studies 500" not in log
    assert _instance_count(searchable) == before
    assert incoming_files(searchable.appliance.data_dir / "online") == []
    with searchable.client() as http:
        assert http.get("/health").status_code == 200


def test_stow_into_a_study_refuses_instances_of_another(searchable: Site) -> None:
    made = instance(uid("web", "elsewhere"), uid("web-series", "elsewhere"), 1)
    other = pydicom.dcmread(write(made, searchable.appliance.directory / "other"))
    client = web_client(searchable)
    with pytest.raises(requests.HTTPError) as raised:
        client.store_instances([other], study_instance_uid=uid("web", "s1"))
    assert raised.value.response.status_code == 409
    answer = pydicom.Dataset.from_json(raised.value.response.json())
    assert int(answer.FailedSOPSequence[0].FailureReason) == 0xA900


def test_stow_of_one_instance_twice_logs_the_second_as_already_there(
    searchable: Site,
) -> None:
    made = instance(uid("web", "twice"), uid("web-series", "twice"), 1)
    sent = pydicom.dcmread(write(made, searchable.appliance.directory / "twice"))
    start = len(searchable.appliance.log())

    web_client(searchable).store_instances([sent, sent])

    logged = searchable.appliance.log()[start:].splitlines()
    [line] = [each for each in logged if "STOW-RS from" in each]
    assert line.endswith(": 1 instance(s) stored, 1 already there, 0 refused")


def test_stow_refuses_a_uid_too_long_for_dicom_messages(searchable: Site) -> None:
    """As C-STORE does: no C-STORE, C-FIND or C-MOVE could carry it back."""
    long_uid = ROOT + "5" * 45
    with unvalidated():
        made = instance(uid("web", "long"), uid("web-series", "long"), 1)
        made.SOPInstanceUID = long_uid
        made.file_meta.MediaStorageSOPInstanceUID = long_uid
        path = write(made, searchable.appliance.directory / "long")
    before = _instance_count(searchable)
    with searchable.client(OPERATOR) as http:
        body = b"".join(
            [
                b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n",
                path.read_bytes(),
                b"\r\n--XYZ--\r\n",
            ]
        )
        kind = 'multipart/related; type="application/dicom"; boundary=XYZ'
        answer = http.post("/studies", content=body, headers={"Content-Type": kind})
    assert answer.status_code == 409
    failed = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence[0]
    assert int(failed.FailureReason) == 0x0117
    assert "64" in answer.headers["warning"]
    assert _instance_count(searchable) == before
    assert incoming_files(searchable.appliance.data_dir / "online") == []


def test_a_viewer_cannot_store(searchable: Site) -> None:
    made = instance(uid("web", "viewer"), uid("web-series", "viewer"), 1)
    dataset = pydicom.dcmread(write(made, searchable.appliance.directory / "v"))
    with pytest.raises(requests.HTTPError) as raised:
        web_client(searchable, VIEWER).store_instances([dataset])
    assert raised.value.response.status_code == 403
    assert (
        web_client(searchable, VIEWER).search_for_studies(
            search_filters={"StudyInstanceUID": uid("web", "viewer")}
        )
        == []
    )


def test_the_access_log_holds_no_names_or_uids(searchable: Site) -> None:
    client = web_client(searchable, VIEWER)
    client.search_for_studies(search_filters={"PatientName": "Doe^Jane"})
    client.retrieve_study_metadata(uid("web", "s1"))
    access = [
        line
        for line in searchable.appliance.log().splitlines()
        if "appliance.web.access" in line
    ]
    assert any("GET /studies/{study}/metadata 200 reader" in line for line in access)
    text = "\n".join(access)
    for _label, name, patient_id, _date in STUDIES:
        assert name not in text
        assert patient_id not in text
    assert "Doe" not in text
    assert uid("web", "s1") not in text
    assert "1.2." not in text


def _instance_count(site: Site) -> int:
    """Files on the online tier (read from disk, not asked of the server)."""
    objects = site.appliance.data_dir / "online" / "objects"
    return sum(1 for path in objects.rglob("*.dcm"))


def test_stores_searches_and_retrievals_are_audited_with_the_account(
    searchable: Site,
) -> None:
    client = web_client(searchable, VIEWER)
    client.search_for_studies(search_filters={"PatientID": "PID-003"})
    study = uid("web", "s3")
    wado_rs_bytes(searchable, f"{searchable.url}/studies/{study}")

    def records(event: str) -> list[dict[str, Any]]:
        shown = searchable.appliance.cli("audit", "show", "--event", event, "--json")
        return [json.loads(line) for line in shown.stdout.splitlines()]

    stored = [r for r in records("instances-stored") if study in r["studies"]]
    queries = [r for r in records("query") if r["patients"] == ["PID-003"]]
    sent = [r for r in records("instances-retrieved") if study in r["studies"]]
    assert len(stored) == 1 and len(queries) == 1 and len(sent) == 1, (
        stored,
        queries,
        sent,
    )
    assert "uploader@127.0.0.1" in stored[0]["users"]
    assert "reader@127.0.0.1" in queries[0]["users"]
    assert "reader@127.0.0.1" in sent[0]["users"]
