"""A PDU read on a handed-over connection returns the bytes sent, and takes
memory only for the bytes that arrived, whatever length the peer announced."""

from __future__ import annotations

import queue
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from appliance.dicom.handoff import _ReplayingSocket

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
