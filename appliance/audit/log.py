"""The local audit log: one record per line, appended by every process.

``DATA_DIR/audit/audit.log`` holds one JSON object per line::

    {"time": "2026-12-05T03:12:00.123Z", "event": "query", "outcome": 0,
     "pid": 4711, "host": "archive1", "message": "<AuditMessage>...</AuditMessage>"}

Any process appends (DICOM workers, the replication child, the command
line): each record is one ``write`` to a file opened with O_APPEND, under an
exclusive ``flock`` of the log, and is flushed with fsync before the caller
goes on. A crash in the middle of a write can leave a line without its end;
the next writer ends that line first, and readers skip what does not parse.

The log is also the queue of the syslog sender, which keeps how far it has
sent in ``sent.json`` next to it (see :mod:`appliance.audit.sender`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.storage.durable import fsync_directory

logger = logging.getLogger(__name__)

LOG_NAME = "audit.log"
_READ_CHUNK = 1 << 20


@dataclass
class Record:
    """One line of the log; ``end`` is the offset just after it."""

    time: str
    event: str
    message: str
    outcome: int = 0
    pid: int = 0
    host: str = ""
    end: int = 0

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
    def parse(cls, line: bytes, end: int) -> Record:
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
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not an audit record: {exc}") from exc


class AuditLog:
    """The append-only audit log in ``folder``."""

    # TODO: the log is never rotated; it grows by about 1 to 2 KB per record
    # (some GB a year at a busy site) until an administrator archives it
    # with the service stopped.

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOG_NAME

    def append(self, record: Record) -> None:
        """Add one record durably; OSError when it cannot be written."""
        data = record.line()
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.folder.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size == 0:
                fsync_directory(self.folder)
            elif os.pread(fd, 1, size - 1) != b"\n":
                # A writer died in the middle of its line: end that line, so
                # that this record is not glued to it.
                data = b"\n" + data
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_from(self, offset: int, limit: int) -> list[Record]:
        """Up to ``limit`` whole records starting at byte ``offset``; a line
        still being written is left for the next call."""
        records: list[Record] = []
        for record in self._records(offset):
            records.append(record)
            if len(records) >= limit:
                break
        return records

    def records(self) -> Iterator[Record]:
        """Every whole record, oldest first."""
        return self._records(0)

    def _records(self, offset: int) -> Iterator[Record]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            position = offset
            for line in handle:
                if not line.endswith(b"\n"):
                    return
                position += len(line)
                try:
                    yield Record.parse(line, position)
                except ValueError as exc:
                    logger.warning(
                        "audit log %s: line ending at byte %d skipped: %s",
                        self.path,
                        position,
                        exc,
                    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
