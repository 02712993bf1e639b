"""A PDU read on a handed-over connection returns the bytes sent, and takes
memory only for the bytes that arrived, whatever length the peer announced;
on an association the appliance requests, over TLS, a PDU announcing more
than it accepts is refused before its body is read."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_AC, P_DATA_TF
from pynetdicom.sop_class import Verification

from appliance.dicom import node, undecodable
from appliance.dicom.handoff import _ReplayingSocket
from tests import dicom_client as client
from tests.certificates import Authority

MIB = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, _ReplayingSocket]]:
    sender, receiver = socket.socketpair()
    # pynetdicom's wrapper tells its association the connection is open.
    assoc = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))
    wrapper = _ReplayingSocket(assoc, client_socket=receiver)  # type: ignore[arg-type]
    yield sender, wrapper
    sender.close()
    receiver.close()


def _send_then_close(sender: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        sender.sendall(data)
        sender.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_pdu_longer_than_the_first_buffer_is_read_whole(
    pair: tuple[socket.socket, _ReplayingSocket],
) -> None:
    sender, wrapper = pair
    data = bytes(range(256)) * (3 * MIB // 256 + 7)
    thread = _send_then_close(sender, data + b"next PDU")
    assert wrapper.recv(len(data)) == data
    assert wrapper.recv(8) == b"next PDU"
    thread.join()


def test_a_connection_closed_early_gives_what_arrived(
    pair: tuple[socket.socket, _ReplayingSocket],
) -> None:
    sender, wrapper = pair
    data = b"\x5a" * (MIB + 123)
    thread = _send_then_close(sender, data)
    assert wrapper.recv(5 * MIB) == data
    thread.join()


def test_an_announced_gigabyte_takes_no_gigabyte(
    pair: tuple[socket.socket, _ReplayingSocket],
) -> None:
    """A peer that announces a PDU of 1 GiB and sends 100 bytes must not
    make the worker allocate (and zero) the gigabyte."""
    sender, wrapper = pair
    thread = _send_then_close(sender, b"x" * 100)
    tracemalloc.start()
    try:
        received = wrapper.recv(1 << 30)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    thread.join()
    assert received == b"x" * 100
    assert peak < 4 * MIB


def test_a_peer_we_called_over_tls_announcing_too_long_a_pdu_is_aborted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As requester (C-MOVE sub-operations, export) over TLS, the appliance
    checks the header it reads, here sent a byte at a time, as it does on
    associations it accepts."""
    # The appliance's PDU reading, for this test only.
    original = DULServiceProvider._read_pdu_data
    monkeypatch.setattr(DULServiceProvider, "_read_pdu_data", original)
    node._guard_pdu_reading()
    authority = Authority(tmp_path, "pdu")
    identity = authority.issue("DEST", ("127.0.0.1",))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(identity.certificate, identity.key)
    client_context = ssl.create_default_context(cafile=str(authority.certificate))

    def announce_a_gibibyte(event: evt.Event) -> None:
        # Once the association is accepted: a P-DATA-TF of 1 GiB.
        if isinstance(event.pdu, A_ASSOCIATE_AC):
            header = b"\x04\x00\x40\x00\x00\x00"
            client.send_a_byte_at_a_time(event.assoc.dul.socket.socket, header)

    acceptor = AE(ae_title="DEST")
    acceptor.add_supported_context(Verification)
    server = acceptor.start_server(
        ("127.0.0.1", 0),
        block=False,
        ssl_context=server_context,
        evt_handlers=[(evt.EVT_PDU_SENT, announce_a_gibibyte)],
    )
    requestor = AE(ae_title="APPLIANCE")
    requestor.add_requested_context(Verification)
    requestor.acse_timeout = requestor.network_timeout = 30
    caplog.set_level(logging.WARNING, logger="appliance.dicom.node")
    try:
        assoc = requestor.associate(
            "127.0.0.1",
            server.server_address[1],
            ae_title="DEST",
            tls_args=(client_context, "127.0.0.1"),
        )
        assert assoc.is_established
        assert client.wait_until_aborted(assoc)
    finally:
        server.shutdown()

    lines = [r.getMessage() for r in caplog.records if "more than" in r.getMessage()]
    assert lines == [
        "aborting association with DEST@127.0.0.1: PDU type 0x04 of 1073741824 "
        "bytes, more than the 16382 this end accepts"
    ]


def _raised(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("nothing raised")


def test_an_undecodable_pdu_is_said_in_words_on_one_line() -> None:
    """A bare assert of pynetdicom is named by where it failed; any other
    text the peer wrote into an exception is escaped."""
    pdv = struct.pack(">LB", 100, 1) + b"\x03abc"
    pdata = bytes([0x04, 0]) + struct.pack(">L", len(pdv)) + pdv
    overlong = _raised(lambda: P_DATA_TF().decode(pdata))

    def bare() -> None:
        # As an assert without pytest's rewriting raises it.
        raise AssertionError

    assert undecodable.reason(overlong) == (
        "a presentation data value is longer than the rest of the PDU"
    )
    assert undecodable.reason(_raised(bare)) == "AssertionError: a malformed item"
    assert undecodable.reason(ValueError("AE 'A\nB\x1b'")) == (
        "ValueError: AE 'A\\x0aB\\x1b'"
    )
