"""The one interface every offline volume library offers, and its nouns.

A *volume* is one removable medium of the offline tier (a tape cartridge or
an optical disc, or a folder standing in for one), named by its label, which
is also its barcode where the library reads barcodes. A volume is
*reachable* when the library can read or write it without a person (it is
in a drive, a changer slot or the library folder) and *on the shelf*
otherwise. Packs are opaque byte streams written to a volume one after the
other; a pack's place on its volume is a :class:`PackLocation`.

A volume's label names the *archive* that labelled it (the appliance's
archive id): two archives may each have a volume DISC01, and another
archive's volume loaded under this one's label is not this volume.
Volumes labelled before labels named an archive name none, and are taken
as they were.
"""

from __future__ import annotations

import errno
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from appliance.errors import VolumeError, VolumeNotReachable, VolumeReadOnly

# Labels and pack ids become file names on some media: letters, digits,
# "-" and "_" only, so that no label or id can name a path elsewhere.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_PACK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# What a folder answers when it may not be written: a read-only mount, a
# folder whose permissions were taken away, an immutable one.
_WRITES_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)

# This archive's id, or what reads it when needed (it may be made after
# the library is opened: by the first volume labelled); "" for none yet.
ArchiveSource = str | Callable[[], str]


@dataclass(frozen=True)
class VolumeInfo:
    """What the library knows about one volume.

    ``used`` counts the bytes the volume's packs take on the medium; for a
    volume on the shelf it is the last value seen. ``full`` is set once the
    volume refused a pack for lack of room and takes no more packs.

    ``read_only`` says whether the volume refuses packs (a read-only folder
    or image, a cartridge's write-protect tab), as far as the library can
    tell without writing to it or loading it: True or False, or None when
    it cannot tell (a volume on the shelf; a tape not in the drive).
    """

    label: str
    capacity: int
    used: int
    reachable: bool
    full: bool = False
    read_only: bool | None = None

    @property
    def free(self) -> int:
        """Bytes still available for packs (0 once the volume is full)."""
        return 0 if self.full else max(0, self.capacity - self.used)


@dataclass(frozen=True)
class PackLocation:
    """Where one pack is: its volume, its position there, its size and digest.

    ``position`` is the tape file number on tape and the pack's sequence
    number on the other media (1 for the first pack). ``sha256`` is the hex
    digest of the pack's bytes; reading checks it.
    """

    volume: str
    position: int
    pack_id: str
    size: int
    sha256: str


class VolumeLibrary(ABC):
    """A set of volumes that packs are written to and read back from.

    Every backend honours the same contract, checked by one conformance
    suite (tests/test_volumes.py):

    - ``label`` initialises a blank volume and refuses one already labelled,
      or a label that differs only by case from a known one (labels are
      written by hand, and some file systems ignore case);
    - ``write_pack`` returns only once the pack is on stable storage and,
      where the medium allows, read back; when the volume's room runs out
      mid-pack it raises :class:`VolumeFull` and the part written is never
      listed nor readable as a pack;
    - operations on a volume on the shelf raise :class:`VolumeNotReachable`
      naming the label;
    - a new library object over the same place sees the same volumes and
      packs.
    """

    kind: str = ""
    archive_source: ArchiveSource = ""

    def archive(self) -> str:
        """This archive's id: written in the labels of new volumes, and
        checked against the one a volume's label names. Empty while the
        appliance has none (then no label is refused for its archive)."""
        source = self.archive_source
        return source() if callable(source) else source

    def other_archive(self, label_fields: dict[str, object]) -> str | None:
        """The archive a volume's label fields name when it is not this one;
        None for this archive's volumes, and for volumes labelled before
        labels named an archive (or while this appliance has no id)."""
        named = label_fields.get("archive")
        mine = self.archive()
        if not named or not mine or named == mine:
            return None
        return str(named)

    def label_fields(self, volume: str, capacity: int) -> dict[str, object]:
        """What a new volume's label holds besides its format: its label,
        capacity and, once the appliance has one, its archive's id."""
        fields: dict[str, object] = {"label": volume, "capacity": capacity}
        archive = self.archive()
        if archive:
            fields["archive"] = archive
        return fields

    @abstractmethod
    def list_volumes(self) -> list[VolumeInfo]:
        """Every labelled volume the library knows, reachable or not."""

    @abstractmethod
    def label(self, volume: str, capacity: int) -> VolumeInfo:
        """Initialise a blank volume with ``capacity`` bytes for packs."""

    @abstractmethod
    def is_reachable(self, volume: str) -> bool:
        """Whether ``volume`` can be used now without a person's help."""

    def check_reachable(self, volume: str) -> None:
        """Raise VolumeNotReachable, saying why, unless ``volume`` can be
        used now (backends that can tell more say more)."""
        if not self.is_reachable(volume):
            raise VolumeNotReachable(f"volume {volume} is not in the library")

    @abstractmethod
    def free_bytes(self, volume: str) -> int:
        """Bytes a new pack can still use on ``volume`` (last known if shelved).

        Less than :attr:`VolumeInfo.free` where the medium needs room of its
        own per pack (records padding on tape, a session on optical).
        """

    @abstractmethod
    def write_pack(
        self, volume: str, pack_id: str, chunks: Iterable[bytes]
    ) -> PackLocation:
        """Append a pack, streamed from ``chunks``, to ``volume``."""

    @abstractmethod
    def read_pack(self, location: PackLocation, check: bool = True) -> Iterator[bytes]:
        """Stream a pack's bytes back; the digest is checked at the end.

        Reachability is checked when this is called, not on the first chunk.
        Consume the iterator to the end (or close it): a tape drive stays
        busy until then. ``check=False`` gives the bytes as they are, for a
        restore to salvage what a damaged pack still holds intact (each
        instance in a pack has a checksum of its own).
        """

    @abstractmethod
    def list_packs(self, volume: str) -> list[PackLocation]:
        """The complete packs on ``volume``, in the order they were written."""

    @abstractmethod
    def archive_named(self, volume: str) -> str:
        """The archive id the label of reachable ``volume`` names; empty for
        a volume labelled before labels named one. For a restore from the
        volumes, which learns the archive's id from them."""


