"""A tape drive and a changer as the tape library sees them, and the real ones.

The library talks to a drive through :class:`TapeDrive` and to a changer
through :class:`Changer`. The real drive (:class:`StTapeDrive`) positions
the tape with ``mt`` and moves records through the non-rewinding device
(``/dev/nst0``); the real changer is ``mtx`` (commands.MtxTool). The
simulated ones in tapefake.py do the same on files, for tests and
rehearsals.

Tape semantics both honour (those of the Linux st driver):

- a record is what one ``write`` wrote and one ``read`` returns (variable
  block mode); a read smaller than the record fails;
- closing a handle that wrote writes a filemark, which ends the tape file;
- reading a filemark returns ``b""`` once, then the next file's records;
- reading at end of data fails (EIO); a write that does not fit fails
  (ENOSPC) but filemarks still fit (the early-warning zone);
- only one handle is open at a time, and the tape is positioned only
  while none is.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Literal, Protocol

from appliance.errors import VolumeError, VolumeReadOnly
from appliance.storage.volumes.commands import MtTool
from appliance.storage.volumes.tapestatus import ChangerStatus, MtStatus

logger = logging.getLogger(__name__)

# Seconds between two status polls while a drive threads a tape.
READY_POLL = 2.0


class TapeHandle(Protocol):
    """An open tape device: records in, records out."""

    def read(self, size: int) -> bytes:
        """The next record (at most ``size`` bytes); ``b""`` at a filemark."""
        ...

    def write(self, record: bytes) -> None:
        """Write ``record`` as one record; OSError(ENOSPC) at end of tape."""
        ...

    def close(self) -> None:
        """Close the device; after writes this writes a filemark."""
        ...


class TapeDrive(Protocol):
    """A tape drive: positioning, status, and opening for records."""

    name: str

    def status(self) -> MtStatus:
        """Position and state bits (``mt status``)."""
        ...

    def wait_ready(self, timeout: float) -> None:
        """Wait until a freshly loaded tape is online; use variable records."""
        ...

    def rewind(self) -> None:
        """Go to the beginning of the tape."""
        ...

    def fsf(self, count: int) -> None:
        """Space forward past ``count`` filemarks."""
        ...

    def bsf(self, count: int) -> None:
        """Space backward past ``count`` filemarks (ends before the last)."""
        ...

    def asf(self, number: int) -> None:
        """Go to the first record of tape file ``number`` (0 is the first)."""
        ...

    def eod(self) -> None:
        """Go to the end of recorded data, where the next file is appended."""
        ...

    def eject(self) -> None:
        """Rewind and unthread the tape so that a changer can take it."""
        ...

    def open(self, mode: Literal["r", "w"]) -> TapeHandle:
        """Open the device for reading or writing records."""
        ...


class Changer(Protocol):
    """A media changer: slots, drives, and a robot between them."""

    def status(self) -> ChangerStatus:
        """Every drive and slot (``mtx status``)."""
        ...

    def load(self, slot: int, drive: int) -> None:
        """Move the cartridge in ``slot`` into ``drive``."""
        ...

    def unload(self, slot: int, drive: int) -> None:
        """Move the cartridge in ``drive`` into the empty ``slot``."""
        ...


class StTapeDrive:
    """A real drive of the Linux st driver (``/dev/nstN``, non-rewinding)."""

    def __init__(self, device: str, mt: MtTool | None = None) -> None:
        self.name = device
        self.mt = mt or MtTool(device)
        self._handle: StTapeHandle | None = None

    def status(self) -> MtStatus:
        return self.mt.status()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.status().online:
            if time.monotonic() >= deadline:
                raise VolumeError(
                    f"tape drive {self.name} has no tape online after {timeout:g} s"
                )
            time.sleep(READY_POLL)
        # Variable block mode: every write is one record of its own size.
        self._mt("setblk", "0")
        logger.info("tape drive %s is online", self.name)

    def rewind(self) -> None:
        self._mt("rewind")

    def fsf(self, count: int) -> None:
        self._mt("fsf", str(count))

    def bsf(self, count: int) -> None:
        self._mt("bsf", str(count))

    def asf(self, number: int) -> None:
        # mt-st's asf rewinds first; asf 0 is a plain rewind.
        if number:
            self._mt("asf", str(number))
        else:
            self._mt("rewind")

    def eod(self) -> None:
        self._mt("eod")

    def eject(self) -> None:
        self._mt("offline")

    def open(self, mode: Literal["r", "w"]) -> StTapeHandle:
        self._check_idle()
        flags = os.O_RDONLY if mode == "r" else os.O_WRONLY
        try:
            fd = os.open(self.name, flags)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                # What st answers for a cartridge whose tab is set.
                raise VolumeReadOnly(
                    f"cannot write to tape drive {self.name}: the tape is write "
                    "protected"
                ) from exc
            raise VolumeError(
                f"cannot open tape drive {self.name}: {exc.strerror or exc}"
            ) from exc
        self._handle = StTapeHandle(fd, self)
        return self._handle

    def _mt(self, operation: str, *arguments: str) -> None:
        self._check_idle()
        self.mt.run(operation, *arguments)

    def _check_idle(self) -> None:
        # The st driver lets one process open a drive at a time; mt would
        # fail with "Device or resource busy", which says less than this.
        if self._handle is not None:
            raise VolumeError(f"tape drive {self.name} is busy with another stream")

    def _released(self) -> None:
        self._handle = None


class StTapeHandle:
    """The non-rewinding device opened for records."""

    def __init__(self, fd: int, drive: StTapeDrive) -> None:
        self._fd: int | None = fd
        self._drive = drive

    def read(self, size: int) -> bytes:
        return os.read(self._open_fd(), size)

    def write(self, record: bytes) -> None:
        written = os.write(self._open_fd(), record)
        if written != len(record):
            # st reports the early-warning end of tape as a short write.
            raise OSError(errno.ENOSPC, "end of tape reached")

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._drive._released()
        os.close(fd)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "tape device is closed")
        return self._fd
