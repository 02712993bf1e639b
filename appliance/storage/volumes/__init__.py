"""The offline tier: libraries of volumes (tape cartridges, optical discs).

Every backend offers the same :class:`VolumeLibrary` interface (base.py)
and passes the same conformance suite (tests/test_volumes.py):

============  ====================================  ==========================
kind          a volume is                           reachable when
============  ====================================  ==========================
directory     a folder under ``path`` (the default  its folder, with its
              install, or an LTFS-mounted tape)     VOLUME file, is in ``path``
tape          a cartridge, through one drive        the changer holds it in a
              (``device``) and an optional          slot or drive (no changer:
              changer (``changer``)                 it is in the drive)
optical       an ISO 9660 image under ``path``,     its image is in ``path``
              one per disc, written with xorriso
============  ====================================  ==========================

:func:`open_library` builds one from its settings (the ``[volumes]`` keys
of the configuration, without the section name).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError, VolumeError
from appliance.storage.volumes.base import (
    ArchiveSource,
    PackLocation,
    VolumeInfo,
    VolumeLibrary,
)
from appliance.storage.volumes.commands import MtTool, MtxTool
from appliance.storage.volumes.directory import DirectoryLibrary
from appliance.storage.volumes.optical import OpticalLibrary
from appliance.storage.volumes.tape import TapeLibrary
from appliance.storage.volumes.tapedevices import Changer, StTapeDrive, TapeDrive
from appliance.storage.volumes.tapefake import FakeChanger, FakeTapeDrive
from appliance.storage.volumes.tapeformat import DEFAULT_RECORD_SIZE
from appliance.storage.volumes.xorriso import Xorriso

__all__ = [
    "KINDS",
    "ArchiveSource",
    "PackLocation",
    "VolumeInfo",
    "VolumeLibrary",
    "open_library",
]

KINDS = ("directory", "tape", "optical")

# Settings every kind understands, with their defaults.
DEFAULTS: dict[str, Any] = {
    "path": "",
    "device": "/dev/nst0",
    "changer": "",
    "drive": 0,
    "state_path": "",
    "record_size": DEFAULT_RECORD_SIZE,
    "command_timeout": 900.0,
    "load_timeout": 300.0,
    "simulated_path": "",
    "xorriso": "xorriso",
}


def open_library(
    kind: str,
    settings: Mapping[str, Any],
    recover: bool = True,
    archive: ArchiveSource = "",
    make_folder: bool = True,
) -> VolumeLibrary:
    """The volume library of ``kind`` described by ``settings``.

    Settings (section ``volumes`` of the configuration): ``path`` (folder
    of a directory or optical library), ``device`` (tape drive, a
    non-rewinding /dev/nstN), ``changer`` (its SCSI generic device, empty
    for none), ``drive`` (the drive's number in the changer),
    ``state_path`` (where a tape library keeps its registry),
    ``record_size`` (bytes per tape record), ``command_timeout`` and
    ``load_timeout`` (seconds), ``simulated_path`` (non-empty: a simulated
    drive and changer kept there, for rehearsals), ``xorriso`` (program).
    ``recover`` undoes what a crash left half-written; only the one
    process that writes (the holder of the migration lock) may ask for it.
    ``archive`` is this archive's id, or what reads it (see
    :meth:`VolumeLibrary.archive`). Raises ConfigError naming every wrong key.
    ``make_folder`` lets a directory or optical library make its missing
    ``path``; without it a missing one is a VolumeError naming the key.
    """
    values = {**DEFAULTS, **settings}
    problems = _problems(kind, values)
    if problems:
        raise ConfigError(problems)
    if kind in ("directory", "optical") and not make_folder:
        _refuse_missing_folder(Path(values["path"]))

    if kind == "directory":
        return DirectoryLibrary(Path(values["path"]), recover, archive)
    if kind == "optical":
        xorriso = Xorriso(values["xorriso"], float(values["command_timeout"]))
        return OpticalLibrary(Path(values["path"]), xorriso, recover, archive)
    return _tape_library(values, archive)


def _refuse_missing_folder(path: Path) -> None:
    """A library folder the configuration names is a mount point, or on a
    mounted disk: made anew, it would be an empty library on the system
    disk, where packs would fill it while the real one is not mounted."""
    if not path.exists():  # a file in its place: the library names it
        raise VolumeError(
            f"volumes.path: {path} does not exist: mount the disk that holds "
            "the volumes there, or create the folder (a folder the "
            "configuration names is never made)"
        )


def _tape_library(values: dict[str, Any], archive: ArchiveSource) -> TapeLibrary:
    drive: TapeDrive
    changer: Changer | None
    timeout = float(values["command_timeout"])
    if values["simulated_path"]:
        simulated = FakeTapeDrive()
        changer = FakeChanger(Path(values["simulated_path"]), [simulated])
        drive = simulated
    else:
        drive = StTapeDrive(values["device"], MtTool(values["device"], timeout))
        changer = MtxTool(values["changer"], timeout) if values["changer"] else None

    return TapeLibrary(
        drive,
        changer,
        Path(values["state_path"]),
        drive_number=int(values["drive"]),
        record_size=int(values["record_size"]),
        load_timeout=float(values["load_timeout"]),
        archive=archive,
    )


def _problems(kind: str, values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if kind not in KINDS:
        problems.append(("volumes.kind", "must be one of " + ", ".join(KINDS)))
    if kind in ("directory", "optical") and not values["path"]:
        problems.append(("volumes.path", f"a {kind} library needs a folder"))
    if kind == "tape" and not values["state_path"]:
        problems.append(("volumes.state_path", "a tape library needs a folder"))
    size = values["record_size"]
    if not isinstance(size, int) or not 4096 <= size <= 16 << 20 or size % 512:
        problems.append(
            ("volumes.record_size", "must be a multiple of 512 from 4096 to 16 MiB")
        )
    for key in ("command_timeout", "load_timeout"):
        if not isinstance(values[key], int | float) or values[key] <= 0:
            problems.append((f"volumes.{key}", "must be a number of seconds > 0"))
    return problems
