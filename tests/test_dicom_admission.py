"""Connections that are no association: bytes that are no DICOM, requests
that never arrive whole, and garbage on an open association, against a
real ``appliance serve``.

Each must get its answer (one A-ABORT, or the connection closed when the
ARTIM timer runs out), exactly one log line naming the peer, and leave the
service serving everyone else.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.loopback import connect_from, new_address

# A-ABORT, service-user source, no reason (PS3.8 9.3.8): what action AA-1
# sends on a connection that has no association yet.
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
# An A-ASSOCIATE-RQ header that promises 256 bytes, of which none follow.
HALF_REQUEST = b"\x01\x00\x00\x00\x01\x00"
ARTIM = 2.0

RANDOM = bytes([0xA5]) + random.Random(7).randbytes(65535)
JUNK = {
    "random bytes": (RANDOM, "not DICOM: the first bytes are a5 "),
    "an HTTP request": (b"GET / HTTP/1.0\r\n\r\n", "first bytes are 47 45 54 20"),
    "a request of impossible length": (
        b"\x01\x00\xff\xff\xff\xff" + bytes(64),
        "impossible length of 4294967295 bytes",
    ),
    "data before any association": (
        b"\x04\x00\x00\x00\x00\x06" + bytes(6),
        "PDU type 0x04 where an A-ASSOCIATE-RQ was due",
    ),
}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """One appliance holding one study, with a short ARTIM timer and a
    network timeout far longer than any test waits."""
    root = tmp_path_factory.mktemp("admission")
    settings = {
        "timeouts": {"association": ARTIM, "network": 120},
        "replication": {"enabled": False},
    }
    appliance = Appliance(root, settings)
    appliance.start()
    try:
        study = datasets.uid("study", "admission")
        path = datasets.write(
            datasets.instance(study, datasets.uid("series", "admission"), 1),
            root / "source",
        )
        assert client.store_files(appliance.port, [path]) == {path: 0}
        yield appliance
    finally:
        appliance.stop()


def connect(
    appliance: Appliance, source: str = "127.0.0.1"
) -> tuple[socket.socket, str]:
    """A raw connection to the appliance (from the loopback address
    ``source``) and the peer name it logs."""
    sock = connect_from(source, appliance.port, timeout=10)
    host, port = sock.getsockname()[:2]
    return sock, f"{host}:{port}"


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the appliance sends until it closes the connection, and when it
    closed it (seconds from now); the time is inf if it did not."""
    start = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < within:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic() - start
        if not data:
            return received, time.monotonic() - start
        received += data
    return received, float("inf")


def log_lines(appliance: Appliance, start: int, needle: str) -> list[str]:
    return [line for line in appliance.log()[start:].splitlines() if needle in line]


def wait_for_lines(
    appliance: Appliance, start: int, needle: str, within: float = 5
) -> list[str]:
    deadline = time.monotonic() + within
    while not (lines := log_lines(appliance, start, needle)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return lines


def assert_still_serving(appliance: Appliance) -> None:
    assert client.echo(appliance.port) == 0
    matches, status = client.find(appliance.port, client.study_identifier())
    assert status == 0
    assert len(matches) == 1


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_junk_gets_one_abort_and_one_log_line(appliance: Appliance, junk: str) -> None:
    data, reason = JUNK[junk]
    start = len(appliance.log())

    # From an address of its own: one a minute per address is logged.
    sock, peer = connect(appliance, new_address())
    with sock:
        sock.sendall(data)
        received, closed_after = read_until_closed(sock, within=10)

    assert received == A_ABORT
    assert closed_after < 5
    lines = wait_for_lines(appliance, start, peer)
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0]
    assert reason in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert_still_serving(appliance)


