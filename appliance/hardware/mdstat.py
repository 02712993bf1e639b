"""The state of Linux software RAID arrays, parsed from /proc/mdstat.

An array takes a header line and indented detail lines::

    md1 : active raid6 sdd1[3] sdc1[2](F) sdb1[1] sda1[0]
          7813772288 blocks super 1.2 level 6, 512k chunk, algorithm 2 [4/3] [UU_U]
          [==>..................]  recovery = 12.6% (...) finish=97.3min speed=...

The header gives the state (``active``, ``inactive``, maybe ``(read-only)``
or ``(auto-read-only)``), the level (missing while inactive) and the members
as ``name[role]`` with flags: ``(F)`` failed, ``(S)`` spare, ``(W)``
write-mostly, ``(J)`` journal, ``(R)`` replacement. ``[4/3]`` is members
wanted / working and ``[UU_U]`` which roles are up. A progress line names
the operation running (resync, recovery, reshape, check, repair) or a
delayed or pending one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_HEADER = re.compile(r"^(md[A-Za-z0-9_]+)\s*:\s*(.*)$")
_MEMBER = re.compile(r"^([^\s\[]+)\[(\d+)\]((?:\([A-Z]\))*)$")
_DISKS = re.compile(r"\[(\d+)/(\d+)\]\s+\[([U_]+)\]")
_PROGRESS = re.compile(
    r"(resync|recovery|reshape|check|repair)\s*=\s*([\d.]+)%"
    r"(?:.*?finish=([\d.]+)min)?"
)
_WAITING = re.compile(r"(resync|recovery|reshape|check|repair)\s*=\s*(DELAYED|PENDING)")


@dataclass(frozen=True)
class Member:
    """A device of an array, and its flags (F failed, S spare, ...)."""

    name: str
    role: int
    flags: str = ""

    @property
    def failed(self) -> bool:
        """Marked (F): the kernel stopped using it."""
        return "F" in self.flags

    @property
    def spare(self) -> bool:
        """Marked (S): a spare, or a member of an inactive array."""
        return "S" in self.flags


@dataclass(frozen=True)
class Progress:
    """An operation running on an array; ``percent`` and ``minutes_left``
    are None while it waits (DELAYED, PENDING)."""

    operation: str
    percent: float | None = None
    minutes_left: float | None = None


@dataclass(frozen=True)
class Array:
    """One array of /proc/mdstat."""

    name: str
    active: bool
    read_only: bool
    auto_read_only: bool
    level: str | None
    members: tuple[Member, ...]
    wanted: int | None = None
    working: int | None = None
    roles: str | None = None
    progress: Progress | None = None

    @property
    def failed(self) -> tuple[Member, ...]:
        """The members marked failed."""
        return tuple(member for member in self.members if member.failed)

    @property
    def missing(self) -> int:
        """Roles without a working device: how degraded the array is."""
        if self.wanted is None or self.working is None:
            return 0
        return max(0, self.wanted - self.working)

    @property
    def redundancy(self) -> int | None:
        """How many more devices can fail before data is lost, or None when
        the level does not say (raid10 depends on which devices fail)."""
        if self.wanted is None or self.working is None or self.level is None:
            return None
        tolerated = {"raid1": self.wanted - 1, "raid4": 1, "raid5": 1, "raid6": 2}
        if self.level in ("raid0", "linear"):
            return 0
        if self.level not in tolerated:
            return None
        return max(0, tolerated[self.level] - self.missing)


def parse_mdstat(text: str) -> list[Array]:
    """Every array in the text of /proc/mdstat, in order."""
    arrays: list[Array] = []
    lines: list[str] = []
    for line in text.splitlines():
        if _HEADER.match(line):
            if lines:
                arrays.append(_array(lines))
            lines = [line]
        elif lines and line.startswith((" ", "\t")):
            lines.append(line)
        elif lines:
            arrays.append(_array(lines))
            lines = []
    if lines:
        arrays.append(_array(lines))
    return arrays


def _array(lines: list[str]) -> Array:
    header = _HEADER.match(lines[0])
    assert header is not None  # parse_mdstat only starts an array on a header
    name, rest = header.groups()
    words = rest.split()

    active = bool(words) and words[0] == "active"
    words = words[1:]
    mode = words[0] if words and words[0].startswith("(") else ""
    if mode:
        words = words[1:]
    level = None
    if words and not _MEMBER.match(words[0]):
        level, words = words[0], words[1:]

    details = " ".join(lines[1:])
    disks = _DISKS.search(details)
    wanted, working, roles = (
        (int(disks.group(1)), int(disks.group(2)), disks.group(3))
        if disks
        else (None, None, None)
    )
    return Array(
        name=name,
        active=active,
        read_only=mode == "(read-only)",
        auto_read_only=mode == "(auto-read-only)",
        level=level,
        members=tuple(_members(words)),
        wanted=wanted,
        working=working,
        roles=roles,
        progress=_progress(details),
    )


def _members(words: list[str]) -> list[Member]:
    members = []
    for word in words:
        match = _MEMBER.match(word)
        if match is None:
            logger.debug("mdstat: not a member: %r", word)
            continue
        flags = match.group(3).replace("(", "").replace(")", "")
        members.append(Member(match.group(1), int(match.group(2)), flags))
    return members


def _progress(details: str) -> Progress | None:
    running = _PROGRESS.search(details)
    if running:
        minutes = float(running.group(3)) if running.group(3) else None
        return Progress(running.group(1), float(running.group(2)), minutes)
    waiting = _WAITING.search(details)
    if waiting:
        return Progress(waiting.group(1))
    return None
