"""The files of the audit log: the live ``audit.log`` and the rotated ones.

When a record would take the live file past its size limit, the writer
that finds it so renames it and starts a new, empty ``audit.log``::

    audit.log.1  audit.log.2  ...  audit.log.N  audit.log
    oldest                         newest       live, number N+1

Numbers only grow, and a rotated file is never renamed again nor written
to: an archive copies each one once, and the syslog sender's position (file
number, byte offset) stays valid across a rotation. Unlike logrotate's
scheme, ``.1`` is the oldest file, not the newest. ``rotation.json`` keeps
the number of the live file, so that moving rotated files away (to an
archive) never has a number used twice.

Every process appends to the same log, so every writer, and the rotation,
hold an exclusive ``flock`` of ``audit.lock``, a file that is never
renamed; readers hold it shared only while they name and open the files,
not while they read them. A crash between the rename and the write of
``rotation.json`` is repaired by the next writer: the number of the live
file is never below the newest rotated one plus one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.storage.durable import fsync_directory, move_into_place

logger = logging.getLogger(__name__)

LOCK_NAME = "audit.lock"
STATE_NAME = "rotation.json"
# The syslog sender's position (appliance.audit.sender): files it has not
# sent whole are never removed.
SENT_NAME = "sent.json"


class LogFiles:
    """The live and the rotated files of the log named ``name`` in
    ``folder``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.live = folder / name
        self._rotated_name = re.compile(re.escape(name) + r"\.([0-9]+)")

    def path(self, number: int) -> Path:
        """The rotated file ``number`` (it may not exist)."""
        return self.folder / f"{self.live.name}.{number}"

    def rotated(self) -> list[int]:
        """The numbers of the rotated files present, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        found = (self._rotated_name.fullmatch(name) for name in names)
        return sorted(int(match.group(1)) for match in found if match)

    def live_number(self) -> int:
        """The number the live file will have once rotated."""
        rotated = self.rotated()
        after_newest = rotated[-1] + 1 if rotated else 1
        return max(after_newest, self._saved_number())

    @contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the log's lock; shared for readers. A reader that may not
        create the lock file reads without it."""
        flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY | os.O_CREAT
        try:
            fd = os.open(self.folder / LOCK_NAME, flags, 0o640)
        except OSError:
            if exclusive:
                raise
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def rotate(self) -> Path:
        """Rename the live file to its number, durably; the new name. The
        caller holds the lock, exclusive."""
        number = self.live_number()
        target = self.path(number)
        os.rename(self.live, target)
        fsync_directory(self.folder)
        self._save_number(number + 1)
        logger.info("audit log %s rotated to %s", self.live, target.name)
        return target

    def prune(self, keep: int) -> None:
        """Remove the oldest rotated files beyond ``keep`` (0: keep all),
        but none the syslog sender has not sent whole."""
        if keep <= 0:
            return
        rotated = self.rotated()
        sending = self._sending()
        removed = 0
        for number in rotated[: max(0, len(rotated) - keep)]:
            if sending is not None and number >= sending:
                break
            self.path(number).unlink()
            removed += 1
            logger.info("audit log %s removed (audit.keep_files)", self.path(number))
        if removed:
            fsync_directory(self.folder)

    def _sending(self) -> int | None:
        """The number of the file the syslog sender is in (0 when it has no
        position yet: every file is kept), None when there is no sender."""
        try:
            saved = json.loads((self.folder / SENT_NAME).read_text())
            # A position saved before rotation existed is in the first file.
            return int(saved.get("segment", 1))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _saved_number(self) -> int:
        try:
            return int(json.loads((self.folder / STATE_NAME).read_text())["live"])
        except FileNotFoundError:
            return 1
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error(
                "audit: %s unreadable (%s); numbering from the files",
                self.folder / STATE_NAME,
                exc,
            )
            return 1

    def _save_number(self, number: int) -> None:
        temporary = self.folder / (STATE_NAME + ".tmp")
        temporary.write_text(json.dumps({"live": number}))
        move_into_place(temporary, self.folder / STATE_NAME, self.folder)
