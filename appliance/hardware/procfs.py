"""Parsers of the /proc files the checks read: mounts, meminfo, limits and
the CPUs a process may use. Pure functions of the files' text."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

logger = logging.getLogger(__name__)

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mounts."""

    source: str
    point: str
    fstype: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        """Mounted with the ro option."""
        return "ro" in self.options


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \040 and so on.
    return _OCTAL.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """The mounts in /proc/self/mounts, in order (a later one hides an
    earlier one on the same mount point)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        source, point, fstype, options = (_unescape(f) for f in fields[:4])
        mounts.append(Mount(source, point, fstype, tuple(options.split(","))))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds the absolute ``path``: the last mounted on the
    longest mount point that is ``path`` or one of its parents."""
    target = PurePosixPath(path)
    best: Mount | None = None
    for mount in mounts:
        point = PurePosixPath(mount.point)
        if target != point and point not in target.parents:
            continue
        if best is None or len(point.parts) >= len(PurePosixPath(best.point).parts):
            best = mount
    return best


def parse_meminfo(text: str) -> int | None:
    """MemTotal of /proc/meminfo in bytes, or None when it is not there."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def parse_open_files(text: str) -> tuple[int | None, int | None] | None:
    """(soft, hard) "Max open files" of /proc/PID/limits; None for unlimited,
    and None for the pair when the line is missing."""
    match = re.search(r"^Max open files\s+(\S+)\s+(\S+)", text, re.MULTILINE)
    if match is None:
        return None
    soft, hard = (None if v == "unlimited" else int(v) for v in match.groups())
    return soft, hard


def parse_cpu_list(text: str) -> int | None:
    """How many CPUs the ``Cpus_allowed_list`` of /proc/self/status names
    (``0-3,8``), or None when the line is missing or malformed."""
    match = re.search(r"^Cpus_allowed_list:\s*(\S+)", text, re.MULTILINE)
    if match is None:
        return None
    count = 0
    for part in match.group(1).split(","):
        low, _dash, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        count += int(high or low) - int(low) + 1
    return count if count > 0 else None


def count_processors(cpuinfo: str) -> int | None:
    """Processors listed in /proc/cpuinfo, when status gives no CPU list."""
    count = len(re.findall(r"^processor\s*:", cpuinfo, re.MULTILINE))
    return count or None
