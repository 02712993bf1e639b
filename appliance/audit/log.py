"""The local audit log: one record per line, appended by every process.

``DATA_DIR/audit/audit.log`` holds one JSON object per line::

    {"time": "2026-12-05T03:12:00.123Z", "event": "query", "outcome": 0,
     "pid": 4711, "host": "archive1", "message": "<AuditMessage>...</AuditMessage>"}

Any process appends (DICOM workers, the HL7 child, the replication child,
the command line): each record is one ``write`` to a file opened with
O_APPEND, under an exclusive ``flock`` of ``audit.lock``, and is flushed
with fsync before the caller goes on. A crash in the middle of a write can
leave a line without its end; the next writer ends that line first, and
readers skip what does not parse.

With a size limit, the writer that would take the file past it rotates the
log first (``audit.log`` becomes ``audit.log.N``, see
:mod:`appliance.audit.rotation`); rotated files are kept, all of them
unless a number to keep is set. Readers go through the rotated files,
oldest first, then the live one; a record's place is its file number and
the byte offset after it.

The log is also the queue of the syslog sender, which keeps how far it has
sent in ``sent.json`` next to it (see :mod:`appliance.audit.sender`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appliance.audit.rotation import LogFiles
from appliance.storage.durable import fsync_directory

logger = logging.getLogger(__name__)

LOG_NAME = "audit.log"
_READ_CHUNK = 1 << 20


@dataclass
class Record:
    """One line of the log; ``end`` is the offset just after it in the file
    numbered ``segment`` (see :mod:`appliance.audit.rotation`)."""

    time: str
    event: str
    message: str
    outcome: int = 0
    pid: int = 0
    host: str = ""
    end: int = 0
    segment: int = 1

    def line(self) -> bytes:
        entry = {
            "time": self.time,
            "event": self.event,
            "outcome": self.outcome,
            "pid": self.pid,
            "host": self.host,
            "message": self.message,
        }
        return (json.dumps(entry, ensure_ascii=False) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes, end: int, segment: int = 1) -> Record:
        """ValueError when the line is not a whole record."""
        try:
            entry: dict[str, Any] = json.loads(line)
            return cls(
                time=str(entry["time"]),
                event=str(entry["event"]),
                message=str(entry["message"]),
                outcome=int(entry.get("outcome", 0)),
                pid=int(entry.get("pid", 0)),
                host=str(entry.get("host", "")),
                end=end,
                segment=segment,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not an audit record: {exc}") from exc


class AuditLog:
    """The append-only audit log in ``folder``, rotated when a record would
    take it past ``rotate_bytes`` (0: never), keeping the newest
    ``keep_files`` rotated files (0: all of them)."""

    def __init__(
        self, folder: Path, rotate_bytes: int = 0, keep_files: int = 0
    ) -> None:
        self.folder = folder
        self.path = folder / LOG_NAME
        self.files = LogFiles(folder, LOG_NAME)
        self.rotate_bytes = rotate_bytes
        self.keep_files = keep_files

    def append(self, record: Record) -> None:
        """Add one record durably; OSError when it cannot be written."""
        data = record.line()
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.folder.parent)
        with self.files.locked(exclusive=True):
            if self._full(len(data)):
                self._rotate()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    fsync_directory(self.folder)
                elif os.pread(fd, 1, size - 1) != b"\n":
                    # A writer died in the middle of its line: end that line,
                    # so that this record is not glued to it.
                    data = b"\n" + data
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _full(self, adding: int) -> bool:
        if self.rotate_bytes <= 0:
            return False
        size = self.size()
        return size > 0 and size + adding > self.rotate_bytes

    def _rotate(self) -> None:
        """Rotate; on a failure, go on in the live file: a record is never
        lost for a rotation."""
        try:
            self.files.rotate()
            self.files.prune(self.keep_files)
        except OSError as exc:
            logger.error("audit log %s not rotated: %s", self.path, exc)

    def size(self) -> int:
        """The size of the live file."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def rotated(self) -> list[Path]:
        """The rotated files present, oldest first."""
        return [self.files.path(n) for n in self.files.rotated()]

    def live_number(self) -> int:
        """The file number of the live file (records' ``segment``)."""
        return self.files.live_number()

    def read_from(self, offset: int, limit: int, segment: int = 1) -> list[Record]:
        """Up to ``limit`` whole records starting at byte ``offset`` of the
        file numbered ``segment``, going on into the files after it; a line
        still being written is left for the next call."""
        records: list[Record] = []
        for record in self._records(segment, offset):
            records.append(record)
            if len(records) >= limit:
                break
        return records

    def records(self) -> Iterator[Record]:
        """Every whole record, oldest first."""
        return self._records(1, 0)

    def _records(self, segment: int, offset: int) -> Iterator[Record]:
        if not self.folder.is_dir():
            return
        # The files are named and the live one opened under the lock: a
        # rotation then renames what is open, and its number stays right.
        with self.files.locked(exclusive=False):
            live = self.files.live_number()
            rotated = [n for n in self.files.rotated() if segment <= n < live]
            try:
                live_handle = open(self.path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                live_handle = None
        try:
            for number in rotated:
                start = offset if number == segment else 0
                try:
                    with open(self.files.path(number), "rb") as handle:
                        yield from self._read(handle, number, start)
                except FileNotFoundError:
                    continue  # removed since (audit.keep_files)
            if live_handle is not None and segment <= live:
                start = offset if live == segment else 0
                yield from self._read(live_handle, live, start)
        finally:
            if live_handle is not None:
                live_handle.close()

    def _read(self, handle: BinaryIO, number: int, offset: int) -> Iterator[Record]:
        handle.seek(offset)
        position = offset
        for line in handle:
            if not line.endswith(b"\n"):
                return  # still being written, or torn at a rotation
            position += len(line)
            try:
                yield Record.parse(line, position, number)
            except ValueError as exc:
                logger.warning(
                    "audit log %s: line ending at byte %d skipped: %s",
                    handle.name,
                    position,
                    exc,
                )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