def another_archives(where: str, volume: str, theirs: str, mine: str) -> str:
    """The sentence for a volume labelled ``volume`` by another archive,
    found at ``where`` (a folder, an image, a drive)."""
    return (
        f"{where} holds volume {volume} of archive {theirs}, not of this "
        f"archive ({mine}): another archive's volume with the same label; "
        f"put it back and this archive's {volume} in its place"
    )


def refused_writes(exc: OSError, volume: str) -> VolumeReadOnly | None:
    """VolumeReadOnly when ``exc`` says a volume's folder or file may not
    be written (read only, write protected); None for any other error."""
    if exc.errno not in _WRITES_REFUSED:
        return None
    what = exc.strerror or str(exc)
    return VolumeReadOnly(f"cannot write to volume {volume}: {what}")


def is_label(name: str) -> bool:
    """Whether ``name`` is a valid volume label (for names found on disk)."""
    return bool(_LABEL.fullmatch(name))


def check_label(volume: str) -> str:
    """Return ``volume`` if it is a valid label, else raise ValueError."""
    if not isinstance(volume, str) or not _LABEL.fullmatch(volume):
        raise ValueError(
            f"volume label {volume!r} must be 1 to 32 letters, digits, '-' or "
            "'_', starting with a letter or digit"
        )
    return volume


def check_pack_id(pack_id: str) -> str:
    """Return ``pack_id`` if it is a valid pack id, else raise ValueError."""
    if not isinstance(pack_id, str) or not _PACK_ID.fullmatch(pack_id):
        raise ValueError(
            f"pack id {pack_id!r} must be 1 to 64 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return pack_id


def check_capacity(capacity: int) -> int:
    """Return ``capacity`` if it is a positive number of bytes."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise ValueError(f"volume capacity {capacity!r} must be a positive integer")
    return capacity


def labelled_capacity(fields: dict[str, object], where: str) -> int:
    """The capacity a volume's label names; VolumeError naming ``where``
    when the label was edited into something else (a label read back is
    not trusted any more than a pack is)."""
    try:
        return check_capacity(fields.get("capacity"))  # type: ignore[arg-type]
    except ValueError as exc:
        what = f"{where}: its label names no usable capacity ({exc})"
        raise VolumeError(what) from exc


def verified_stream(location: PackLocation, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Pass ``chunks`` through, checking size and digest against ``location``.

    The last chunk is held back until the check passes, so a reader that
    got the whole pack got it intact; a mismatch raises VolumeError instead.
    """
    digest = hashlib.sha256()
    size = 0
    held: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        digest.update(chunk)
        size += len(chunk)
        if held is not None:
            yield held
        held = chunk

    if size != location.size or digest.hexdigest() != location.sha256:
        raise VolumeError(
            f"pack {location.pack_id} on volume {location.volume} (position "
            f"{location.position}) reads back as {size} bytes that do not match "
            f"its recorded size {location.size} and SHA-256"
        )
    if held is not None:
        yield held
