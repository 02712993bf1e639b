"""The HTTP server under ``appliance serve`` closes a connection whose
request line and headers are not complete within web.header_timeout: one
that sends nothing (over plain HTTP and over TLS), one that trickles its
headers a byte at a time, and one kept alive whose next request trickles;
with one log line each, while other connections are served, and without
cutting a request body that comes slowly after its headers."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from tests.certificates import Authority
from tests.datasets import instance, uid, write
from tests.loopback import connect_from, new_address
from tests.web_site import OPERATOR, VIEWER, Site, start

LIMIT = 1.0
# Far longer than LIMIT, yet a test that fails still ends.
PATIENCE = 30.0
# A byte every TRICKLE seconds: the head below would take some 40 s.
TRICKLE = 0.2
CLOSED = "closed: its request headers were not complete in"
BOUNDARY = "header-timeout-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture(scope="module")
def site(module_appliance_factory: type) -> Site:
    started = start(module_appliance_factory, {"web": {"header_timeout": LIMIT}})
    # Once this is answered, uvicorn serves: the clocks below are its own.
    with started.client() as http:
        assert http.get("/health").status_code == 200
    return started


def head(port: int) -> bytes:
    return (
        f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"X-Padding: {'p' * 150}\r\n\r\n"
    ).encode()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server hung up within PATIENCE, sending nothing."""
    sock.settimeout(PATIENCE)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def trickle(sock: socket.socket, data: bytes) -> int:
    """Send ``data`` a byte every TRICKLE seconds until the server hangs
    up; how many bytes were sent."""
    sock.settimeout(TRICKLE)
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
            if sock.recv(1) == b"":
                return sent + 1
        except TimeoutError:
            continue
        except OSError:
            return sent
    return len(data)


def lines_about(site: Site, sock: socket.socket, count: int = 1) -> int:
    """The log lines about ``sock`` closed by the limit, once ``count`` are
    there (or after PATIENCE)."""
    host, port = sock.getsockname()[:2]
    needle = f"HTTP connection from {host}:{port} {CLOSED}"
    deadline = time.monotonic() + PATIENCE
    while site.appliance.log().count(needle) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    # A little longer: a second line would come right after the first.
    time.sleep(0.5)
    return site.appliance.log().count(needle)


@pytest.fixture
def connect(site: Site) -> Iterator[type]:
    """Open connections to the server, each from a loopback address of its
    own (or from ``source``): each closed one gets its line. All are
    closed after the test."""
    opened: list[socket.socket] = []

    def open_one(source: str | None = None) -> socket.socket:
        address = source or new_address()
        sock = connect_from(address, site.appliance.web_port)
        opened.append(sock)
        return sock

    yield open_one  # type: ignore[misc]
    for sock in opened:
        sock.close()


def test_silent_and_trickling_connections_are_closed_others_served(
    site: Site, connect: type
) -> None:
    silent = connect()
    trickling = connect()
    sent: list[int] = []
    trickler = threading.Thread(
        target=lambda: sent.append(trickle(trickling, head(site.appliance.web_port)))
    )
    started = time.monotonic()
    trickler.start()
    try:
        # Meanwhile another connection is served as usual.
        with site.client(VIEWER) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/openapi.json").status_code == 200
        assert closed_by_server(silent)
        # Not before the limit (the margin is for clocks, not for speed).
        assert time.monotonic() - started > LIMIT / 2
    finally:
        trickler.join(PATIENCE + 60)
    assert sent and sent[0] < len(head(site.appliance.web_port)), sent
    assert lines_about(site, silent) == 1
    assert lines_about(site, trickling) == 1
    log = site.appliance.log()
    host, port = silent.getsockname()[:2]
    assert f"{host}:{port} {CLOSED} 1 s (web.header_timeout; 0 bytes" in log


def test_silent_connections_from_one_address_are_logged_once(
    site: Site, connect: type
) -> None:
    """A client that opens connections and sends nothing gets one line a
    minute, not one per connection; each is still closed."""
    flooding = new_address()
    silent = [connect(flooding) for _ in range(4)]

    assert all(closed_by_server(sock) for sock in silent)
    assert lines_about(site, silent[0]) == 1
    time.sleep(0.5)
    log = site.appliance.log()
    assert log.count(f"HTTP connection from {flooding}:") == 1


def read_answer(sock: socket.socket) -> bytes:
    """One answer to GET /health (a JSON body with a Content-Length)."""
    sock.settimeout(PATIENCE)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    headers, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return headers


def test_a_kept_alive_connection_gets_the_limit_for_its_next_request(
    site: Site, connect: type
) -> None:
    port = site.appliance.web_port
    trickling, idle = connect(), connect()
    for sock in (trickling, idle):
        sock.sendall(head(port))
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
    assert trickle(trickling, head(port)) < len(head(port))
    assert lines_about(site, trickling) == 1
    # Only idle between requests (uvicorn's keep-alive): nothing to report.
    assert closed_by_server(idle)
    assert lines_about(site, idle, count=0) == 0