def test_junk_from_one_address_is_logged_once(appliance: Appliance) -> None:
    """A peer that sends junk on connection after connection gets one line a
    minute, not one per connection; each still gets its A-ABORT, and another
    address gets its own line."""
    start = len(appliance.log())
    flooding, other = new_address(), new_address()
    sent = [(flooding, data) for data, _reason in JUNK.values()]
    sent.append((other, RANDOM))

    answers = []
    for source, data in sent:
        sock, _peer = connect(appliance, source)
        with sock:
            sock.sendall(data)
            answers.append(read_until_closed(sock, within=10)[0])

    assert answers == [A_ABORT] * len(sent)
    from_flooding = log_lines(appliance, start, f"connection from {flooding}:")
    from_other = wait_for_lines(appliance, start, f"connection from {other}:")
    assert len(from_flooding) == 1, from_flooding
    assert len(from_other) == 1, from_other
    assert "not DICOM" in from_other[0]
    assert_still_serving(appliance)


def test_a_port_check_leaves_no_trace(appliance: Appliance) -> None:
    start = len(appliance.log())
    sock, peer = connect(appliance)
    sock.close()

    assert client.echo(appliance.port) == 0
    assert not log_lines(appliance, start, peer)
    assert "pynetdicom" not in appliance.log()[start:]


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    """Send a request one byte at a time, never faster than the timer."""
    with contextlib.suppress(OSError):
        sock.sendall(HALF_REQUEST)
        while not stop.wait(0.25):
            sock.sendall(b"\x00")


def test_stalled_requests_cannot_keep_associations_out(
    appliance_factory, tmp_path: Path
) -> None:
    appliance = appliance_factory(
        settings={
            "node": {"max_associations": 2},
            "timeouts": {"association": ARTIM, "network": 120},
            "replication": {"enabled": False},
        },
        workers=2,
    ).start()
    start = len(appliance.log())
    # Each from an address of its own: each gets its line.
    stalled = [connect(appliance, new_address()) for _ in range(5)]
    opened = time.monotonic()
    for sock, _peer in stalled[:3]:
        sock.sendall(HALF_REQUEST)
    # stalled[3] sends nothing at all; stalled[4] keeps sending, slowly.
    stop = threading.Event()
    trickler = threading.Thread(target=_trickle, args=(stalled[4][0], stop))
    trickler.start()

    # Two real associations, the limit, while five connections stall.
    echo = [(client.Verification, [])]
    with (
        client.associate(appliance.port, echo) as one,
        client.associate(appliance.port, echo) as two,
    ):
        assert one.is_established and two.is_established
        assert int(one.send_c_echo().Status) == 0

    try:
        closed = [read_until_closed(sock, within=20)[1] for sock, _ in stalled]
    finally:
        stop.set()
        trickler.join()
        for sock, _peer in stalled:
            sock.close()
    waited = time.monotonic() - opened

    # Closed by the ARTIM timer, not by the two-minute network timeout.
    assert max(closed) < ARTIM + 5, closed
    assert waited > ARTIM - 0.5
    for _sock, peer in stalled:
        lines = log_lines(appliance, start, peer)
        assert len(lines) == 1, lines
        assert "no whole A-ASSOCIATE-RQ within the ARTIM timer" in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert client.echo(appliance.port) == 0


def test_stalled_connections_from_one_address_are_logged_once(
    appliance: Appliance,
) -> None:
    """A peer that opens connections and sends nothing gets one line a
    minute, not one per connection; each connection is still closed by the
    ARTIM timer, and another address gets its own line."""
    start = len(appliance.log())
    flooding, other = new_address(), new_address()
    stalled = [connect(appliance, flooding) for _ in range(4)]
    stalled.append(connect(appliance, other))
    for sock, _peer in stalled[::2]:
        sock.sendall(HALF_REQUEST)  # the others send nothing at all

    try:
        closed = [read_until_closed(sock, within=20)[1] for sock, _ in stalled]
    finally:
        for sock, _peer in stalled:
            sock.close()

    assert max(closed) < ARTIM + 5, closed
    timer = "no whole A-ASSOCIATE-RQ within the ARTIM timer"
    from_flooding = log_lines(appliance, start, f"connection from {flooding}:")
    from_other = log_lines(appliance, start, f"connection from {other}:")
    assert len(from_flooding) == 1, from_flooding
    assert len(from_other) == 1, from_other
    assert timer in from_flooding[0] and timer in from_other[0]
    assert_still_serving(appliance)


