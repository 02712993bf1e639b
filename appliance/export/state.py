"""What an export sent to one destination: an append-only journal on disk.

``DATA_DIR/exports/<AE@host-port>/state.jsonl`` holds one JSON line per
answer the receiver gave to a C-STORE::

    {"uid": SOP Instance UID, "study": StudyInstanceUID, "status": 0,
     "size": bytes, "time": seconds since the epoch, "comment": "..."}

A line is written and flushed to disk (fsync) as soon as the answer comes,
before the next instance goes, so that a run killed at any instant loses
at most the answer in flight: that instance is sent again by the next run.
The latest line for a SOP Instance UID counts (an instance refused, then
accepted by a later run). When the journal is opened it is written anew,
one line per instance and without a torn last line, through
:func:`appliance.storage.durable.move_into_place`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from appliance.errors import ExportError, StorageError
from appliance.storage import durable
from appliance.storage.lock import TierLock

logger = logging.getLogger(__name__)

STATE_FILE = "state.jsonl"
LOCK_FILE = "export.lock"


def is_accepted(status: int) -> bool:
    """The receiver kept the instance: success, or a warning (0xBxxx,
    PS3.4 B.2.3: stored with coercion, elements discarded, ...)."""
    return status == 0x0000 or (status & 0xF000) == 0xB000


@dataclass(frozen=True, slots=True)
class Answer:
    """What the receiver answered for one instance."""

    uid: str
    study: str
    status: int
    size: int
    time: float
    comment: str = ""

    @property
    def accepted(self) -> bool:
        return is_accepted(self.status)


class ExportState:
    """The answers a destination gave, by SOP Instance UID, kept on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / STATE_FILE
        self.answers: dict[str, Answer] = {}
        self._journal: IO[str] | None = None
        self._lock = TierLock(folder, LOCK_FILE)

    def open(self) -> ExportState:
        """Take the destination's lock (one run at a time), read the
        journal, write it anew without what a crash left, and open it for
        appending."""
        try:
            durable.make_directories(self.folder, self.folder.parent.parent)
            self._take_lock()
        except OSError as exc:
            raise ExportError(self._cannot_keep(exc)) from exc
        try:
            if self.path.exists():
                self.answers = _read(self.path)
            self._rewrite()
            # Open for the state's life: every answer is appended to it.
            self._journal = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except (OSError, StorageError) as exc:
            self.close()
            raise ExportError(self._cannot_keep(exc)) from exc
        except ExportError:
            self.close()
            raise
        return self

    def _cannot_keep(self, exc: Exception) -> str:
        # The reason without errno, and the folder named once.
        reason = exc.strerror if isinstance(exc, OSError) else None
        return f"cannot keep the export state in {self.folder}: {reason or exc}"

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._lock.release()

    def _take_lock(self) -> None:
        if not self._lock.acquire(exclusive=True):
            raise ExportError(
                f"another export to the same destination is running (it holds "
                f"{self._lock.path})"
            )

    def accepted(self, uid: str) -> bool:
        answer = self.answers.get(uid)
        return answer is not None and answer.accepted

    def accepted_in(self) -> Iterator[Answer]:
        """Every instance the receiver kept, in earlier runs or this one."""
        return (answer for answer in self.answers.values() if answer.accepted)

    def record(
        self, uid: str, study: str, status: int, size: int, comment: str = ""
    ) -> Answer:
        """Keep the receiver's answer for an instance, durably, now."""
        answer = Answer(uid, study, status, size, time.time(), comment)
        assert self._journal is not None, "the export state is not open"
        try:
            self._journal.write(_line(answer))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:
            raise ExportError(
                f"cannot write the export state {self.path}: {exc}"
            ) from exc
        self.answers[uid] = answer
        return answer

    def _rewrite(self) -> None:
        temporary = self.folder / f".{STATE_FILE}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(_line(answer) for answer in self.answers.values())
        durable.move_into_place(temporary, self.path, self.folder)


def _line(answer: Answer) -> str:
    return json.dumps(asdict(answer), separators=(",", ":"), ensure_ascii=False) + "\n"


def _read(path: Path) -> dict[str, Answer]:
    """The latest answer per instance; a torn last line (a run killed while
    writing it) is dropped, damage anywhere else is an error."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
    answers: dict[str, Answer] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            fields = _fields(json.loads(text))
            # A study's UID once in memory, however many instances it has.
            fields["study"] = sys.intern(str(fields.get("study", "")))
            answer = Answer(**fields)
        except (ValueError, TypeError) as exc:
            if number == len(lines):
                logger.warning("export state %s: torn last line dropped", path)
                break
            raise ExportError(
                f"export state {path} is damaged at line {number}"
            ) from exc
        answers[answer.uid] = answer
    return answers


def _fields(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data