def stow_body(site: Site) -> bytes:
    made = instance(uid("header-timeout", "study"), uid("header-timeout", "s"), 1)
    part = write(made, site.appliance.directory / "made").read_bytes()
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_a_body_coming_slowly_is_not_cut_while_a_slow_head_is(
    site: Site, connect: type
) -> None:
    body = stow_body(site)
    pieces = 12
    size = -(-len(body) // pieces)

    def slowly() -> Iterator[bytes]:
        # Some 3 s in all, three times the limit, without a stall.
        for start_at in range(0, len(body), size):
            time.sleep(3 * LIMIT / pieces)
            yield body[start_at : start_at + size]

    before = site.appliance.log().count(CLOSED)
    trickling = connect()
    sent: list[int] = []
    trickler = threading.Thread(
        target=lambda: sent.append(trickle(trickling, head(site.appliance.web_port)))
    )
    trickler.start()
    try:
        with site.client(OPERATOR) as http:
            answer = http.post(
                "/studies", content=slowly(), headers={"Content-Type": STOW_TYPE}
            )
    finally:
        trickler.join(PATIENCE + 60)
    assert answer.status_code == 200, answer.text
    assert sent and sent[0] < len(head(site.appliance.web_port)), sent
    assert lines_about(site, trickling) == 1
    # That line only: none for the upload's connection.
    assert site.appliance.log().count(CLOSED) == before + 1


def test_over_tls_a_silent_connection_is_closed(
    appliance_factory: type, tmp_path
) -> None:
    authority = Authority(tmp_path, "web")
    issued = authority.issue("appliance", hosts=("127.0.0.1",))
    tls = {
        "header_timeout": LIMIT,
        "tls_certificate": str(issued.certificate),
        "tls_key": str(issued.key),
    }
    tls_site = start(appliance_factory, {"web": tls})
    trusted = ssl.create_default_context(cafile=str(authority.certificate))
    address = ("127.0.0.1", tls_site.appliance.web_port)
    with (
        socket.create_connection(address) as raw,
        trusted.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        assert closed_by_server(sock)
        assert lines_about(tls_site, sock) == 1


def _action_announcing_100_bytes() -> bytes:
    """An operator's recall request whose header announces a body of 100
    bytes, without the body."""
    credentials = base64.b64encode(":".join(OPERATOR).encode()).decode()
    return (
        f"POST /api/recall HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Basic {credentials}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()


def test_an_action_body_that_never_comes_is_408(site: Site) -> None:
    """An operator action announces a body and sends none: answered 408
    within web.header_timeout, not held open for ever, with one line."""
    request = _action_announcing_100_bytes()
    start = len(site.appliance.log())
    with socket.create_connection(("127.0.0.1", site.appliance.web_port)) as sock:
        sock.sendall(request + b'{"study_uid": ')
        sock.settimeout(PATIENCE)
        answer = sock.recv(200)
    assert answer.startswith(b"HTTP/1.1 408")
    deadline = time.monotonic() + PATIENCE
    stalled = "its body was not complete in 1 s"
    while stalled not in site.appliance.log()[start:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.appliance.log()[start:].count(stalled) == 1


def test_an_action_body_cut_by_a_hang_up_is_one_line(site: Site) -> None:
    """The caller hangs up in the middle of an action's body: one WARNING
    line, not an ERROR with a traceback from the server."""
    request = _action_announcing_100_bytes()
    start = len(site.appliance.log())
    with socket.create_connection(("127.0.0.1", site.appliance.web_port)) as sock:
        sock.sendall(request + b'{"study_uid": ')
        time.sleep(0.3)
    ended = "the connection ended before the body did"
    deadline = time.monotonic() + PATIENCE
    while ended not in site.appliance.log()[start:] and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = site.appliance.log()[start:]
    assert logged.count(ended) == 1
    assert "Traceback" not in logged


def test_junk_requests_from_one_address_are_one_line(site: Site) -> None:
    """uvicorn's 'Invalid HTTP request received.' line came once per
    connection, without the address: a client sending junk needs no
    account. Now the first names the address, the others are counted."""
    address = new_address()
    start = len(site.appliance.log())
    for _ in range(5):
        with connect_from(address, site.appliance.web_port) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            sock.settimeout(PATIENCE)
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with site.client() as http:
        assert http.get("/health").status_code == 200
    logged = site.appliance.log()[start:]
    refused = f"HTTP request from {address}:"
    assert logged.count(refused) == 1, logged
    assert "refused: Invalid HTTP request received." in logged
    assert "uvicorn.error" not in logged
