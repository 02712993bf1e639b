"""Reading the host: /proc, /sys, /dev and the tier folders, below a root.

Every file is read below ``root`` ("/" on a real host), so that tests can
point the probe at a fabricated tree; the free space of a folder comes
from ``disk_usage`` (shutil.disk_usage by default) and programs are looked
for in the root's bin folders. The result, HostFacts, is plain data for the
pure checks in checks.py. A file that cannot be read leaves its fact None;
the checks say what that means.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.hardware import procfs
from appliance.hardware.mdstat import Array, parse_mdstat

logger = logging.getLogger(__name__)

DiskUsage = Callable[[str], Any]  # returns an object with total, used, free

_TAPE_ENTRY = re.compile(r"n?st(\d+)[lma]?")
_BIN_FOLDERS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin")


@dataclass(frozen=True)
class Space:
    """Size, used and free bytes of a file system (free: for non-root)."""

    total: int
    used: int
    free: int


@dataclass(frozen=True)
class PathFacts:
    """A configured folder: whether it exists, where it resolves to, and
    the file system space measured at it or its nearest existing parent."""

    path: str
    resolved: str
    exists: bool
    measured: str
    space: Space | None
    error: str | None = None


@dataclass(frozen=True)
class TapeDrive:
    """A tape drive of the st driver (/sys/class/scsi_tape)."""

    index: int
    vendor: str = ""
    model: str = ""

    @property
    def device(self) -> str:
        """The non-rewinding device file."""
        return f"/dev/nst{self.index}"


@dataclass(frozen=True)
class ScsiGeneric:
    """A SCSI generic device (/sys/class/scsi_generic) and its SCSI type."""

    name: str
    type: int | None
    vendor: str = ""
    model: str = ""

    CHANGER = 8  # SCSI peripheral device type: medium changer
    TAPE = 1  # sequential-access device

    @property
    def device(self) -> str:
        """The device file."""
        return f"/dev/{self.name}"


@dataclass(frozen=True)
class DeviceNode:
    """A device file named in the configuration, as found below the root."""

    path: str
    exists: bool
    accessible: bool


@dataclass(frozen=True)
class HostFacts:
    """What the probe found; None where the source could not be read."""

    root: str
    mounts: tuple[procfs.Mount, ...] | None = None
    arrays: tuple[Array, ...] | None = None
    memory_bytes: int | None = None
    cpu_cores: int | None = None
    open_files: tuple[int | None, int | None] | None = None
    paths: Mapping[str, PathFacts] = field(default_factory=dict)
    tape_drives: tuple[TapeDrive, ...] = ()
    generics: tuple[ScsiGeneric, ...] = ()
    nodes: Mapping[str, DeviceNode] = field(default_factory=dict)
    tools: Mapping[str, str | None] = field(default_factory=dict)


class Probe:
    """Reads HostFacts from the host below ``root``."""

    def __init__(
        self,
        root: Path = Path("/"),
        disk_usage: DiskUsage = shutil.disk_usage,
    ) -> None:
        self.root = root.resolve()
        self.disk_usage = disk_usage
        self.real = self.root == Path("/")

    def read(
        self,
        paths: Iterable[str] = (),
        devices: Iterable[str] = (),
        tools: Iterable[str] = (),
    ) -> HostFacts:
        """Facts about the host, the folders ``paths``, the device files
        ``devices`` and the programs ``tools``."""
        mdstat = self._text("proc/mdstat")
        return HostFacts(
            root=str(self.root),
            mounts=self._mounts(),
            arrays=None if mdstat is None else tuple(parse_mdstat(mdstat)),
            memory_bytes=procfs.parse_meminfo(self._text("proc/meminfo") or ""),
            cpu_cores=self._cpu_cores(),
            open_files=self._open_files(),
            paths={path: self._path(path) for path in paths},
            tape_drives=self._tape_drives(),
            generics=self._generics(),
            nodes={device: self._node(device) for device in devices},
            tools={tool: self._which(tool) for tool in tools},
        )

    # --- files ---------------------------------------------------------------

    def _below(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def _text(self, path: str) -> str | None:
        try:
            return self._below(path).read_text(errors="replace")
        except OSError as exc:
            logger.debug("cannot read %s: %s", self._below(path), exc)
            return None

    def _mounts(self) -> tuple[procfs.Mount, ...] | None:
        text = self._text("proc/self/mounts") or self._text("proc/mounts")
        return None if text is None else tuple(procfs.parse_mounts(text))

    def _cpu_cores(self) -> int | None:
        cores = procfs.parse_cpu_list(self._text("proc/self/status") or "")
        if cores is None:
            cores = procfs.count_processors(self._text("proc/cpuinfo") or "")
        if cores is None and self.real:
            cores = os.cpu_count()
        return cores

    def _open_files(self) -> tuple[int | None, int | None] | None:
        limits = self._text("proc/self/limits")
        if limits is not None:
            return procfs.parse_open_files(limits)
        if not self.real:
            return None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        unlimited = resource.RLIM_INFINITY
        return (
            None if soft == unlimited else soft,
            None if hard == unlimited else hard,
        )

    # --- folders -------------------------------------------------------------

    def _path(self, path: str) -> PathFacts:
        resolved = os.path.realpath(path) if self.real else os.path.normpath(path)
        below = self._below(resolved)
        measured = below
        while not measured.exists() and measured != measured.parent:
            measured = measured.parent
        inside = measured.relative_to(self.root)
        shown = "/" if inside == Path(".") else f"/{inside}"
        try:
            usage = self.disk_usage(str(measured))
        except OSError as exc:
            return PathFacts(path, resolved, below.exists(), shown, None, str(exc))
        space = Space(int(usage.total), int(usage.used), int(usage.free))
        return PathFacts(path, resolved, below.is_dir(), shown, space)

    # --- devices -------------------------------------------------------------

    def _tape_drives(self) -> tuple[TapeDrive, ...]:
        folder = self._below("sys/class/scsi_tape")
        indexes = set()
        for entry in _listing(folder):
            # nst0, st0 and their mode variants (st0l, nst0a, ...) are one drive.
            match = _TAPE_ENTRY.fullmatch(entry)
            if match:
                indexes.add(int(match.group(1)))
        drives = []
        for index in sorted(indexes):
            device = folder / f"nst{index}" / "device"
            if not device.exists():
                device = folder / f"st{index}" / "device"
            drives.append(TapeDrive(index, *_identity(device)))
        return tuple(drives)

    def _generics(self) -> tuple[ScsiGeneric, ...]:
        folder = self._below("sys/class/scsi_generic")
        found = []
        for entry in _listing(folder):
            device = folder / entry / "device"
            kind = _read_stripped(device / "type")
            number = int(kind) if kind.isdigit() else None
            found.append(ScsiGeneric(entry, number, *_identity(device)))
        return tuple(sorted(found, key=lambda g: (len(g.name), g.name)))

    def _node(self, device: str) -> DeviceNode:
        below = self._below(device)
        exists = below.exists()
        accessible = exists and os.access(below, os.R_OK | os.W_OK)
        return DeviceNode(device, exists, accessible)

    def _which(self, tool: str) -> str | None:
        if self.real:
            return shutil.which(tool)
        folders = os.pathsep.join(str(self.root / f) for f in _BIN_FOLDERS)
        return shutil.which(tool, path=folders)


def _listing(folder: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in folder.iterdir())
    except OSError:
        return []


def _read_stripped(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _identity(device: Path) -> tuple[str, str]:
    return _read_stripped(device / "vendor"), _read_stripped(device / "model")
