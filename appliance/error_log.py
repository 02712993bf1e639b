"""The recent warnings and errors of every appliance process, kept in one
small file under the data directory for the admin API and the dashboard.

Standard error (journald) keeps the whole log; this file only lets the
HTTP server, which is one process among several, show what the others
reported. ``DATA_DIR/log/errors.jsonl`` holds one JSON object per line::

    {"time": "2026-12-05T03:12:09.412Z", "level": "ERROR",
     "logger": "appliance.replication.replicator", "pid": 4242,
     "message": "cannot reach the mirror: ..."}

Each process appends a whole line in one write to a file opened with
O_APPEND, so lines of different processes never interleave. When the file
has grown past ``MAX_BYTES`` the process that notices renames it to
``errors.jsonl.1``, replacing the older one: at most about twice
``MAX_BYTES`` are kept. Two processes rotating at once lose at most the
older generation, never a line being written.

What goes in is the message as logged at WARNING or above, where the
appliance's log lines carry UIDs, AE titles, addresses and paths but no
patient names or IDs; of an exception only its type and message are kept,
cut at ``MAX_MESSAGE`` characters, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

MAX_BYTES = 256 * 1024
MAX_MESSAGE = 1000
FILE_NAME = "errors.jsonl"


def path_of(data_dir: Path) -> Path:
    """Where the errors file of the appliance with this data directory is."""
    return data_dir / "log" / FILE_NAME


class ErrorFileHandler(logging.Handler):
    """Appends WARNING and higher records to the errors file, rotating it."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        super().__init__(logging.WARNING)
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (json.dumps(entry_of(record), ensure_ascii=False) + "\n").encode()
            self._append(line)
        except (OSError, ValueError, TypeError):
            # Standard error has the record; a full or read-only disk must
            # not turn every warning into a traceback there.
            pass

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size + len(line) > self.max_bytes:
                os.close(fd)
                fd = -1
                os.replace(self.path, self.path.with_name(FILE_NAME + ".1"))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.write(fd, line)
        finally:
            if fd >= 0:
                os.close(fd)


def entry_of(record: logging.LogRecord) -> dict[str, Any]:
    """The JSON object kept for one record."""
    message = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        message += f" ({type(error).__name__}: {error})"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return {
        "time": f"{stamp}.{int(record.msecs):03d}Z",
        "level": record.levelname,
        "logger": record.name,
        "pid": record.process,
        "message": message[:MAX_MESSAGE],
    }


def recent(data_dir: Path, count: int) -> list[dict[str, Any]]:
    """The last ``count`` entries, oldest first; a line that does not
    parse (cut by a crash mid-write) is left out."""
    path = path_of(data_dir)
    lines: list[str] = []
    for part in (path.with_name(FILE_NAME + ".1"), path):
        try:
            lines += part.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found[-count:] if count > 0 else []
