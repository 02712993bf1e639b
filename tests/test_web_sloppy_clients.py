"""DICOMweb against a running ``appliance serve`` asked what it cannot give:
an Accept it cannot serve (406, not another type passed off as the one
asked for), WADO-URI's anonymize (400, not the identified instance), a
numeric key that is no number (400 naming the key), and a STOW-RS body
that stops arriving (408, one log line, nothing left behind)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import socket
import time

import pydicom
import pytest

from appliance.web.stow import REFUSALS_LOGGED
from tests.conftest import incoming_files
from tests.datasets import instance, uid, unvalidated, write
from tests.web_site import OPERATOR, VIEWER, Site, start

BOUNDARY = "sloppy-client-boundary"
# The refusal line of a UID no URL or C-FIND could name again.
UNSENDABLE = "which no C-FIND or DICOMweb URL can carry back"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
DICOM = 'multipart/related; type="application/dicom"'
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
STALL = 1.0
STALLED = "no byte of the body arrived for"


@pytest.fixture(scope="module")
def site(module_appliance_factory: type) -> Site:
    started = start(module_appliance_factory, {"web": {"stow_stall_timeout": STALL}})
    made = instance(uid("sloppy", "study"), uid("sloppy", "series"), 1)
    part = write(made, started.appliance.directory / "made").read_bytes()
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    with started.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=body, headers={"Content-Type": STOW_TYPE}
        )
    assert answer.status_code == 200, answer.text
    return started


def instance_path() -> str:
    return (
        f"/studies/{uid('sloppy', 'study')}/series/{uid('sloppy', 'series')}"
        f"/instances/{made_uid()}"
    )


def made_uid() -> str:
    return str(
        instance(uid("sloppy", "study"), uid("sloppy", "series"), 1).SOPInstanceUID
    )


def stored(site: Site) -> int:
    objects = site.appliance.data_dir / "online" / "objects"
    return sum(1 for _path in objects.rglob("*.dcm"))


@pytest.mark.parametrize(
    "accept",
    [
        "application/dicom+xml",
        "image/png",
        "application/dicom+json;q=0, text/html",
    ],
)
def test_a_search_refuses_an_accept_without_dicom_json(site: Site, accept: str) -> None:
    with site.client(VIEWER) as http:
        answer = http.get("/studies", headers={"Accept": accept})
    assert answer.status_code == 406
    assert "application/dicom+json" in answer.json()["error"]


@pytest.mark.parametrize(
    "accept", ["application/dicom+json", "application/json", "*/*", ""]
)
def test_a_search_answers_an_accept_with_dicom_json(site: Site, accept: str) -> None:
    with site.client(VIEWER) as http:
        answer = http.get("/studies", headers={"Accept": accept})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/dicom+json")


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (f"{DICOM}; transfer-syntax={JPEG_BASELINE}", 406),
        (f"{DICOM}; transfer-syntax=*", 200),
        (f"{DICOM}; transfer-syntax={EXPLICIT_LE}", 200),
        (
            f"{DICOM}; transfer-syntax={JPEG_BASELINE}, "
            f"{DICOM}; transfer-syntax={EXPLICIT_LE}",
            200,
        ),
        (DICOM, 200),
        ("application/dicom;q=0", 406),
    ],
)
def test_wado_rs_sends_only_a_transfer_syntax_asked_for(
    site: Site, accept: str, status: int
) -> None:
    """The stored syntax (Explicit VR Little Endian) is never converted: a
    caller that can decode only JPEG gets 406, not bytes it cannot read."""
    with site.client(VIEWER) as http:
        for path in (instance_path(), f"/studies/{uid('sloppy', 'study')}"):
            answer = http.get(path, headers={"Accept": accept})
            assert answer.status_code == status, answer.text[:200]
            if status == 406 and "transfer-syntax" in accept:
                assert EXPLICIT_LE in answer.json()["error"]


def test_wado_uri_refuses_to_anonymize(site: Site) -> None:
    params = {
        "requestType": "WADO",
        "studyUID": uid("sloppy", "study"),
        "seriesUID": uid("sloppy", "series"),
        "objectUID": made_uid(),
    }
    with site.client(VIEWER) as http:
        assert http.get("/wado", params=params).status_code == 200
        answer = http.get("/wado", params={**params, "anonymize": "yes"})
    assert answer.status_code == 400
    assert "anonymize" in answer.json()["error"]
    assert b"Doe^Jane" not in answer.content


def _wado_uri_params() -> list[tuple[str, str]]:
    return [
        ("requestType", "WADO"),
        ("studyUID", uid("sloppy", "study")),
        ("seriesUID", uid("sloppy", "series")),
        ("objectUID", made_uid()),
    ]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/dicom, image/jpeg", 200),
        ("image/jpeg;q=1, application/dicom;q=0.5", 200),
        ("image/jpeg, application/dicom;q=0", 406),
        ("image/jpeg", 406),
    ],
)
def test_wado_uri_takes_a_list_of_content_types(
    site: Site, content_type: str, status: int
) -> None:
    """contentType is a list with preferences (PS3.18): the instance is sent
    when application/dicom is in it and not refused."""
    params = [*_wado_uri_params(), ("contentType", content_type)]
    with site.client(VIEWER) as http:
        answer = http.get("/wado", params=params)
    assert answer.status_code == status, answer.text[:200]
    if status == 200:
        assert answer.headers["content-type"] == "application/dicom"


@pytest.mark.parametrize("other", ["1.2.826.0.1.3680043.10.1009.404", None])
def test_wado_uri_refuses_an_object_uid_given_twice(
    site: Site, other: str | None
) -> None:
    """Two objectUIDs name two instances; only one would be sent, and which
    one the caller meant cannot be told."""
    params = [*_wado_uri_params(), ("objectUID", other or made_uid())]
    with site.client(VIEWER) as http:
        answer = http.get("/wado", params=params)
    assert answer.status_code == 400
    assert "objectUID given more than once" in answer.json()["error"]


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_a_numeric_key_that_is_no_number_is_named(site: Site, value: str) -> None:
    with site.client(VIEWER) as http:
        answer = http.get("/studies", params={"NumberOfStudyRelatedInstances": value})
    assert answer.status_code == 400
    assert "NumberOfStudyRelatedInstances takes numbers" in answer.json()["error"]


@pytest.mark.parametrize("value", ["0_1", "\u0661", "\uff11", "1\n", "nan"])
@pytest.mark.parametrize(
    ("path", "key"),
    [("/instances", "Rows"), ("/studies", "NumberOfStudyRelatedInstances")],
)
def test_a_number_only_python_reads_is_no_number(
    site: Site, path: str, key: str, value: str
) -> None:
    """'0_1', an Arabic-Indic or a full-width one are numbers to Python's
    int(), not as DICOM writes them: refused, not matched as 1."""
    with site.client(VIEWER) as http:
        assert http.get(path, params={key: " +1 "}).status_code != 400
        answer = http.get(path, params={key: value})
    assert answer.status_code == 400, answer.text[:200]
    assert f"{key} takes numbers" in answer.json()["error"]


def test_a_stalled_chunked_body_is_408_and_leaves_nothing(site: Site) -> None:
    """A chunked STOW-RS body that stops without the connection closing:
    after web.stow_stall_timeout the answer is 408 with Connection: close,
    one WARNING line, nothing stored or spooled, and the server goes on."""
    before = stored(site)
    pair = base64.b64encode(":".join(OPERATOR).encode()).decode()
    head = (
        "POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Basic {pair}\r\n"
        f"Content-Type: {STOW_TYPE}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    first = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nDICM".encode()
    port = site.appliance.web_port
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode() + b"%x\r\n" % len(first) + first + b"\r\n")
        answer = b""
        # The server closes the connection after its answer.
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line.split()[1] == b"408", answer[:300]
    assert b"connection: close" in headers.lower()
    assert "nothing was stored" in json.loads(body)["error"]

    deadline = time.monotonic() + 30
    while STALLED not in site.appliance.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = site.appliance.log()
    assert log.count(STALLED) == 1
    assert "Exception in ASGI application" not in log
    assert stored(site) == before
    assert incoming_files(site.appliance.data_dir / "online") == []
    with site.client(VIEWER) as http:
        assert http.get("/studies").status_code == 200


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("SOPInstanceUID", "1.2.826.0.1.3680043.10.1009.1/2", 0x0117),
        ("SOPInstanceUID", "1.2.826.0.1.3680043.10.1009.1\\2", 0x0117),
        ("SOPInstanceUID", "1.2.826.0.1.3680043.10.1009.1*", 0x0117),
        ("SeriesInstanceUID", "1.2.826.0.1.3680043.10.1009.?", 0xA900),
    ],
)
def test_stow_refuses_a_uid_no_url_can_carry_back(
    site: Site, keyword: str, value: str, reason: int
) -> None:
    """A UID with '/', '\\', '*' or '?' could never be asked for again by
    WADO-RS: refused with a reason, stored nowhere, logged once."""
    label = f"unsendable-{keyword}-{value}"
    body = _stow_body_with(label, keyword, value)
    before = stored(site)
    already = site.appliance.log().count(UNSENDABLE)
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=body, headers={"Content-Type": STOW_TYPE}
        )
    assert answer.status_code == 409
    failed = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence[0]
    assert int(failed.FailureReason) == reason
    assert keyword in answer.headers["warning"]
    assert stored(site) == before
    assert incoming_files(site.appliance.data_dir / "online") == []
    assert site.appliance.log().count(UNSENDABLE) == already + 1
    with site.client(VIEWER) as http:
        found = http.get("/studies", params={"StudyInstanceUID": uid("sloppy", label)})
    assert found.status_code == 204


def test_stow_logs_a_refusal_of_a_uid_with_a_line_break_on_one_line(
    site: Site,
) -> None:
    """Refused before ingest, as of another study than the URL names: the
    SOP Instance UID the part announces is the sender's, and its line break
    would forge a line of the log."""
    value = "1.2.826.0.1.3680043.10.1009.74\nforged"
    body = _stow_body_with("line-break", "SOPInstanceUID", value)
    start = len(site.appliance.log())
    with site.client(OPERATOR) as http:
        answer = http.post(
            f"/studies/{uid('sloppy', 'elsewhere')}",
            content=body,
            headers={"Content-Type": STOW_TYPE},
        )
    assert answer.status_code == 409
    logged = site.appliance.log()[start:].splitlines()
    [line] = [each for each in logged if "forged" in each]
    assert "refused instance 1.2.826.0.1.3680043.10.1009.74\\x0aforged from" in line


def test_a_body_of_many_refused_parts_logs_a_few_lines(site: Site) -> None:
    """Each refused part of a request is in the answer; the log gets the
    first few of them and one line counting the rest, not a WARNING line
    per part (thousands of parts fit in a small body)."""
    parts = REFUSALS_LOGGED + 15
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nnot DICOM\r\n" * parts
        + f"--{BOUNDARY}--\r\n"
    ).encode()
    start = len(site.appliance.log())
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=body, headers={"Content-Type": STOW_TYPE}
        )
    assert answer.status_code == 409
    assert len(pydicom.Dataset.from_json(answer.json()).FailedSOPSequence) == parts
    counted = f"{parts} refused"
    deadline = time.monotonic() + 30
    while counted not in site.appliance.log()[start:] and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = site.appliance.log()[start:]
    assert logged.count("refused instance (unknown)") == REFUSALS_LOGGED
    assert logged.count("15 more instance(s) refused, not logged one by one") == 1


@pytest.mark.parametrize("coding", ["gzip", "identity, deflate"])
def test_a_compressed_stow_body_is_415_and_stores_nothing(
    site: Site, coding: str
) -> None:
    """Not read as a multipart body without its boundary (400, malformed):
    the caller is told the coding is what the server does not take."""
    body = _stow_body_with("compressed", "PatientID", "PID-GZ")
    before = stored(site)
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies",
            content=gzip.compress(body),
            headers={"Content-Type": STOW_TYPE, "Content-Encoding": coding},
        )
    assert answer.status_code == 415
    assert coding.split(", ")[-1] in answer.json()["error"]
    assert answer.headers["accept-encoding"] == "identity"
    assert stored(site) == before
    assert incoming_files(site.appliance.data_dir / "online") == []


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/studies/", "/api/status/", "/health/"])
def test_a_trailing_slash_is_not_redirected_to_the_callers_host(
    site: Site, method: str, path: str
) -> None:
    """No 307 to a URL made of the Host header, before any credentials
    are checked (and a STOW-RS body sent again): the path is not found."""
    with site.client() as http:
        answer = http.request(method, path, headers={"Host": "elsewhere.example"})
    assert answer.status_code in (404, 405)
    assert "location" not in answer.headers


def test_a_search_answers_at_most_qido_max_results(appliance_factory: type) -> None:
    """A search without a limit on a large archive would hold every result
    in memory: the answer stops at web.qido_max_results, and says so."""
    capped = start(appliance_factory, {"web": {"qido_max_results": 2}})
    study, series = uid("capped", "study"), uid("capped", "series")
    parts = [
        write(instance(study, series, n), capped.appliance.directory).read_bytes()
        for n in (1, 2, 3)
    ]
    body = (
        b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + part
            + b"\r\n"
            for part in parts
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    with capped.client(OPERATOR) as http:
        stow = http.post("/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert stow.status_code == 200, stow.text[:200]

    with capped.client(VIEWER) as http:
        first = http.get("/instances")
        rest = http.get("/instances", params={"offset": "2"})
        asked = http.get("/instances", params={"limit": "2"})
        more = http.get("/instances", params={"limit": "5"})
    assert len(first.json()) == 2
    assert "web.qido_max_results" in first.headers["warning"]
    assert "offset=2" in first.headers["warning"]
    assert len(rest.json()) == 1 and "warning" not in rest.headers
    assert len(asked.json()) == 2 and "warning" not in asked.headers
    assert len(more.json()) == 2 and "offset=2" in more.headers["warning"]


def _stow_body_with(label: str, keyword: str, value: str) -> bytes:
    """A STOW-RS body of one instance whose ``keyword`` is ``value``, as
    written without pydicom's checks (the file meta follows a SOP Instance
    UID)."""
    with unvalidated():
        made = instance(uid("sloppy", label), uid("sloppy-series", label), 1)
        setattr(made, keyword, value)
        if keyword == "SOPInstanceUID":
            made.file_meta.MediaStorageSOPInstanceUID = value
        bytes_ = io.BytesIO()
        made.save_as(bytes_, enforce_file_format=True)
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + bytes_.getvalue()
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_a_retrieve_url_is_a_url_even_for_a_uid_with_a_space(site: Site) -> None:
    """A UID with a space is stored with a warning, as by C-STORE; the
    RetrieveURL the answer gives for it must still be a URL that works."""
    body = _stow_body_with("space", "SOPInstanceUID", "1.2.826.0.1.3680043.10.1009.7 7")
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=body, headers={"Content-Type": STOW_TYPE}
        )
    assert answer.status_code == 200, answer.text
    url = pydicom.Dataset.from_json(answer.json()).ReferencedSOPSequence[0].RetrieveURL
    assert " " not in url
    assert url.endswith("/instances/1.2.826.0.1.3680043.10.1009.7%207")
    with site.client(VIEWER) as http:
        assert http.get(url, headers={"Accept": DICOM}).status_code == 200


@pytest.mark.parametrize("padding", ["%00", "%20", "%20%00", "%09"])
def test_a_uid_of_padding_alone_names_nothing(site: Site, padding: str) -> None:
    """Matching trims spaces and NULs from a UID: one of nothing else
    would be the universal match, the whole archive in one study's answer
    (every study recalled from tape for it)."""
    with site.client(VIEWER) as http:
        for path in (
            f"/studies/{padding}",
            f"/studies/{padding}/metadata",
            f"/studies/{padding}/series",
            f"/studies/{uid('sloppy', 'study')}/series/{padding}",
        ):
            answer = http.get(path)
            assert answer.status_code == 400, path
            assert "not a UID" in answer.json()["error"]
        answer = http.get(
            "/wado?requestType=WADO"
            f"&studyUID={padding}&seriesUID={padding}&objectUID={padding}"
        )
        assert answer.status_code == 400
        assert not answer.content.startswith(b"\0" * 128)


@pytest.mark.parametrize("path", ["study", "instance", "search"])
def test_head_is_not_served_as_a_hidden_retrieve(site: Site, path: str) -> None:
    """HEAD would run the whole GET (a recall, an audited retrieval) only to
    drop the body: it is refused, and GET still answers."""
    url = {
        "study": f"/studies/{uid('sloppy', 'study')}",
        "instance": instance_path(),
        "search": "/studies",
    }[path]
    with site.client(VIEWER) as http:
        answer = http.head(url)
        assert answer.status_code == 405
        assert "GET" in answer.headers["Allow"]
        assert http.get(url).status_code == 200
