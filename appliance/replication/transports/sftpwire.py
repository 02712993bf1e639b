"""The client side of the SFTP protocol, version 3, over a connected socket.

The socket is the standard input and output of an ``ssh -s HOST sftp``
process (see :mod:`.sshprocess`): OpenSSH carries the bytes, encrypted, and
this module speaks SFTP over them (draft-ietf-secsh-filexfer-02, with the
``limits@openssh.com`` and ``fsync@openssh.com`` extensions when the
server offers them). Every packet, both ways::

    +---------------+---------+----------------------+----------------+
    | length uint32 | type u8 | request id uint32    | fields ...     |
    +---------------+---------+----------------------+----------------+
      counts what follows      (not in INIT/VERSION)   strings are a
                                                       uint32 length and
                                                       the bytes

Requests need not wait for their answers: writes and reads are sent ahead,
up to a window, and every answer is matched to its request by id and
checked. A STATUS other than OK becomes an OSError (FileNotFoundError,
PermissionError, or :class:`SftpStatusError`); a lost connection is an
EOFError, a timeout a TimeoutError, and bytes that do not parse a
:class:`ProtocolError`.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

VERSION = 3

# Packet types (draft-ietf-secsh-filexfer-02, section 3).
INIT, REPLY_VERSION = 1, 2
OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME = range(11, 19)
EXTENDED = 200
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED_REPLY = 101, 102, 103, 104, 105, 201

# OPEN flags.
OPEN_READ, OPEN_WRITE, OPEN_CREATE, OPEN_TRUNCATE = 0x01, 0x02, 0x08, 0x10

# STATUS codes.
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED = 0, 1, 2, 3

# ATTRS flags.
_SIZE, _UIDGID, _PERMISSIONS, _ACMODTIME, _EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000

# What every server takes in one read or write (the draft's minimum); an
# OpenSSH server says, through limits@openssh.com, that it takes more.
SAFE_REQUEST_SIZE = 32 * 1024
MAX_REQUEST_SIZE = 1024 * 1024
# Requests sent ahead of their answers.
WINDOW = 32

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEADER = struct.Struct(">IBI")  # length, type, request id
_SMALL_READ = 64 * 1024


class ProtocolError(Exception):
    """The server sent something that is not a well-formed answer."""


class EndOfFile(Exception):
    """A file ended before the bytes asked of it (it shrank meanwhile)."""


class SftpStatusError(OSError):
    """The server refused a request with a STATUS other than OK."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(errno.EIO, message or f"SFTP status {code}")
        self.code = code


@dataclass(frozen=True)
class Attributes:
    """What a STAT or a directory listing says of a file."""

    size: int | None
    mode: int | None


