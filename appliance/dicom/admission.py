"""Admission of a new connection: a whole A-ASSOCIATE-RQ within the ARTIM timer.

A connection becomes an association only once its first PDU, an
A-ASSOCIATE-RQ, has arrived whole (PS3.8 9.2, state Sta2). pynetdicom reads
that PDU with blocking reads bounded only by the network timeout, so a peer
that sends half a request holds the reading thread for minutes; and it
answers bytes that are no PDU with an error line and an A-ABORT for every
six of them. So each connection first comes here, in its own thread, which
reads the request against the ARTIM timer; pynetdicom is then given the
request's bytes back (see :mod:`appliance.dicom.handoff`).

What happens, following the PS3.8 state table for Sta2 (9.2.3):

* a whole A-ASSOCIATE-RQ within the ARTIM timer: the connection is
  admitted and pynetdicom negotiates the association;
* the timer expires first (Evt18): the connection is closed (AA-2);
* an A-ABORT (Evt16): the connection is closed (AA-2);
* any other PDU, or bytes that are no PDU (Evt19): one A-ABORT PDU is sent
  and the connection waits, at most one more ARTIM period, for the peer to
  close it (AA-1, Sta13). What the peer sends meanwhile is discarded, not
  answered with more A-ABORTs: after bytes that are no PDU nothing that
  follows can be framed.

Each refused connection gets one WARNING line with the peer and the reason;
a peer that closes before sending anything (a port check) gets none. A
connection that sent no whole request before the timer expired, or whose
first bytes are no A-ASSOCIATE-RQ (Evt19), costs its peer nothing to open,
so those are logged once a minute per address and kind, the others counted
(:mod:`appliance.peer_warnings`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from typing import NoReturn

from appliance.audit.offenders import host_of
from appliance.metrics import events
from appliance.peer_warnings import PeerWarnings

logger = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
A_ABORT = 0x07
# PDU header: type, reserved, length of what follows (PS3.8 9.3.1).
_HEADER = struct.Struct(">BxL")
# The fixed fields of an A-ASSOCIATE-RQ after its header: protocol version,
# reserved, called and calling AE titles, reserved (PS3.8 9.3.2).
_FIXED_FIELDS = 68
# A request with 128 presentation contexts, each proposing every transfer
# syntax pynetdicom knows, is about 150 KiB; a larger claim is no request.
MAX_REQUEST = 1 << 20
# A-ABORT from the service user, reason not significant (PS3.8 9.3.8), as
# action AA-1 sends it.
_ABORT_PDU = bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_CHUNK = 65536

# Connections closed by the ARTIM timer, logged once a minute per address.
_STALLED = PeerWarnings(
    logger, "connections closed so (no whole A-ASSOCIATE-RQ within the ARTIM timer)"
)
# Connections whose first bytes are no A-ASSOCIATE-RQ (Evt19), likewise.
_JUNK = PeerWarnings(logger, "connections aborted so (first bytes no A-ASSOCIATE-RQ)")


class _Refused(Exception):
    """Why a connection is not admitted; ``abort``: send an A-ABORT first;
    ``limit``: what logs the refusal once a minute per address (None: it
    is logged every time)."""

    def __init__(
        self, reason: str, abort: bool, limit: PeerWarnings | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort = abort
        self.limit = limit


class _Vanished(Exception):
    """The peer closed the connection without sending a byte."""


def admit(sock: socket.socket, peer: str, artim: float) -> bytes | None:
    """Read the connection's A-ASSOCIATE-RQ within ``artim`` seconds.

    Returns the request's bytes, for pynetdicom to read again; None when
    the connection was refused, logged and closed.
    """
    timeout = sock.gettimeout()
    try:
        request = _read_request(sock, time.monotonic() + artim)
    except _Vanished:
        sock.close()
        return None
    except _Refused as refusal:
        if refusal.limit is not None:
            refusal.limit.warning(
                host_of(peer), "connection from %s closed: %s", peer, refusal.reason
            )
        else:
            logger.warning("connection from %s closed: %s", peer, refusal.reason)
        events.connection_refused()
        _refuse(sock, refusal.abort, time.monotonic() + artim)
        return None
    sock.settimeout(timeout)
    return request


def _read_request(sock: socket.socket, deadline: float) -> bytes:
    header = _read(sock, _HEADER.size, deadline, b"")
    pdu_type, length = _HEADER.unpack(header)
    _check_header(pdu_type, length, header)
    return _read(sock, _HEADER.size + length, deadline, header)


def _check_header(pdu_type: int, length: int, header: bytes) -> None:
    """Raise _Refused unless the header starts a plausible A-ASSOCIATE-RQ."""
    if pdu_type == A_ASSOCIATE_RQ:
        if _FIXED_FIELDS <= length <= MAX_REQUEST:
            return
        message = f"A-ASSOCIATE-RQ with an impossible length of {length} bytes"
        raise _Refused(message, abort=True, limit=_JUNK)
    if pdu_type == A_ABORT:
        raise _Refused("A-ABORT before any association", abort=False)
    if A_ASSOCIATE_RQ < pdu_type < A_ABORT:
        message = f"PDU type 0x{pdu_type:02X} where an A-ASSOCIATE-RQ was due"
        raise _Refused(message, abort=True, limit=_JUNK)
    message = f"not DICOM: the first bytes are {header.hex(' ')}"
    raise _Refused(message, abort=True, limit=_JUNK)


def _read(sock: socket.socket, size: int, deadline: float, received: bytes) -> bytes:
    """``received`` and what follows it, ``size`` bytes in all, by
    ``deadline``; _Refused (or _Vanished) when they do not all come."""
    data = bytearray(received)
    while len(data) < size:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(min(size - len(data), _CHUNK))
        except TimeoutError:
            message = "no whole A-ASSOCIATE-RQ within the ARTIM timer"
            detail = f"timeouts.association; {len(data)} bytes received"
            raise _Refused(
                f"{message} ({detail})", abort=False, limit=_STALLED
            ) from None
        except OSError as exc:
            raise _Refused(f"connection failed: {exc}", abort=False) from exc
        if not chunk:
            _raise_closed(len(data))
        data += chunk
    return bytes(data)


def _raise_closed(received: int) -> NoReturn:
    if not received:
        raise _Vanished()
    message = f"the peer closed it after {received} bytes"
    raise _Refused(f"{message}, before its A-ASSOCIATE-RQ was whole", abort=False)


def _refuse(sock: socket.socket, abort: bool, deadline: float) -> None:
    """Close the connection; with ``abort``, send an A-ABORT first and wait
    until the deadline for the peer to close its side (PS3.8 state Sta13)."""
    with contextlib.suppress(OSError):
        if abort:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(_ABORT_PDU)
        sock.shutdown(socket.SHUT_WR)
        # Closing with unread bytes would reset the connection rather than
        # close it, and the peer could lose the A-ABORT.
        _discard_until_closed(sock, deadline if abort else time.monotonic())
    sock.close()


def _discard_until_closed(sock: socket.socket, deadline: float) -> None:
    """Read and drop what the peer sends until it closes or ``deadline``."""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        if not sock.recv(_CHUNK):
            return
