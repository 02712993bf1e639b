"""Running the media tools (mt, mtx, xorriso): time limits and clear errors.

:func:`run_tool` runs any of them; :class:`MtTool` and :class:`MtxTool` wrap
``mt`` on a tape drive and ``mtx`` on a changer, parsing what they print
(tapestatus.py).

A tape or changer command can hang on a sick device, and a process stuck
in the kernel may not even die when killed. Every command therefore runs
with a time limit, is killed when it passes it, and is abandoned (with an
error naming its pid) if it still has not ended a few seconds later, so
that the caller never hangs.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

from appliance.errors import VolumeError
from appliance.storage.volumes.tapestatus import (
    ChangerStatus,
    MtStatus,
    parse_mt_status,
    parse_mtx_status,
)

logger = logging.getLogger(__name__)

# The Debian package that provides each tool, for the "not installed" error.
PACKAGES = {"mt": "mt-st", "mtx": "mtx", "xorriso": "xorriso"}

# Seconds to wait for a killed command to end before abandoning it.
KILL_GRACE = 5.0


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run ``argv`` and return its standard output.

    Raises VolumeError when the program is missing, fails (the message
    carries the end of its error output) or runs longer than ``timeout``
    seconds.
    """
    command = shlex.join(argv)
    logger.debug("running %s", command)
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            # Out of the terminal's process group: a Ctrl-C there is for
            # the appliance to act on (finish the study in flight), not
            # for the tool, whose death would count as a bad volume.
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        package = PACKAGES.get(argv[0], argv[0])
        raise VolumeError(
            f"{argv[0]} is not installed (apt-get install {package})"
        ) from exc
    except OSError as exc:
        raise VolumeError(f"cannot run {command}: {exc.strerror or exc}") from exc

    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _stop(process, command)
        raise VolumeError(
            f"{command} did not finish within {timeout:g} s; the device may be "
            "hung or still busy"
        ) from exc
    except BaseException:
        # Stopped at once (a second Ctrl-C): the tool, in a session of its
        # own, would not hear of it and run on.
        _stop(process, command)
        raise

    if process.returncode != 0:
        raise VolumeError(
            f"{command} failed (exit {process.returncode}): "
            f"{_last_lines(stderr or stdout)}"
        )
    return stdout


def _stop(process: subprocess.Popen[str], command: str) -> None:
    """Kill a command that ran too long; give up waiting if it will not end."""
    process.kill()
    try:
        process.communicate(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        # Stuck in the kernel (a hung SCSI command): nothing more to do from
        # here; the administrator sees the pid in the log.
        logger.error(
            "%s (pid %d) did not end when killed; it is left behind",
            command,
            process.pid,
        )


def _last_lines(output: str, count: int = 3) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no error message"


class MtTool:
    """``mt`` (mt-st) on one tape device: positioning and status."""

    def __init__(self, device: str, timeout: float = 900.0, program: str = "mt"):
        self.device = device
        self.timeout = timeout
        self.program = program

    def run(self, operation: str, *arguments: str, timeout: float | None = None) -> str:
        """Run ``mt -f DEVICE OPERATION ARGUMENTS`` and return its output."""
        argv = [self.program, "-f", self.device, operation, *arguments]
        return run_tool(argv, self.timeout if timeout is None else timeout)

    def status(self) -> MtStatus:
        """The drive's position and state bits."""
        return parse_mt_status(self.run("status", timeout=min(self.timeout, 60.0)))


class MtxTool:
    """``mtx`` on one SCSI media changer; it is the real :class:`Changer`."""

    def __init__(self, device: str, timeout: float = 900.0, program: str = "mtx"):
        self.device = device
        self.timeout = timeout
        self.program = program

    def run(self, *arguments: str) -> str:
        """Run ``mtx -f DEVICE ARGUMENTS`` and return its output."""
        return run_tool([self.program, "-f", self.device, *arguments], self.timeout)

    def status(self) -> ChangerStatus:
        """Every drive and slot, with barcodes where the changer reads them."""
        return parse_mtx_status(self.run("status"))

    def load(self, slot: int, drive: int) -> None:
        """Move the cartridge in ``slot`` into ``drive``."""
        self.run("load", str(slot), str(drive))

    def unload(self, slot: int, drive: int) -> None:
        """Move the cartridge in ``drive`` (ejected first) into ``slot``."""
        self.run("unload", str(slot), str(drive))
