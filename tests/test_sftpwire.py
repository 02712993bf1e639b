"""The SFTP protocol client against a scripted fake server: answers that come
short, out of order, refused or garbled, each checked the way a real
server's would be (the real OpenSSH server is in tests/test_transports.py).

The fake server runs in a thread on the other end of a socket pair and
keeps its files in memory; each test tells it how to misbehave.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from appliance.replication.transports import sftpwire
from appliance.replication.transports.sftpwire import (
    OPEN_READ,
    OPEN_WRITE,
    EndOfFile,
    ProtocolError,
    SftpStatusError,
    SftpWire,
)

FILE = bytes(range(256)) * 4096  # 1 MiB


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def string(value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return u32(len(data)) + data


def packet(kind: int, body: bytes) -> bytes:
    return u32(len(body) + 1) + bytes([kind]) + body


@dataclass
class FakeServer:
    """An SFTP version 3 server with one file, ``data``, at any path."""

    sock: socket.socket
    data: bytearray = field(default_factory=lambda: bytearray(FILE))
    extensions: dict[str, bytes] = field(default_factory=dict)
    limits: tuple[int, int, int] = (262144, 261120, 261120)
    # Hooks: how a READ or WRITE is answered (request id, offset, length).
    read_length: Callable[[int, int], int] = lambda offset, asked: asked
    write_status: Callable[[int], int] = lambda offset: sftpwire.OK
    hold_answers: int = 0  # answer the first N reads in reverse order
    requests: list[tuple[int, int]] = field(default_factory=list)  # (type, id)
    thread: threading.Thread | None = None

    def serve(self) -> None:
        held: list[bytes] = []
        try:
            while (request := self._receive()) is not None:
                kind, body = request
                answer = self._answer(kind, body)
                if kind == sftpwire.READ and len(held) < self.hold_answers:
                    held.append(answer)
                    if len(held) == self.hold_answers:
                        self.sock.sendall(b"".join(reversed(held)))
                    continue
                self.sock.sendall(answer)
        except OSError:
            pass

    def _receive(self) -> tuple[int, bytes] | None:
        head = self._exactly(4)
        if head is None:
            return None
        body = self._exactly(struct.unpack(">I", head)[0])
        return (body[0], body[1:]) if body else None

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _answer(self, kind: int, body: bytes) -> bytes:
        if kind == sftpwire.INIT:
            pairs = b"".join(string(k) + string(v) for k, v in self.extensions.items())
            return packet(sftpwire.REPLY_VERSION, u32(3) + pairs)
        request = struct.unpack(">I", body[:4])[0]
        self.requests.append((kind, request))
        return self._handle(kind, request, body[4:])

    def _handle(self, kind: int, request: int, fields: bytes) -> bytes:
        if kind == sftpwire.EXTENDED:
            return packet(
                sftpwire.EXTENDED_REPLY,
                u32(request) + b"".join(u64(n) for n in (*self.limits, 64)),
            )
        if kind == sftpwire.OPEN:
            path = fields[4 : 4 + struct.unpack(">I", fields[:4])[0]]
            if path == b"missing":
                return self._status(request, sftpwire.NO_SUCH_FILE, "no such file")
            return packet(sftpwire.HANDLE, u32(request) + string(b"h1"))
        if kind == sftpwire.READ:
            offset, asked = struct.unpack(">QI", fields[6:18])
            if offset >= len(self.data):
                return self._status(request, sftpwire.EOF, "end of file")
            length = min(self.read_length(offset, asked), len(self.data) - offset)
            chunk = bytes(self.data[offset : offset + length])
            return packet(sftpwire.DATA, u32(request) + string(chunk))
        if kind == sftpwire.WRITE:
            offset = struct.unpack(">Q", fields[6:14])[0]
            status = self.write_status(offset)
            if status == sftpwire.OK:
                size = struct.unpack(">I", fields[14:18])[0]
                self.data[offset : offset + size] = fields[18 : 18 + size]
            return self._status(request, status, "disk full" if status else "")
        if kind in (sftpwire.STAT, sftpwire.LSTAT, sftpwire.FSTAT):
            size_only = u32(0x1) + u64(len(self.data))
            return packet(sftpwire.ATTRS, u32(request) + size_only)
        return self._status(request, sftpwire.OK, "")

    @staticmethod
    def _status(request: int, code: int, message: str) -> bytes:
        return packet(
            sftpwire.STATUS, u32(request) + u32(code) + string(message) + string("")
        )


@pytest.fixture
def pair() -> Iterator[tuple[SftpWire, FakeServer]]:
    """A client and a fake server not yet started (tests set hooks first)."""
    mine, theirs = socket.socketpair()
    mine.settimeout(5)
    server = FakeServer(theirs, extensions={"limits@openssh.com": b"1"})
    yield SftpWire(mine), server
    mine.close()
    if server.thread is not None:
        server.thread.join(5)
    theirs.close()


def start(pair: tuple[SftpWire, FakeServer]) -> tuple[SftpWire, FakeServer]:
    wire, server = pair
    server.thread = threading.Thread(target=server.serve, daemon=True)
    server.thread.start()
    wire.start()
    return wire, server


def test_requests_are_as_large_as_the_server_says(pair) -> None:
    wire, _server = start(pair)
    assert wire.max_read == wire.max_write == 261120


def test_without_limits_requests_stay_at_the_safe_size(pair) -> None:
    pair[1].extensions = {}
    wire, _server = start(pair)
    assert wire.max_read == wire.max_write == 32 * 1024


def test_a_whole_file_comes_back_in_order(pair) -> None:
    wire, server = start(pair)
    handle = wire.open("file", OPEN_READ)
    received = b"".join(wire.read_range(handle, 0, len(FILE)))
    assert received == FILE
    reads = [kind for kind, _ in server.requests if kind == sftpwire.READ]
    assert len(reads) == -(-len(FILE) // wire.max_read)


def test_short_answers_are_asked_again_for_the_rest(pair) -> None:
    pair[1].read_length = lambda offset, asked: min(asked, 1000)
    wire, _server = start(pair)
    handle = wire.open("file", OPEN_READ)
    assert b"".join(wire.read_range(handle, 5, len(FILE))) == FILE[5:]


def test_a_file_that_ends_early_is_an_error(pair) -> None:
    wire, server = start(pair)
    handle = wire.open("file", OPEN_READ)
    del server.data[500_000:]
    with pytest.raises(EndOfFile):
        b"".join(wire.read_range(handle, 0, len(FILE)))


def test_answers_out_of_order_are_matched_by_id(pair) -> None:
    pair[1].hold_answers = 3
    wire, _server = start(pair)
    handle = wire.open("file", OPEN_READ)
    data = wire.read_range(handle, 0, len(FILE))
    assert b"".join(data) == FILE


def test_a_refused_write_raises_when_its_answer_is_checked(pair) -> None:
    pair[1].write_status = lambda offset: 4 if offset >= 100_000 else 0
    wire, _server = start(pair)
    handle = wire.open("file", OPEN_WRITE)
    view = memoryview(bytes(300_000))
    first = wire.send_write(handle, 0, view[:100_000])
    second = wire.send_write(handle, 100_000, view[100_000:])
    wire.check_status(first)
    with pytest.raises(SftpStatusError, match="disk full"):
        wire.check_status(second)


def test_no_such_file_is_file_not_found(pair) -> None:
    wire, _server = start(pair)
    with pytest.raises(FileNotFoundError):
        wire.open("missing", OPEN_READ)


def test_answers_to_forgotten_requests_are_dropped(pair) -> None:
    wire, _server = start(pair)
    handle = wire.open("file", OPEN_READ)
    reader = wire.read_range(handle, 0, len(FILE))
    next(reader)
    reader.close()  # the reads asked ahead are still on their way
    assert wire.stat("file").size == len(FILE)  # the STAT's, not a late DATA
    wire.close(handle)  # every late answer has come by now
    assert not wire._answers  # and none is kept


def test_a_garbled_answer_is_a_protocol_error(pair) -> None:
    wire, server = start(pair)
    server.sock.sendall(u32(1 << 30))
    with pytest.raises(ProtocolError):
        wire.stat("file")


def test_a_server_that_goes_away_is_end_of_session(pair) -> None:
    wire, server = start(pair)
    server.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises((EOFError, OSError)):
        wire.stat("file")
