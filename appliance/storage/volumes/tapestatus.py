"""What ``mt status`` and ``mtx status`` report, parsed into data classes.

``mt status`` (mt-st, Linux st driver) prints, for a drive holding a tape::

    SCSI 2 tape drive:
    File number=2, block number=0, partition=0.
    Tape block size 0 bytes. Density code 0x5a (LTO-6).
    Soft error count since last status=0
    General status bits on (81010000):
     EOF ONLINE IM_REP_EN

``mtx status`` (SCSI media changer) prints one line per element::

      Storage Changer /dev/sg3:2 Drives, 24 Slots ( 1 Import/Export )
    Data Transfer Element 0:Full (Storage Element 3 Loaded):VolumeTag = A00003L6
    Data Transfer Element 1:Empty
          Storage Element 1:Full :VolumeTag=A00001L6
          Storage Element 2:Full
          Storage Element 3:Empty
          Storage Element 24 IMPORT/EXPORT:Empty

Drives are numbered from 0 and slots from 1; import/export slots share the
slots' numbering. The render functions write the same formats; the
simulated devices use them so that their status goes through the parsers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import VolumeError

# General status bits of the Linux st driver (linux/mtio.h, GMT_*), in the
# order mt-st prints their names.
STATUS_BITS = {
    "EOF": 0x80000000,
    "BOT": 0x40000000,
    "EOT": 0x20000000,
    "SM": 0x10000000,
    "EOD": 0x08000000,
    "WR_PROT": 0x04000000,
    "ONLINE": 0x01000000,
    "D_6250": 0x00800000,
    "D_1600": 0x00400000,
    "D_800": 0x00200000,
    "DR_OPEN": 0x00040000,
    "IM_REP_EN": 0x00010000,
    "CLN": 0x00008000,
}

_POSITION = re.compile(
    r"File number=(-?\d+), block number=(-?\d+)(?:, partition=(\d+))?\."
)
_BLOCK = re.compile(
    r"Tape block size (\d+) bytes\. Density code (0x[0-9a-fA-F]+) \(([^)]*)\)\."
)
_BITS = re.compile(r"General status bits on \(([0-9a-fA-F]+)\):[ \t]*\n(.*)")
_HEADER = re.compile(
    r"Storage Changer (\S+):(\d+) Drives, (\d+) Slots \( (\d+) Import/Export \)"
)
_DRIVE = re.compile(
    r"Data Transfer Element (\d+):(Full|Empty)"
    r"(?: \((?:Storage Element (\d+)|Unknown Storage Element) Loaded\))?"
    r"(?::VolumeTag ?= ?([^:]*))?"
)
_SLOT = re.compile(
    r"Storage Element (\d+)( IMPORT/EXPORT)?:(Full|Empty)[ \t]*"
    r"(?::VolumeTag ?= ?([^:]*))?"
)


@dataclass(frozen=True)
class MtStatus:
    """A tape drive's position and state bits, as ``mt status`` reports them.

    File and block numbers are -1 when the driver lost count (no tape, or
    after spacing to end of data with the st option fast-eod).
    """

    file_number: int
    block_number: int
    partition: int = 0
    block_size: int | None = None
    density: str = ""
    flags: frozenset[str] = frozenset()

    @property
    def online(self) -> bool:
        """A tape is loaded and ready."""
        return "ONLINE" in self.flags

    @property
    def at_bot(self) -> bool:
        """At the beginning of the tape."""
        return "BOT" in self.flags

    @property
    def at_eod(self) -> bool:
        """At the end of recorded data: the place to append."""
        return "EOD" in self.flags

    @property
    def write_protected(self) -> bool:
        """The cartridge's write-protect tab is set."""
        return "WR_PROT" in self.flags


@dataclass(frozen=True)
class DriveElement:
    """A drive of a changer ("Data Transfer Element")."""

    number: int
    full: bool
    source_slot: int | None = None
    barcode: str | None = None


@dataclass(frozen=True)
class StorageElement:
    """A slot of a changer; ``import_export`` for the mail slot."""

    number: int
    full: bool
    barcode: str | None = None
    import_export: bool = False


@dataclass(frozen=True)
class ChangerStatus:
    """Every drive and slot of a changer."""

    drives: tuple[DriveElement, ...]
    slots: tuple[StorageElement, ...]

    def drive(self, number: int) -> DriveElement:
        """Drive ``number``; VolumeError if the changer has no such drive."""
        for drive in self.drives:
            if drive.number == number:
                return drive
        raise VolumeError(f"the changer has no drive {number}")

    def slot_of(self, barcode: str) -> StorageElement | None:
        """The slot holding the cartridge ``barcode``, if one does."""
        for slot in self.slots:
            if slot.full and slot.barcode == barcode:
                return slot
        return None

    def drive_of(self, barcode: str) -> DriveElement | None:
        """The drive holding the cartridge ``barcode``, if one does."""
        for drive in self.drives:
            if drive.full and drive.barcode == barcode:
                return drive
        return None

    def empty_slot(self, preferred: int | None = None) -> StorageElement | None:
        """An empty storage slot (not import/export), ``preferred`` first."""
        empty = [s for s in self.slots if not s.full and not s.import_export]
        for slot in empty:
            if slot.number == preferred:
                return slot
        return empty[0] if empty else None


