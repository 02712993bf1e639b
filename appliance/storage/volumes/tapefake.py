"""A simulated tape drive and changer kept in files, for tests and rehearsals.

:class:`FakeTapeDrive` and :class:`FakeChanger` offer the same interfaces
as the real drive and ``mtx`` (tapedevices.py) and keep the same rules:
records, filemarks, end of data, ENOSPC at the end of a cartridge while
filemarks still fit, one open handle at a time, and a changer that will
not pull a tape the drive has not ejected. Their status goes through the
same parsers as the real tools' output.

A cartridge is one file (``FOLDER/cartridges/BARCODE.tape``)::

    b"FAKETAPE1\\n"  capacity (8 bytes, big endian)  write-protect (1 byte)
    then, in tape order:
      b"R" length (4 bytes, big endian) data     one record
      b"F"                                      one filemark

Writing anywhere but at the end cuts off everything after it, as on tape.
The changer keeps its slots and drives in ``FOLDER/changer.json``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from appliance.errors import VolumeError, VolumeReadOnly
from appliance.storage.volumes.tapestatus import (
    ChangerStatus,
    DriveElement,
    MtStatus,
    StorageElement,
    parse_mt_status,
    parse_mtx_status,
    render_mt_status,
    render_mtx_status,
)

logger = logging.getLogger(__name__)

_MAGIC = b"FAKETAPE1\n"
_HEAD = struct.Struct(">QB")
_RECORD = struct.Struct(">cI")
_FILEMARK = b"F"


@dataclass(frozen=True)
class _Entry:
    """One record or filemark: where its tag starts in the file, its size."""

    start: int
    length: int  # -1 for a filemark

    @property
    def filemark(self) -> bool:
        return self.length < 0


class FakeCartridge:
    """A tape cartridge simulated by one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            if handle.read(len(_MAGIC)) != _MAGIC:
                raise VolumeError(f"{path} is not a simulated tape cartridge")
            self.capacity, protect = _HEAD.unpack(handle.read(_HEAD.size))
            self.write_protected = bool(protect)
            self.entries = self._scan(handle)

    @classmethod
    def create(
        cls, path: Path, capacity: int, write_protected: bool = False
    ) -> FakeCartridge:
        """A blank cartridge of ``capacity`` bytes in a new file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_MAGIC + _HEAD.pack(capacity, int(write_protected)))
        return cls(path)

    def read(self, index: int) -> bytes:
        entry = self.entries[index]
        with open(self.path, "rb") as handle:
            handle.seek(entry.start + _RECORD.size)
            return handle.read(entry.length)

    def used_before(self, index: int) -> int:
        """Bytes of the records before entry ``index``."""
        return sum(entry.length for entry in self.entries[:index] if entry.length > 0)

    def write_at(self, index: int, record: bytes | None) -> None:
        """Replace everything from entry ``index`` on with a record or filemark."""
        at_end = index >= len(self.entries)
        offset = self._end() if at_end else self.entries[index].start
        with open(self.path, "r+b") as handle:
            handle.truncate(offset)
            handle.seek(offset)
            if record is None:
                handle.write(_FILEMARK)
            else:
                handle.write(_RECORD.pack(b"R", len(record)) + record)
        del self.entries[index:]
        self.entries.append(_Entry(offset, -1 if record is None else len(record)))

    def _end(self) -> int:
        if not self.entries:
            return len(_MAGIC) + _HEAD.size
        last = self.entries[-1]
        return last.start + (1 if last.filemark else _RECORD.size + last.length)

    @staticmethod
    def _scan(handle: Any) -> list[_Entry]:
        entries = []
        while tag := handle.read(1):
            start = handle.tell() - 1
            if tag == _FILEMARK:
                entries.append(_Entry(start, -1))
                continue
            (length,) = struct.unpack(">I", handle.read(4))
            handle.seek(length, os.SEEK_CUR)
            entries.append(_Entry(start, length))
        return entries


class FakeTapeDrive:
    """A tape drive whose cartridges are files (see the module docstring)."""

    def __init__(self, name: str = "sim-nst0") -> None:
        self.name = name
        self.cartridge: FakeCartridge | None = None
        self.position = 0
        self.threaded = False
        self._handle: FakeTapeHandle | None = None

    def insert(self, path: Path) -> None:
        """Put the cartridge kept in ``path`` into the drive (a person or robot)."""
        if self.cartridge is not None:
            raise VolumeError(f"{self.name} already holds a cartridge")
        self.cartridge = FakeCartridge(path)
        self.position = 0
        self.threaded = True

    def remove(self) -> Path:
        """Take the cartridge out; it must have been ejected."""
        if self.cartridge is None:
            raise VolumeError(f"{self.name} holds no cartridge")
        if self.threaded:
            raise VolumeError(
                f"{self.name} still has its tape threaded; eject it (mt offline)"
            )
        path, self.cartridge = self.cartridge.path, None
        return path

    def status(self) -> MtStatus:
        return parse_mt_status(render_mt_status(self._status()))

    def wait_ready(self, timeout: float) -> None:
        self._online()

    def rewind(self) -> None:
        self._online()
        self._idle()
        self.position = 0

    def fsf(self, count: int) -> None:
        tape = self._positionable()
        for _ in range(count):
            ahead = range(self.position, len(tape.entries))
            marks = [i for i in ahead if tape.entries[i].filemark]
            if not marks:
                self.position = len(tape.entries)
                self._fail("fsf", count)
            self.position = marks[0] + 1

    def bsf(self, count: int) -> None:
        tape = self._positionable()
        for _ in range(count):
            marks = [i for i in range(self.position) if tape.entries[i].filemark]
            if not marks:
                self.position = 0
                self._fail("bsf", count)
            self.position = marks[-1]

    def asf(self, number: int) -> None:
        self.rewind()
        if number:
            self.fsf(number)

    def eod(self) -> None:
        self.position = len(self._positionable().entries)

    def eject(self) -> None:
        self.rewind()
        self.threaded = False

    def open(self, mode: Literal["r", "w"]) -> FakeTapeHandle:
        tape = self._positionable()
        if mode == "w" and tape.write_protected:
            raise VolumeReadOnly(
                f"cannot write to tape drive {self.name}: the tape is write protected"
            )
        self._handle = FakeTapeHandle(self, tape, mode)
        return self._handle

    def _status(self) -> MtStatus:
        tape = self.cartridge
        if tape is None:
            return MtStatus(-1, -1, flags=frozenset({"DR_OPEN", "IM_REP_EN"}))

        before = tape.entries[: self.position]
        marks = [i for i, entry in enumerate(before) if entry.filemark]
        flags = {"IM_REP_EN"}
        flags |= {"ONLINE"} if self.threaded else set()
        flags |= {"BOT"} if self.position == 0 else set()
        flags |= {"EOF"} if before and before[-1].filemark else set()
        flags |= {"EOD"} if self.position == len(tape.entries) else set()
        flags |= {"WR_PROT"} if tape.write_protected else set()
        block = self.position - (marks[-1] + 1 if marks else 0)
        return MtStatus(len(marks), block, flags=frozenset(flags))

    def _online(self) -> FakeCartridge:
        if self.cartridge is None or not self.threaded:
            raise VolumeError(f"tape drive {self.name} has no tape online")
        return self.cartridge

    def _idle(self) -> None:
        if self._handle is not None:
            raise VolumeError(f"tape drive {self.name} is busy with another stream")

    def _positionable(self) -> FakeCartridge:
        tape = self._online()
        self._idle()
        return tape

    def _fail(self, operation: str, count: int) -> NoReturn:
        raise VolumeError(
            f"mt -f {self.name} {operation} {count} failed (exit 2): Input/output error"
        )

    def _released(self) -> None:
        self._handle = None


class FakeTapeHandle:
    """The simulated drive opened for records."""

    def __init__(
        self, drive: FakeTapeDrive, tape: FakeCartridge, mode: Literal["r", "w"]
    ) -> None:
        self._drive: FakeTapeDrive | None = drive
        self._tape = tape
        self._mode = mode
        self._wrote = False

    def read(self, size: int) -> bytes:
        drive = self._open()
        if drive.position >= len(self._tape.entries):
            raise OSError(errno.EIO, "Input/output error (end of data)")
        entry = self._tape.entries[drive.position]
        if entry.filemark:
            drive.position += 1
            return b""
        if entry.length > size:
            raise OSError(errno.ENOMEM, "Cannot allocate memory (record too big)")
        drive.position += 1
        return self._tape.read(drive.position - 1)

    def write(self, record: bytes) -> None:
        drive = self._open()
        if self._mode != "w":
            raise OSError(errno.EBADF, "tape device is open for reading")
        used = self._tape.used_before(drive.position)
        if used + len(record) > self._tape.capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._tape.write_at(drive.position, record)
        drive.position += 1
        self._wrote = True

    def close(self) -> None:
        drive, self._drive = self._drive, None
        if drive is None:
            return
        if self._wrote:
            self._tape.write_at(drive.position, None)
            drive.position += 1
        drive._released()

    def _open(self) -> FakeTapeDrive:
        if self._drive is None:
            raise OSError(errno.EBADF, "tape device is closed")
        return self._drive


class FakeChanger:
    """A changer with slots, mail slots and drives, kept in ``folder``.

    ``insert_cartridge`` and ``remove_cartridge`` are a person's hands at
    the mail slot; the library itself only uses ``status``, ``load`` and
    ``unload``, as with the real ``mtx``.
    """

    def __init__(
        self,
        folder: Path,
        drives: Sequence[FakeTapeDrive],
        slots: int = 16,
        mail_slots: int = 1,
    ) -> None:
        self.folder = folder
        self.drives = list(drives)
        self.state_file = folder / "changer.json"
        if self.state_file.exists():
            self._state = json.loads(self.state_file.read_text())
        else:
            self._state = self._empty_state(slots, mail_slots)
            self._save()
        for drive, bay in zip(self.drives, self._state["drives"], strict=True):
            if bay["barcode"] and drive.cartridge is None:
                drive.insert(self.cartridge_path(bay["barcode"]))

    def cartridge_path(self, barcode: str) -> Path:
        """The file that simulates the cartridge ``barcode``."""
        return self.folder / "cartridges" / f"{barcode}.tape"

    def status(self) -> ChangerStatus:
        drives = tuple(
            DriveElement(n, bool(bay["barcode"]), bay["source"], bay["barcode"])
            for n, bay in enumerate(self._state["drives"])
        )
        slots = tuple(
            StorageElement(s["number"], bool(s["barcode"]), s["barcode"], s["mail"])
            for s in self._state["slots"]
        )
        text = render_mtx_status(ChangerStatus(drives, slots), "sim-changer")
        return parse_mtx_status(text)

    def load(self, slot: int, drive: int) -> None:
        source, bay = self._slot(slot), self._bay(drive)
        if not source["barcode"]:
            self._fail("load", f"Source Element Address {slot} is Empty")
        if bay["barcode"]:
            self._fail("load", f"Drive {drive} Full (Storage Element loaded)")

        self.drives[drive].insert(self.cartridge_path(source["barcode"]))
        bay.update(barcode=source["barcode"], source=slot)
        source["barcode"] = None
        self._save()

    def unload(self, slot: int, drive: int) -> None:
        target, bay = self._slot(slot), self._bay(drive)
        if not bay["barcode"]:
            self._fail("unload", f"Data Transfer Element {drive} is Empty")
        if target["barcode"]:
            self._fail("unload", f"Storage Element {slot} is Already Full")

        try:
            self.drives[drive].remove()
        except VolumeError as exc:
            self._fail("unload", str(exc))
        target["barcode"] = bay["barcode"]
        bay.update(barcode=None, source=None)
        self._save()

    def insert_cartridge(
        self, barcode: str, capacity: int, slot: int | None = None
    ) -> int:
        """Put a cartridge into a slot (a new blank one if never seen)."""
        if self.status().slot_of(barcode) or self.status().drive_of(barcode):
            raise VolumeError(f"cartridge {barcode} is already in the changer")
        path = self.cartridge_path(barcode)
        if not path.exists():
            FakeCartridge.create(path, capacity)

        free = [s for s in self._state["slots"] if not s["barcode"]]
        chosen = [s for s in free if s["number"] == slot] if slot else free
        if not chosen:
            raise VolumeError(f"no free slot for cartridge {barcode}")
        chosen[0]["barcode"] = barcode
        self._save()
        return int(chosen[0]["number"])

    def set_write_protect(self, barcode: str, protected: bool = True) -> None:
        """Slide the write-protect tab of cartridge ``barcode`` (out of the
        drives, as a person would)."""
        with open(self.cartridge_path(barcode), "r+b") as handle:
            handle.seek(len(_MAGIC))
            capacity, _ = _HEAD.unpack(handle.read(_HEAD.size))
            handle.seek(len(_MAGIC))
            handle.write(_HEAD.pack(capacity, int(protected)))

    def remove_cartridge(self, barcode: str) -> None:
        """Take a cartridge out of its slot (to the shelf); its file stays."""
        for slot in self._state["slots"]:
            if slot["barcode"] == barcode:
                slot["barcode"] = None
                self._save()
                return
        raise VolumeError(f"cartridge {barcode} is not in a slot of the changer")

    def _slot(self, number: int) -> dict[str, Any]:
        for slot in self._state["slots"]:
            if slot["number"] == number:
                found: dict[str, Any] = slot
                return found
        self._fail("slot", f"Invalid element address {number}")

    def _bay(self, number: int) -> dict[str, Any]:
        if not 0 <= number < len(self._state["drives"]):
            self._fail("drive", f"Invalid drive number {number}")
        bay: dict[str, Any] = self._state["drives"][number]
        return bay

    def _fail(self, operation: str, message: str) -> NoReturn:
        raise VolumeError(f"mtx -f sim-changer {operation} failed (exit 1): {message}")

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self._state, indent=1))
        os.replace(temporary, self.state_file)

    def _empty_state(self, slots: int, mail_slots: int) -> dict[str, Any]:
        first_mail = slots - mail_slots + 1
        return {
            "slots": [
                {"number": n, "barcode": None, "mail": n >= first_mail}
                for n in range(1, slots + 1)
            ],
            "drives": [{"barcode": None, "source": None} for _ in self.drives],
        }
