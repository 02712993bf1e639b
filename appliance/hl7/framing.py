"""MLLP framing: messages out of a byte stream, and back into frames.

A frame is ``0x0B message 0x1C 0x0D``. Senders in the field are sloppy, so
the reader is lenient where it costs nothing and strict where it protects
the appliance:

- bytes before a start block (line noise, a keep-alive newline, a sender
  that was restarted mid-frame) are skipped and counted, never parsed;
- a start block inside an unfinished frame starts the frame again: the
  sender gave up on the first one;
- a frame longer than the size cap is dropped whole, up to its end block,
  and reported, so that one huge message cannot exhaust memory; only its
  first segment (the MSH, up to a few KB) is kept, so that the refusal can
  be addressed to its sender and echo its control ID.

python-hl7's stream reader expects the start block as the very first byte
and drops the buffer otherwise, which loses the message after any noise;
hence this small reader of our own. Parsing the message itself is left to
python-hl7 (``messages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

START_BLOCK = 0x0B
END_BLOCK = b"\x1c\x0d"
# The most of a dropped frame kept: its MSH segment, when it ends by then.
HEADER_KEPT = 4096


def frame(message: bytes) -> bytes:
    """``message`` as one MLLP frame."""
    return bytes([START_BLOCK]) + message + END_BLOCK


@dataclass(frozen=True)
class Frame:
    """One frame read to its end: its message or, for a message over the
    cap, only its first segment (b"" when that did not end within
    HEADER_KEPT bytes)."""

    data: bytes
    oversized: bool = False


@dataclass
class Received:
    """What one ``feed`` found: whole frames in the order they came (each
    needs its answer in that order), and how much was thrown away."""

    frames: list[Frame] = field(default_factory=list)
    skipped_bytes: int = 0

    @property
    def messages(self) -> list[bytes]:
        """The messages within the cap."""
        return [found.data for found in self.frames if not found.oversized]

    @property
    def oversized(self) -> list[bytes]:
        """The first segment of each message over the cap."""
        return [found.data for found in self.frames if found.oversized]


class FrameReader:
    """Splits the bytes of one connection into messages, in order."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._in_frame = False
        self._discarding = False  # inside a frame that is over the cap
        self._start = bytearray()  # the frame's first HEADER_KEPT bytes

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held (0 between frames)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Received:
        received = Received()
        for chunk in _split_keeping_start(data):
            self._take(chunk, received)
        return received

    def _take(self, chunk: bytes, received: Received) -> None:
        if chunk[:1] == bytes([START_BLOCK]):
            if self._in_frame and not self._discarding:
                # A new frame began before the old one ended: the sender
                # abandoned it. Its bytes count as skipped.
                received.skipped_bytes += len(self._buffer) + 1
            self._buffer.clear()
            self._start.clear()
            self._in_frame = True
            self._discarding = False
            chunk = chunk[1:]
        if not self._in_frame:
            received.skipped_bytes += len(chunk)
            return
        self._append(chunk, received)

    def _append(self, chunk: bytes, received: Received) -> None:
        # The end block may straddle two reads: look for it across the
        # last byte already held.
        held = len(self._buffer)
        self._buffer += chunk
        if len(self._start) < HEADER_KEPT:
            self._start += chunk[: HEADER_KEPT - len(self._start)]
        end = self._buffer.find(END_BLOCK, max(0, held - 1))
        if end != -1:
            message = bytes(self._buffer[:end])
            # Anything after the end block and before the next start block
            # (the caller cut the chunk there) belongs to no frame.
            received.skipped_bytes += len(self._buffer) - end - len(END_BLOCK)
            if self._discarding or len(message) > self.max_message_bytes:
                header = _first_segment(bytes(self._start).split(END_BLOCK)[0])
                received.frames.append(Frame(header, oversized=True))
            else:
                received.frames.append(Frame(message))
            self._buffer.clear()
            self._in_frame = False
            self._discarding = False
            return
        # One byte over the cap may be the first of an end block whose
        # second is still to come: the message itself may be within it.
        if len(self._buffer) > self.max_message_bytes + 1:
            # Keep only enough to see the end block arrive.
            self._discarding = True
            del self._buffer[:-1]


def _first_segment(message: bytes) -> bytes:
    """The first segment of ``message`` if it ends within HEADER_KEPT bytes."""
    # Some senders end segments with LF (or CR LF) instead of CR.
    ends = [message.find(mark, 0, HEADER_KEPT) for mark in (b"\r", b"\n")]
    found = [end for end in ends if end != -1]
    return message[: min(found)] if found else b""


def _split_keeping_start(data: bytes) -> list[bytes]:
    """``data`` cut before every start block, so that each piece but the
    first begins with one."""
    pieces = []
    start = 0
    position = data.find(bytes([START_BLOCK]), 1)
    while position != -1:
        pieces.append(data[start:position])
        start = position
        position = data.find(bytes([START_BLOCK]), position + 1)
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]