def parse_mt_status(text: str) -> MtStatus:
    """Parse the output of ``mt -f DEVICE status``."""
    position = _POSITION.search(text)
    if position is None:
        raise VolumeError(f"cannot read the output of mt status: {text.strip()!r}")
    block = _BLOCK.search(text)
    bits = _BITS.search(text)

    flags = frozenset(bits.group(2).split()) if bits else frozenset()
    return MtStatus(
        file_number=int(position.group(1)),
        block_number=int(position.group(2)),
        partition=int(position.group(3) or 0),
        block_size=int(block.group(1)) if block else None,
        density=f"{block.group(2)} ({block.group(3)})" if block else "",
        flags=flags,
    )


def parse_mtx_status(text: str) -> ChangerStatus:
    """Parse the output of ``mtx -f DEVICE status``.

    A line that is neither a drive nor a slot is ignored; the header's
    counts, when present, must match what was parsed.
    """
    drives: list[DriveElement] = []
    slots: list[StorageElement] = []
    for line in text.splitlines():
        drive = _DRIVE.search(line)
        slot = None if drive else _SLOT.search(line)
        if drive:
            drives.append(_drive_element(drive))
        elif slot:
            slots.append(_storage_element(slot))

    header = _HEADER.search(text)
    if header is None and not slots:
        raise VolumeError(f"cannot read the output of mtx status: {text.strip()!r}")
    if header and (int(header.group(2)), int(header.group(3))) != (
        len(drives),
        len(slots),
    ):
        raise VolumeError(
            f"mtx status announces {header.group(2)} drives and {header.group(3)} "
            f"slots but lists {len(drives)} and {len(slots)}"
        )
    return ChangerStatus(tuple(drives), tuple(slots))


def _drive_element(match: re.Match[str]) -> DriveElement:
    return DriveElement(
        number=int(match.group(1)),
        full=match.group(2) == "Full",
        source_slot=int(match.group(3)) if match.group(3) else None,
        barcode=_barcode(match.group(4)),
    )


def _storage_element(match: re.Match[str]) -> StorageElement:
    return StorageElement(
        number=int(match.group(1)),
        full=match.group(3) == "Full",
        barcode=_barcode(match.group(4)),
        import_export=bool(match.group(2)),
    )


def _barcode(raw: str | None) -> str | None:
    """A volume tag as printed (space padded by some libraries), or None."""
    tag = (raw or "").strip()
    return tag or None


def render_mt_status(status: MtStatus, drive_type: str = "SCSI 2") -> str:
    """Write ``status`` the way ``mt status`` prints it."""
    bits = sum(STATUS_BITS[flag] for flag in status.flags)
    names = [name for name in STATUS_BITS if name in status.flags]
    density = status.density or "0x0 (default)"
    return (
        f"{drive_type} tape drive:\n"
        f"File number={status.file_number}, block number={status.block_number}, "
        f"partition={status.partition}.\n"
        f"Tape block size {status.block_size or 0} bytes. Density code {density}.\n"
        "Soft error count since last status=0\n"
        f"General status bits on ({bits:x}):\n"
        f" {' '.join(names)}\n"
    )


def render_mtx_status(status: ChangerStatus, device: str) -> str:
    """Write ``status`` the way ``mtx status`` prints it."""
    mail_slots = sum(1 for slot in status.slots if slot.import_export)
    lines = [
        f"  Storage Changer {device}:{len(status.drives)} Drives, "
        f"{len(status.slots)} Slots ( {mail_slots} Import/Export )"
    ]
    for drive in status.drives:
        line = f"Data Transfer Element {drive.number}:"
        if not drive.full:
            lines.append(line + "Empty")
            continue
        source = drive.source_slot
        origin = f"Storage Element {source}" if source else "Unknown Storage Element"
        line += f"Full ({origin} Loaded)"
        lines.append(line + (f":VolumeTag = {drive.barcode}" if drive.barcode else ""))
    for slot in status.slots:
        kind = " IMPORT/EXPORT" if slot.import_export else ""
        line = f"      Storage Element {slot.number}{kind}:"
        line += "Full " if slot.full else "Empty"
        lines.append(line + (f":VolumeTag={slot.barcode}" if slot.barcode else ""))
    return "\n".join(lines) + "\n"
