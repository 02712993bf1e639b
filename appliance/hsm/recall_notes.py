"""Notes of the online files recalls are writing, so that the files a killed
recall left behind are removed.

A recall writes each instance under a fresh online key and records the
study's copies in one transaction at the end; a process killed in between
leaves files no catalog record counts, and the next recall writes new
keys. So before the files of a pack are written, their keys are added to
the recall's note and the note is flushed (one fsync per pack); the note
is removed once the copies are recorded.

One note per recall in progress, in ``recalls/`` under the online tier's
root (beside ``incoming/``), named after the process and a random part::

    recalls/4711-9c1e0f3a5b7d2e46.note
        study 1.2.826.0.1.3680043.10.1009.7
        process 4711
        5f0c2b7e9a1d4c3b8e6f7a2d1c0b9e8f
        ...

The writer holds an flock on its note for the whole recall; the kernel
releases it when the process dies, however it dies. A note whose lock can
be taken belongs to no running recall: its keys that no online copy of the
study names are removed, then the note. This runs when the service starts
(before it accepts associations) and before each recall. A recall that
Ctrl-C stops (a KeyboardInterrupt) does the same with its own note before
the exception leaves it: the command is about to end, and no later recall
in it would.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, StorageError
from appliance.hsm.tiers import ONLINE
from appliance.storage import durable
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

FOLDER = "recalls"
SUFFIX = ".note"
_STUDY = "study "
_PROCESS = "process "


def folder_of(online: OnlineTier) -> Path:
    return online.root / FOLDER


def remove_uncounted(
    catalog: Catalog, online: OnlineTier, study_uid: str, keys: Iterable[str]
) -> int:
    """Remove the files under ``keys`` that no online copy of the study
    names; how many were removed. A key is only ever recorded for an
    instance of the study whose recall made it, so the study's copies
    are the ones to look at."""
    counted = _counted(catalog, study_uid)
    removed = 0
    for key in keys:
        if key in counted:
            continue
        try:
            path = online.path_of(key)
        except StorageError:
            continue  # a line cut short by a power cut: never written
        if path.exists():
            online.remove(key)
            removed += 1
    return removed


def _counted(catalog: Catalog, study_uid: str) -> set[str]:
    """The keys of the study's online copies."""
    return {
        copy.location
        for record in copies.instances_of(catalog, study_uid)
        for copy in record.copies
        if copy.tier == ONLINE
    }


class RecallNote:
    """The note of one recall in progress; made at its first keys."""

    def __init__(self, online: OnlineTier, study_uid: str) -> None:
        self.online = online
        self.study_uid = study_uid
        self.path: Path | None = None
        self._fd: int | None = None
        self._keys: list[str] = []

    def add(self, keys: Sequence[str]) -> None:
        """Put ``keys`` in the note on stable storage; their files may be
        written once this returns."""
        if not keys:
            return
        self._keys.extend(keys)
        text = "".join(f"{key}\n" for key in keys)
        try:
            if self._fd is None:
                self._fd = self._create()
                header = f"{_STUDY}{self.study_uid}\n{_PROCESS}{os.getpid()}\n"
                self._write(header + text)
                # The note's name must survive a power cut as well as its keys.
                durable.fsync_directory(folder_of(self.online))
            else:
                self._write(text)
        except OSError as exc:
            what = "cannot write the recall note"
            raise durable.translate_os_error(exc, what) from exc

    def end(self) -> None:
        """The copies are recorded (or none were written): forget the note."""
        if self.path is not None:
            # Removed while still locked: no clean-up reads it half gone.
            self.path.unlink(missing_ok=True)
        self.close()

    def discard(self, catalog: Catalog) -> None:
        """The recall was stopped (Ctrl-C) and the process is about to end:
        remove now the files under the note's keys that the catalog does
        not count, then the note. A file that stays (the disk refused)
        keeps the note for the next clean-up, as does a failure here."""
        try:
            removed = remove_uncounted(catalog, self.online, self.study_uid, self._keys)
            uncounted = set(self._keys) - _counted(catalog, self.study_uid)
            left = [k for k in uncounted if self.online.path_of(k).exists()]
        except (ApplianceError, OSError) as exc:
            logger.warning("stopped recall of study %s: %s", self.study_uid, exc)
            self.close()
            return
        if left:
            self.close()
            return
        logger.info(
            "stopped recall of study %s: its %d uncounted file(s) removed",
            self.study_uid,
            removed,
        )
        self.end()

    def close(self) -> None:
        """Let go of the note and leave it for the next clean-up (the
        recall failed: the catalog decides which of its files count)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _create(self) -> int:
        folder = folder_of(self.online)
        if not folder.is_dir():
            durable.make_directories(folder, self.online.root)
        while True:
            path = folder / f"{os.getpid()}-{secrets.token_hex(8)}{SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
            fd = os.open(path, flags, 0o640)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A clean-up may have taken the empty note for a dead one
            # between the open and the lock, and removed it: make another.
            if _names(path, fd):
                self.path = path
                return fd
            os.close(fd)

    def _write(self, text: str) -> None:
        assert self._fd is not None
        data = text.encode()
        while data:
            data = data[os.write(self._fd, data) :]
        os.fsync(self._fd)


def clean_up(catalog: Catalog, online: OnlineTier) -> int:
    """Remove the files of every note no running recall holds that the
    catalog does not count, then the note; how many files were removed."""
    folder = folder_of(online)
    if not folder.is_dir():
        return 0
    return sum(_clean_one(catalog, online, path) for path in _notes_in(folder))


def clean_up_or_warn(catalog: Catalog, online: OnlineTier) -> None:
    """:func:`clean_up`, with a failure logged rather than raised: the
    files only take room, and recalls and the service go on without it."""
    try:
        clean_up(catalog, online)
    except (ApplianceError, OSError) as exc:
        logger.warning("cannot clean up after an interrupted recall: %s", exc)


def _notes_in(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SUFFIX}"))


def _clean_one(catalog: Catalog, online: OnlineTier, path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0  # finished, or cleaned by another process meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its recall is running
        if not _names(path, fd):
            return 0
        study_uid, process, keys = _parse(_read(fd))
        removed = 0
        if study_uid:
            removed = remove_uncounted(catalog, online, study_uid, keys)
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    logger.info(
        "removed %d file(s) an interrupted recall of study %s left online "
        "(note %s of process %s)",
        removed,
        study_uid or "(not noted)",
        path.name,
        process or "(not noted)",
    )
    return removed


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)


def _read(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _parse(text: str) -> tuple[str, str, list[str]]:
    """(study UID, process ID, keys) of a note; a note cut short before
    its first flush has no study, and no file of it was written."""
    study_uid = process = ""
    keys = []
    for line in text.splitlines():
        if line.startswith(_STUDY):
            study_uid = line[len(_STUDY) :]
        elif line.startswith(_PROCESS):
            process = line[len(_PROCESS) :]
        elif line:
            keys.append(line)
    return study_uid, process, keys