def test_large_association_request_is_admitted(appliance: Appliance) -> None:
    """A request far larger than a TCP receive window starts with: the
    admission waits for all of it without reading it."""
    sizes: list[int] = []
    ae = AE(ae_title=client.CLIENT_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in StoragePresentationContexts[:127]:
        ae.add_requested_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_requested_context(client.Verification)

    def sent(event: evt.Event) -> None:
        sizes.append(len(event.pdu.encode()))

    assoc = ae.associate(
        "127.0.0.1",
        appliance.port,
        ae_title="APPLIANCE",
        evt_handlers=[(evt.EVT_PDU_SENT, sent)],
    )
    try:
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    assert sizes[0] > 128 * 1024


def test_garbage_on_an_open_association_aborts_it_with_one_line(
    appliance: Appliance,
) -> None:
    start = len(appliance.log())
    with client.associate(appliance.port, [(client.Verification, [])]) as assoc:
        assert assoc.is_established
        assert assoc.dul.socket is not None
        assert assoc.dul.socket.socket is not None
        assoc.dul.socket.socket.sendall(RANDOM[:8192])
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted

    lines = wait_for_lines(appliance, start, "not DICOM")
    assert len(lines) == 1, lines
    assert "aborting association with TESTCLIENT@127.0.0.1" in lines[0]
    assert "PDU type 0xA5" in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert_still_serving(appliance)


def test_a_pdu_longer_than_announced_aborts_with_one_line(
    appliance: Appliance,
) -> None:
    """A P-DATA-TF that announces gigabytes is not read into memory."""
    start = len(appliance.log())
    with client.associate(appliance.port, [(client.Verification, [])]) as assoc:
        assert assoc.is_established
        assert assoc.dul.socket is not None
        assert assoc.dul.socket.socket is not None
        assoc.dul.socket.socket.sendall(b"\x04\x00\xff\xff\xff\xf0" + bytes(4096))
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted

    lines = wait_for_lines(appliance, start, "more than the")
    assert len(lines) == 1, lines
    assert "aborting association with TESTCLIENT@127.0.0.1" in lines[0]
    assert "PDU type 0x04 of 4294967280 bytes" in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert_still_serving(appliance)


def test_a_pdu_header_sent_a_byte_at_a_time_is_checked_too(
    appliance: Appliance,
) -> None:
    """The length is checked when the header has arrived, in however many
    pieces: the appliance does not wait for the body it announces."""
    start = len(appliance.log())
    with client.associate(appliance.port, [(client.Verification, [])]) as assoc:
        assert assoc.is_established
        assert assoc.dul.socket is not None
        assert assoc.dul.socket.socket is not None
        header = b"\x04\x00\x40\x00\x00\x00"  # a P-DATA-TF of 1 GiB
        client.send_a_byte_at_a_time(assoc.dul.socket.socket, header)
        assert client.wait_until_aborted(assoc)

    lines = wait_for_lines(appliance, start, "more than the")
    assert len(lines) == 1, lines
    assert "aborting association with TESTCLIENT@127.0.0.1" in lines[0]
    assert "PDU type 0x04 of 1073741824 bytes" in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert_still_serving(appliance)


def test_connections_beyond_the_limit_are_closed_at_once(
    appliance: Appliance,
) -> None:
    """Four connections per association allowed (32 by default) may wait
    for their request; more are closed unanswered, logged once."""
    start = len(appliance.log())
    limit = 4 * 32
    opened = [connect(appliance)[0] for _ in range(limit)]
    try:
        extra = [connect(appliance)[0] for _ in range(3)]
        for sock in extra:
            data, waited = read_until_closed(sock, within=1.5)
            assert data == b"" and waited < 1.5
            sock.close()
        lines = wait_for_lines(appliance, start, "closed unanswered")
        assert len(lines) == 1, lines
        assert f"{limit} connections are open already" in lines[0]
    finally:
        for sock in opened:
            sock.close()
    # Once the crowd has gone, associations are served again.
    deadline = time.monotonic() + 10
    while client.echo(appliance.port) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_still_serving(appliance)


def _item(kind: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU item (PS3.8 9.3.2): type, reserved, length, body; ``length``
    overrides the length field."""
    announced = len(body) if length is None else length
    return bytes([kind, 0]) + struct.pack(">H", announced) + body


def association_request(
    called: bytes = b"APPLIANCE",
    calling: bytes = b"RAWCLIENT",
    version: int = 1,
    context_name: bytes = _item(0x10, b"1.2.840.10008.3.1.1.1"),
) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification, built byte by byte so that
    any field can hold what pynetdicom would never send."""
    context = _item(
        0x20,
        bytes([1, 0, 0, 0])
        + _item(0x30, b"1.2.840.10008.1.1")
        + _item(0x40, b"1.2.840.10008.1.2"),
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3"))
    body = (
        struct.pack(">HH", version, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + context_name
        + context
        + user
    )
    return bytes([0x01, 0]) + struct.pack(">L", len(body)) + body


BAD_REQUESTS = {
    "a line break in the calling AE title": (
        association_request(calling=b"EVIL\nFAKE LOG"),
        r"'Calling AE Title' value 'EVIL\x0aFAKE LOG'",
    ),
    "control characters in the called AE title": (
        association_request(called=b"APP\x01\x1bLIANCE"),
        r"'Called AE Title' value 'APP\x01\x1bLIANCE'",
    ),
    "an application context of length 0 before its name": (
        association_request(
            context_name=_item(0x10, b"1.2.840.10008.3.1.1.1", length=0)
        ),
        "an item is longer than the rest of the PDU",
    ),
}


@pytest.mark.parametrize("request_name", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_an_undecodable_request_gets_one_escaped_line_naming_the_peer(
    appliance: Appliance, request_name: str
) -> None:
    data, reason = BAD_REQUESTS[request_name]
    start = len(appliance.log())

    sock, _peer = connect(appliance)
    with sock:
        sock.sendall(data)
        received, closed_after = read_until_closed(sock, within=10)

    assert received == A_ABORT
    assert closed_after < 5
    lines = wait_for_lines(appliance, start, "undecodable PDU type 0x01")
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0]
    assert "aborting association with ?@127.0.0.1" in lines[0]
    assert reason in lines[0]
    assert "AssertionError: )" not in lines[0]
    # Nothing the peer sent became a line of its own.
    log = appliance.log()[start:]
    assert "\nFAKE LOG" not in log
    assert "\x1b" not in log
    assert "pynetdicom" not in log
    assert_still_serving(appliance)


def test_a_pdv_longer_than_its_pdu_aborts_with_one_line_in_words(
    appliance: Appliance,
) -> None:
    """A P-DATA-TF whose one presentation data value announces 100 bytes of
    which 4 follow."""
    start = len(appliance.log())
    pdv = struct.pack(">LB", 100, 1) + b"\x03abc"
    pdata = bytes([0x04, 0]) + struct.pack(">L", len(pdv)) + pdv
    with client.associate(appliance.port, [(client.Verification, [])]) as assoc:
        assert assoc.is_established
        assert assoc.dul.socket is not None
        assert assoc.dul.socket.socket is not None
        assoc.dul.socket.socket.sendall(pdata)
        assert client.wait_until_aborted(assoc)

    lines = wait_for_lines(appliance, start, "undecodable PDU type 0x04")
    assert len(lines) == 1, lines
    assert "aborting association with TESTCLIENT@127.0.0.1" in lines[0]
    assert "a presentation data value is longer than the rest of the PDU" in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert_still_serving(appliance)


def test_an_unsupported_protocol_version_is_rejected_with_one_line(
    appliance: Appliance,
) -> None:
    """Rejected by the service provider, reason 'protocol version not
    supported' (PS3.8 9.3.4), in one line of the appliance's own."""
    start = len(appliance.log())

    sock, _peer = connect(appliance)
    with sock:
        sock.sendall(association_request(version=2))
        received, _closed_after = read_until_closed(sock, within=10)

    # A-ASSOCIATE-RJ: rejected-permanent, service-provider (ACSE), reason 2.
    assert received[:1] == b"\x03"
    assert received[7:10] == b"\x01\x02\x02"
    lines = wait_for_lines(appliance, start, "protocol version")
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0]
    assert "RAWCLIENT@127.0.0.1" in lines[0]
    assert "0x0002" in lines[0]
    assert "pynetdicom" not in appliance.log()[start:]
    assert_still_serving(appliance)
