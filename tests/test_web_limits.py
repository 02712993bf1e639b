"""What the HTTP server refuses to do without limit, against a running
``appliance serve`` with httpx: STOW-RS bodies past web.max_stow_bytes
(413, nothing stored), QIDO-RS keys it cannot match (a Warning header),
and repeated failed logins (429 with Retry-After, per user name and
address and per address)."""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest

from appliance.web.throttle import LoginThrottle
from tests.conftest import incoming_files
from tests.datasets import instance, uid, write
from tests.web_site import OPERATOR, VIEWER, Site, start

LIMIT = 256 * 1024
BOUNDARY = "limits-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
LOCKED = "web login locked for"


@pytest.fixture(scope="module")
def site(module_appliance_factory: type) -> Site:
    return start(module_appliance_factory, {"web": {"max_stow_bytes": LIMIT}})


def from_address(site: Site, address: str, auth: tuple[str, str]) -> httpx.Client:
    """A client whose connections come from ``address`` (any of 127/8 is
    the loopback), so that each test is a caller of its own."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=site.url, auth=auth, timeout=60, transport=transport)


def stow_body(site: Site, label: str, pixel_bytes: int) -> bytes:
    made = instance(
        uid("limits", label), uid("limits-series", label), 1, pixel_bytes=pixel_bytes
    )
    part = write(made, site.appliance.directory / "made" / label).read_bytes()
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def stored(site: Site) -> int:
    objects = site.appliance.data_dir / "online" / "objects"
    return sum(1 for _path in objects.rglob("*.dcm"))


def wait_for_log(site: Site, text: str, count: int) -> str:
    deadline = time.monotonic() + 30
    while site.appliance.log().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return site.appliance.log()


# -- STOW-RS body limit -----------------------------------------------------------


def test_a_body_announced_too_long_is_refused_before_it_is_read(site: Site) -> None:
    before = stored(site)
    # Only the request's head is sent, announcing 64 MiB: the answer must
    # come without any of the body. (A client that went on sending would
    # race the server's close: unread bytes make the kernel reset the
    # connection, and the answer can be lost on the way.)
    declared = 64 * 2**20
    credentials = base64.b64encode(":".join(OPERATOR).encode()).decode()
    head = (
        "POST /studies HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{site.appliance.web_port}\r\n"
        f"Authorization: Basic {credentials}\r\n"
        f"Content-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", site.appliance.web_port)) as sock:
        sock.settimeout(60)
        sock.sendall(head.encode())
        answer = _read_answer(sock)
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    assert b"connection: close" in headers.lower()
    assert "web.max_stow_bytes" in json.loads(body)["error"]
    log = wait_for_log(site, "refused: the body is longer than", 1)
    assert log.count("refused: the body is longer than") == 1
    assert "Exception in ASGI application" not in log
    assert stored(site) == before
    assert incoming_files(site.appliance.data_dir / "online") == []


def _read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_chunked_body_is_cut_off_at_the_limit(site: Site) -> None:
    before = stored(site)
    already = site.appliance.log().count("refused: the body is longer than")
    # One real instance bigger than the limit, sent chunked (no length).
    body = stow_body(site, "chunked", LIMIT + 4096)
    pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=iter(pieces), headers={"Content-Type": STOW_TYPE}
        )
        assert answer.request.headers["transfer-encoding"] == "chunked"
    assert answer.status_code == 413
    log = wait_for_log(site, "refused: the body is longer than", already + 1)
    assert log.count("refused: the body is longer than") == already + 1
    assert stored(site) == before
    assert incoming_files(site.appliance.data_dir / "online") == []

    # The service is still up, and a body within the limit is stored.
    small = stow_body(site, "small", 8192)
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies", content=small, headers={"Content-Type": STOW_TYPE}
        )
        chunked = http.post(
            "/studies",
            content=iter([stow_body(site, "small-chunked", 8192)]),
            headers={"Content-Type": STOW_TYPE},
        )
    assert answer.status_code == 200, answer.text
    assert chunked.status_code == 200, chunked.text
    assert stored(site) == before + 2


# -- QIDO-RS keys not matched -----------------------------------------------------


def test_qido_names_what_it_did_not_match_and_answers_the_rest(site: Site) -> None:
    with site.client(OPERATOR) as http:
        answer = http.post(
            "/studies",
            content=stow_body(site, "qido", 1024),
            headers={"Content-Type": STOW_TYPE},
        )
        assert answer.status_code == 200, answer.text
    study = uid("limits", "qido")
    with site.client(VIEWER) as http:
        plain = http.get("/studies", params={"StudyInstanceUID": study})
        # Modality is a series attribute: at the study level it matches
        # nothing here (ModalitiesInStudy does), so it is left out.
        mixed = http.get(
            "/studies",
            params=[
                ("StudyInstanceUID", study),
                ("Modality", "MR"),
                ("00180015", "HEAD"),  # BodyPartExamined, by tag
                ("fuzzymatching", "true"),
                ("multiplevaluematching", "false"),
            ],
        )
        series = http.get(
            "/series", params={"StudyInstanceUID": study, "Modality": "CT"}
        )
        wrong = http.get(
            "/series", params={"StudyInstanceUID": study, "Modality": "MR"}
        )
    assert plain.status_code == 200 and "warning" not in plain.headers
    assert mixed.status_code == 200
    assert mixed.json() == plain.json()
    warning = mixed.headers["warning"]
    agent = f"127.0.0.1:{site.appliance.web_port}"
    assert warning.startswith(f'299 {agent} "fuzzymatching=true is not supported')
    assert f'299 {agent} "not matched at the study level' in warning
    assert "Modality, 00180015" in warning
    assert "multiplevaluematching" not in warning
    # At the series level Modality is matched: no warning, and it narrows.
    assert series.status_code == 200 and "warning" not in series.headers
    assert wrong.status_code == 204
    log = site.appliance.log()
    assert log.count("QIDO-RS from DICOMweb account reader: not supported") == 1


# -- failed logins ----------------------------------------------------------------


def test_five_failures_lock_the_pair_but_not_other_addresses(site: Site) -> None:
    wrong = (VIEWER[0], "not-the-password")
    with from_address(site, "127.0.0.2", wrong) as http:
        first = [http.get("/openapi.json").status_code for _ in range(5)]
        locked = http.get("/openapi.json")
        again = http.get("/openapi.json")
    assert first == [401] * 5
    assert locked.status_code == 429
    assert 0 < int(locked.headers["retry-after"]) <= 60
    assert again.status_code == 429

    # The right password from the same address waits too...
    with from_address(site, "127.0.0.2", VIEWER) as http:
        assert http.get("/openapi.json").status_code == 429
    # ...but not from another address, nor another user from this one.
    with from_address(site, "127.0.0.3", VIEWER) as http:
        assert http.get("/openapi.json").status_code == 200
    with from_address(site, "127.0.0.2", OPERATOR) as http:
        assert http.get("/openapi.json").status_code == 200

    log = wait_for_log(site, LOCKED, 1)
    lines = [line for line in log.splitlines() if LOCKED in line]
    assert len(lines) == 1, lines
    assert f"user '{VIEWER[0]}' from 127.0.0.2" in lines[0]
    assert "not-the-password" not in log

    shown = site.appliance.cli("audit", "show", "--event", "login-refused", "--json")
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    locks = [r for r in records if "locked" in json.dumps(r)]
    assert len(locks) == 1, locks
    assert f"{VIEWER[0]}@127.0.0.2" in locks[0]["users"]


def test_many_user_names_from_one_address_lock_the_address(site: Site) -> None:
    already = site.appliance.log().count(LOCKED)
    codes = []
    for number in range(20):
        with from_address(site, "127.0.0.4", (f"guess{number}", "x")) as http:
            codes.append(http.get("/openapi.json").status_code)
    assert codes == [401] * 20
    with from_address(site, "127.0.0.4", VIEWER) as http:
        answer = http.get("/openapi.json")
    assert answer.status_code == 429
    assert int(answer.headers["retry-after"]) > 0
    with from_address(site, "127.0.0.5", VIEWER) as http:
        assert http.get("/openapi.json").status_code == 200
    log = wait_for_log(site, LOCKED, already + 1)
    lines = [line for line in log.splitlines() if LOCKED in line][already:]
    assert len(lines) == 1, lines
    assert "any user from 127.0.0.4" in lines[0]


# -- the login throttle's clock ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock) -> LoginThrottle:
    return LoginThrottle(5, 20, window=300.0, longest_lock=900.0, clock=clock)


def test_locks_grow_to_the_longest_and_end() -> None:
    clock = Clock()
    limiter = throttle(clock)
    lengths = []
    for _round in range(6):
        for _ in range(4):
            assert limiter.failed("10.0.0.1", "admin") == []
        (lock,) = limiter.failed("10.0.0.1", "admin")
        assert (lock.address, lock.user, lock.failures) == ("10.0.0.1", "admin", 5)
        lengths.append(lock.seconds)
        assert limiter.wait("10.0.0.1", "admin") == lock.seconds
        clock.now += lock.seconds - 0.5
        assert limiter.wait("10.0.0.1", "admin") == 1
        clock.now += 0.5
        assert limiter.wait("10.0.0.1", "admin") == 0
    assert lengths == [60, 120, 240, 480, 900, 900]
    # Other pairs were never held.
    assert limiter.wait("10.0.0.2", "admin") == 0
    assert limiter.wait("10.0.0.1", "other") == 0


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    limiter = throttle(clock)
    for _ in range(10):
        assert limiter.failed("10.0.0.1", "admin") == []
        clock.now += 76  # any five failures span more than the 300 s window
    assert limiter.wait("10.0.0.1", "admin") == 0


def test_a_correct_login_clears_the_pair_and_quiet_forgets_growth() -> None:
    clock = Clock()
    limiter = throttle(clock)
    for _ in range(4):
        limiter.failed("10.0.0.1", "admin")
    limiter.succeeded("10.0.0.1", "admin")
    assert limiter.failed("10.0.0.1", "admin") == []

    for _ in range(4):
        limiter.failed("10.0.0.3", "admin")
    assert [lock.seconds for lock in limiter.failed("10.0.0.3", "admin")] == [60]
    # Quiet for a window and the longest lock: the next lock is the first.
    clock.now += 300 + 900 + 1
    limiter.failed("10.0.0.9", "someone")  # any failure tidies the table
    for _ in range(4):
        limiter.failed("10.0.0.3", "admin")
    assert [lock.seconds for lock in limiter.failed("10.0.0.3", "admin")] == [60]


def test_an_address_trying_many_names_is_locked_whatever_the_name() -> None:
    clock = Clock()
    limiter = throttle(clock)
    begun = [lock for n in range(20) for lock in limiter.failed("10.0.0.1", f"u{n}")]
    assert [(lock.user, lock.seconds) for lock in begun] == [(None, 60)]
    assert limiter.wait("10.0.0.1", "admin") == 60
    assert limiter.wait("10.0.0.2", "admin") == 0
    # Failures while locked begin no second lock (logged once).
    assert limiter.failed("10.0.0.1", "u0") == []


def test_the_table_stays_bounded() -> None:
    clock = Clock()
    limiter = throttle(clock)
    for n in range(25_000):
        limiter.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", "x")
    assert len(limiter._records) <= 10_000