class SftpWire:
    """One SFTP session over ``sock``; one thread at a time.

    The socket's timeout bounds every wait for the server: an answer that
    does not come, or a write the server does not take, in that time
    raises TimeoutError.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._next_id = 1
        self._answers: dict[int, bytes | bytearray] = {}
        self._forgotten: set[int] = set()
        self.extensions: dict[str, bytes] = {}
        self.max_read = SAFE_REQUEST_SIZE
        self.max_write = SAFE_REQUEST_SIZE

    # -- the session ---------------------------------------------------------

    def start(self) -> None:
        """Exchange INIT and VERSION, then ask the server for its limits."""
        self._sock.sendall(_U32.pack(5) + bytes([INIT]) + _U32.pack(VERSION))
        body = self._packet()
        if body[0] != REPLY_VERSION:
            raise ProtocolError(f"the server answered INIT with type {body[0]}")
        fields = _Fields(body, 1)
        version = fields.u32()
        if version != VERSION:
            raise ProtocolError(f"the server speaks SFTP version {version}, not 3")
        while not fields.done():
            name = fields.string().decode("ascii", "replace")
            self.extensions[name] = fields.string()
        if "limits@openssh.com" in self.extensions:
            self._ask_limits()

    def _ask_limits(self) -> None:
        fields = self._extended(b"limits@openssh.com", b"")
        _packet_limit, read_limit, write_limit = (fields.u64() for _ in range(3))
        # 0 means "no limit"; a request never goes past MAX_REQUEST_SIZE.
        self.max_read = min(read_limit or MAX_REQUEST_SIZE, MAX_REQUEST_SIZE)
        self.max_write = min(write_limit or MAX_REQUEST_SIZE, MAX_REQUEST_SIZE)

    # -- files and folders ---------------------------------------------------

    def stat(self, path: str) -> Attributes:
        """The attributes of ``path``, following a symbolic link."""
        return _parse_attributes(self._call(STAT, _string(path), ATTRS))

    def lstat(self, path: str) -> Attributes:
        """The attributes of ``path`` itself."""
        return _parse_attributes(self._call(LSTAT, _string(path), ATTRS))

    def open(self, path: str, flags: int) -> bytes:
        """A handle on ``path`` (OPEN_* flags); new files get mode 0644."""
        attributes = _U32.pack(_PERMISSIONS) + _U32.pack(0o644)
        fields = self._call(OPEN, _string(path) + _U32.pack(flags) + attributes, HANDLE)
        return fields.string()

    def fstat(self, handle: bytes) -> Attributes:
        return _parse_attributes(self._call(FSTAT, _string(handle), ATTRS))

    def truncate(self, handle: bytes, size: int) -> None:
        """Cut the open file to ``size`` bytes."""
        attributes = _U32.pack(_SIZE) + _U64.pack(size)
        self._call(FSETSTAT, _string(handle) + attributes)

    def fsync(self, handle: bytes) -> bool:
        """Flush the open file to the server's disk; False when the server
        has no way to (no ``fsync@openssh.com``)."""
        if "fsync@openssh.com" not in self.extensions:
            return False
        self._call(EXTENDED, _string("fsync@openssh.com") + _string(handle))
        return True

    def close(self, handle: bytes) -> None:
        self._call(CLOSE, _string(handle))

    def mkdir(self, path: str) -> None:
        attributes = _U32.pack(_PERMISSIONS) + _U32.pack(0o755)
        self._call(MKDIR, _string(path) + attributes)

    def rename(self, path: str, new_path: str) -> None:
        """RENAME, which an OpenSSH server makes a hard link then an unlink:
        it fails rather than replace ``new_path``."""
        self._call(RENAME, _string(path) + _string(new_path))

    def remove(self, path: str) -> None:
        self._call(REMOVE, _string(path))

    def listdir(self, path: str) -> list[tuple[str, Attributes]]:
        """``(name, attributes)`` of every entry in a folder but . and .."""
        handle = self._call(OPENDIR, _string(path), HANDLE).string()
        found: list[tuple[str, Attributes]] = []
        try:
            while (batch := self._read_names(handle)) is not None:
                found += [entry for entry in batch if entry[0] not in (".", "..")]
        finally:
            self.close(handle)
        return found

    def _read_names(self, handle: bytes) -> list[tuple[str, Attributes]] | None:
        kind, fields = self._answer(self._send(READDIR, _string(handle)))
        if kind == STATUS and fields.peek_u32() == EOF:
            return None
        _expect(kind, NAME, fields)
        entries = []
        for _ in range(fields.u32()):
            name = fields.string().decode("utf-8", "surrogateescape")
            fields.string()  # the long name, as ls -l shows it
            entries.append((name, _parse_attributes(fields)))
        return entries

    # -- writing and reading data, sent ahead of the answers ----------------

    def send_write(self, handle: bytes, offset: int, data: memoryview) -> int:
        """Send one WRITE without waiting; its request id."""
        fields = _string(handle) + _U64.pack(offset) + _U32.pack(len(data))
        return self._send(WRITE, fields, data)

    def check_status(self, request: int) -> None:
        """Wait for the answer to ``request``; raise unless it is OK."""
        _expect_ok(*self._answer(request))

    def read_range(self, handle: bytes, offset: int, end: int) -> Iterator[bytes]:
        """The bytes of an open file from ``offset`` to ``end``, in order,
        with up to WINDOW reads asked ahead. Raises EndOfFile if the file
        ends first. Answers still due when the reader stops are dropped."""
        asked: dict[int, tuple[int, int]] = {}  # request -> (offset, length)
        arrived: dict[int, bytes] = {}  # offset -> bytes
        position = next_offset = offset
        try:
            while position < end:
                while len(asked) < WINDOW and next_offset < end:
                    length = min(self.max_read, end - next_offset)
                    asked[self._ask_read(handle, next_offset, length)] = (
                        next_offset,
                        length,
                    )
                    next_offset += length
                self._take_read(handle, asked, arrived)
                while position in arrived:
                    chunk = arrived.pop(position)
                    position += len(chunk)
                    yield chunk
        finally:
            self.forget(asked)

    def _ask_read(self, handle: bytes, offset: int, length: int) -> int:
        return self._send(READ, _string(handle) + _U64.pack(offset) + _U32.pack(length))

    def _take_read(
        self,
        handle: bytes,
        asked: dict[int, tuple[int, int]],
        arrived: dict[int, bytes],
    ) -> None:
        """Wait for the oldest read; a short answer asks again for the rest."""
        request = next(iter(asked))
        kind, fields = self._answer(request)
        offset, length = asked.pop(request)
        if kind == STATUS and fields.peek_u32() == EOF:
            raise EndOfFile(f"the file ends before byte {offset + length}")
        _expect(kind, DATA, fields)
        data = fields.string()
        if not data or len(data) > length:
            raise ProtocolError(f"a read of {length} bytes got {len(data)}")
        arrived[offset] = data
        if len(data) < length:
            rest = (offset + len(data), length - len(data))
            asked[self._ask_read(handle, *rest)] = rest

    def forget(self, requests: Iterable[int]) -> None:
        """Drop the answers of requests nobody will wait for."""
        for request in list(requests):
            if self._answers.pop(request, None) is None:
                self._forgotten.add(request)

    # -- packets ---------------------------------------------------------------

    def _call(self, kind: int, fields: bytes, answer: int = STATUS) -> _Fields:
        """Send one request, wait for its answer, check it is ``answer``."""
        got, reply = self._answer(self._send(kind, fields))
        if answer == STATUS:
            _expect_ok(got, reply)
        else:
            _expect(got, answer, reply)
        return reply

    def _extended(self, name: bytes, fields: bytes) -> _Fields:
        kind, reply = self._answer(self._send(EXTENDED, _string(name) + fields))
        _expect(kind, EXTENDED_REPLY, reply)
        return reply

    def _send(self, kind: int, fields: bytes, data: memoryview | None = None) -> int:
        request = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        length = 5 + len(fields) + (len(data) if data is not None else 0)
        head = _HEADER.pack(length, kind, request) + fields
        if data is None:
            self._sock.sendall(head)
        else:
            self._send_both(memoryview(head), data)
        return request

    def _send_both(self, head: memoryview, data: memoryview) -> None:
        """A request's fields and its data in as few system calls as the
        socket takes (each one is a wait for Python's lock besides)."""
        while head:
            sent = self._sock.sendmsg([head, data])
            data = data[max(0, sent - len(head)) :]
            head = head[sent:]
        if data:
            self._sock.sendall(data)

    def _answer(self, request: int) -> tuple[int, _Fields]:
        """The answer to ``request``, keeping others that come first."""
        while request not in self._answers:
            body = self._packet()
            if len(body) < 5:
                raise ProtocolError(f"an answer of type {body[0]} is too short")
            number = _U32.unpack_from(body, 1)[0]
            if number in self._forgotten:
                self._forgotten.discard(number)
            else:
                self._answers[number] = body
        body = self._answers.pop(request)
        return body[0], _Fields(body, 5)

    def _packet(self) -> bytes | bytearray:
        """The next packet from the server: its type, then its fields."""
        length = _U32.unpack(self._exactly(4))[0]
        if not 1 <= length <= MAX_REQUEST_SIZE + 1024:
            raise ProtocolError(f"a packet of {length} bytes")
        return self._exactly(length)

    def _exactly(self, count: int) -> bytes | bytearray:
        """The next ``count`` bytes from the server."""
        while len(self._buffer) < count and count - len(self._buffer) < _SMALL_READ:
            self._receive_some()
        if len(self._buffer) >= count:
            found = bytes(self._buffer[:count])
            del self._buffer[:count]
            return found
        # A large packet (a DATA answer) is read straight into its place.
        out = bytearray(count)
        have = len(self._buffer)
        out[:have] = self._buffer
        self._buffer.clear()
        view = memoryview(out)
        while have < count:
            got = self._sock.recv_into(view[have:])
            if not got:
                raise EOFError("the SFTP session ended")
            have += got
        return out

    def _receive_some(self) -> None:
        chunk = self._sock.recv(_SMALL_READ)
        if not chunk:
            raise EOFError("the SFTP session ended")
        self._buffer += chunk


class _Fields:
    """Reads the fields of one packet in order."""

    def __init__(self, body: bytes | bytearray, start: int) -> None:
        self._body = memoryview(body)
        self._at = start

    def done(self) -> bool:
        return self._at >= len(self._body)

    def u32(self) -> int:
        return int(_U32.unpack_from(self._take(4))[0])

    def peek_u32(self) -> int | None:
        """The next uint32 without taking it; None at the end."""
        if self._at + 4 > len(self._body):
            return None
        return int(_U32.unpack_from(self._body, self._at)[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self._take(8))[0])

    def string(self) -> bytes:
        return self._take(self.u32())

    def _take(self, count: int) -> bytes:
        end = self._at + count
        if end > len(self._body):
            raise ProtocolError("a packet ends in the middle of a field")
        found = bytes(self._body[self._at : end])
        self._at = end
        return found


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _U32.pack(len(data)) + data


def _parse_attributes(fields: _Fields) -> Attributes:
    flags = fields.u32()
    size = fields.u64() if flags & _SIZE else None
    if flags & _UIDGID:
        fields.u32(), fields.u32()
    mode = fields.u32() if flags & _PERMISSIONS else None
    if flags & _ACMODTIME:
        fields.u32(), fields.u32()
    if flags & _EXTENDED:
        for _ in range(fields.u32()):
            fields.string(), fields.string()
    return Attributes(size, mode)


def _expect_ok(kind: int, fields: _Fields) -> None:
    _expect(kind, STATUS, fields)
    code = fields.u32()
    if code == OK:
        return
    message = fields.string().decode("utf-8", "replace") if not fields.done() else ""
    if code == NO_SUCH_FILE:
        raise FileNotFoundError(errno.ENOENT, message or "no such file")
    if code == PERMISSION_DENIED:
        raise PermissionError(errno.EACCES, message or "permission denied")
    raise SftpStatusError(code, message)


def _expect(kind: int, wanted: int, fields: _Fields) -> None:
    if kind == wanted:
        return
    if kind == STATUS:
        _expect_ok(kind, fields)  # raises: an OK here is still not the answer
    raise ProtocolError(f"expected an answer of type {wanted}, got {kind}")
