"""The offline tier: packs on volumes of a library (tape, optical, folders).

A pack for the offline tier is first written to a spool file on disk, so
that it can be written again on another volume when one fills up in the
middle of it, and so that a tape streams at full speed. It is then read
back from the volume, to the end, and checked before it counts. Recall
reads a pack from its volume into the spool and extracts from there.

A pack's location in the catalog is ``VOLUME/POSITION``; its size and
SHA-256 are kept beside it, and reading checks both.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import (
    SpoolError,
    StorageError,
    VolumeError,
    VolumeFull,
    VolumeNotReachable,
    VolumeReadOnly,
)
from appliance.storage import durable
from appliance.storage.keys import DataKey, KeyStore
from appliance.storage.packs import PackReader, PackSummary, VerifyReport
from appliance.storage.packs.manifest import InstanceMeta
from appliance.storage.packs.writer import PackWriter, Source
from appliance.storage.streams import reader_over
from appliance.storage.volumes import PackLocation, VolumeInfo, VolumeLibrary

logger = logging.getLogger(__name__)

TIER_NAME = "offline"
_CHUNK = 1024 * 1024
# Seconds after which a file in spool/read is a crash's leftover.
_STALE_READ_SPOOL = 86400


class NoVolumeWithRoom(StorageError):
    """No reachable volume has room for a pack: a person must load one."""


class OfflineTier:
    """Packs written to, and read back from, a volume library.

    With ``salvage`` (a restore), a pack whose bytes no longer match its
    recorded digest is read all the same: recall checks every instance it
    extracts against its own SHA-256, so the intact ones still come back.
    """

    def __init__(
        self, library: VolumeLibrary, spool: Path, salvage: bool = False
    ) -> None:
        self.library = library
        self.spool = spool
        self.salvage = salvage
        # Volumes that refused a pack as read only: not tried again by this
        # tier (one run), so that a write-protected cartridge is not loaded
        # again for every pack, nor warned about each time.
        self.read_only: set[str] = set()

    def open(self, writer: bool = False) -> None:
        """Make the spool; the writer also removes what a crash left there.

        Packs being written are spooled in ``spool/write`` (one writer at a
        time); packs being recalled in ``spool/read``, by any process, where
        files left for a day are taken to be a crash's leftovers.
        """
        try:
            (self.spool / "write").mkdir(parents=True, exist_ok=True)
            (self.spool / "read").mkdir(parents=True, exist_ok=True)
            stale = time.time() - _STALE_READ_SPOOL
            for leftover in (self.spool / "read").glob("*.spool"):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink(missing_ok=True)
            if writer:
                for leftover in (self.spool / "write").glob("*.spool"):
                    leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {self.spool}") from exc

    def write(
        self,
        pack_id: str,
        items: Iterable[tuple[InstanceMeta, Source]],
        study_uid: str,
        key: DataKey | None,
        keys: KeyStore | None = None,
    ) -> tuple[str, PackSummary]:
        """Write a pack to a volume with room and read it all back from
        there; (its location, what was written)."""
        with self._spooled("write") as path:
            with open(path, "wb") as out:
                writer = PackWriter(out, pack_id, study_uid, key)
                writer.add_all(items)
                summary = writer.close()
            location = self._write_somewhere(pack_id, path, summary.bytes_written)

        report = self._read_back(location, keys)
        if not report.ok:
            raise StorageError(
                f"pack {pack_id} failed its read-back from volume "
                f"{location.volume}: {report.describe()}"
            )
        return f"{location.volume}/{location.position}", summary

    @contextmanager
    def reader(
        self,
        location: str,
        pack_id: str,
        size: int,
        sha256: str,
        keys: KeyStore | None = None,
    ) -> Iterator[PackReader]:
        """A reader of a pack copied from its volume into the spool."""
        where = pack_location(location, pack_id, size, sha256)
        with self._spooled("read") as path:
            self._copy_to_spool(where, path)
            with PackReader.open(path, keys) as reader:
                yield reader

    def _copy_to_spool(self, where: PackLocation, path: Path) -> None:
        """Copy the pack from its volume into ``path``. SpoolError when the
        spool refuses its bytes: a recall must not count the pack damaged
        for a full or read-only local disk."""
        try:
            with open(path, "wb") as out:
                for chunk in self._chunks_of(where):
                    out.write(chunk)
        except OSError as exc:
            raise self._spool_error(exc, where) from exc

    def _chunks_of(self, where: PackLocation) -> Iterator[bytes]:
        """The pack's bytes from its volume; what the volume fails to give
        is the volume's error, not the spool's."""
        try:
            yield from self.library.read_pack(where, not self.salvage)
        except OSError as exc:
            raise VolumeError(
                f"cannot read pack {where.pack_id} from volume {where.volume}: "
                f"{exc.strerror or exc}"
            ) from exc

    def _spool_error(self, exc: OSError, where: PackLocation) -> SpoolError:
        said = durable.translate_os_error(
            exc, f"cannot copy pack {where.pack_id} into {self.spool}"
        )
        return SpoolError(str(said))

    def verify(self, location: PackLocation, keys: KeyStore | None) -> VerifyReport:
        """Read one pack back from its volume and check every instance."""
        return self._read_back(location, keys)

    def volume_of(self, location: str) -> str | None:
        return location.partition("/")[0]

    def remove(self, location: str) -> None:
        """Nothing to do: a volume is written once; its room comes back only
        when the whole volume is relabelled."""

    def is_reachable(self, location: str) -> bool:
        return self.library.is_reachable(location.partition("/")[0])

    def takes_packs(self) -> bool:
        """Whether a reachable volume can take packs now (labelled, loaded,
        not full); a pack may still find too little room on it."""
        return any(
            v.reachable and not v.full and v.label not in self.read_only
            for v in self.library.list_volumes()
        )

    # -- the steps --------------------------------------------------------------

    def _write_somewhere(self, pack_id: str, path: Path, size: int) -> PackLocation:
        for volume in self._candidates(size):
            location = self._write_to(volume.label, pack_id, path)
            if location is not None:
                logger.info(
                    "pack %s written to volume %s at position %d",
                    pack_id,
                    location.volume,
                    location.position,
                )
                return location
        raise NoVolumeWithRoom(self._no_volume(pack_id, size))

    def _write_to(self, volume: str, pack_id: str, path: Path) -> PackLocation | None:
        """The pack written to ``volume``; None when the volume cannot take
        it and the next one may (full, gone to the shelf, read only)."""
        try:
            with open(path, "rb") as source:
                return self.library.write_pack(volume, pack_id, _chunks(source))
        except VolumeFull:
            logger.info(
                "volume %s is full; pack %s goes to the next one", volume, pack_id
            )
        except VolumeNotReachable:
            pass
        except VolumeReadOnly as exc:
            self.read_only.add(volume)
            logger.warning("%s; pack %s tries the next volume", exc, pack_id)
        return None

    def _no_volume(self, pack_id: str, size: int) -> str:
        """Why no volume took the pack, naming the read-only ones."""
        if not self.read_only:
            return (
                f"no reachable volume has {size} bytes free for pack {pack_id}; "
                "load or label a volume"
            )
        named = ", ".join(sorted(self.read_only))
        refusing = f"volume {named} refuses"
        if len(self.read_only) > 1:
            refusing = f"volumes {named} refuse"
        return (
            f"no volume can take pack {pack_id} ({size} bytes): "
            f"{refusing} writes (read only, write protected) and no "
            f"other reachable volume has room; make {named} writable, or load "
            "or label a volume"
        )

    def _candidates(self, size: int) -> list[VolumeInfo]:
        """Reachable volumes with room, the fullest first (fill volumes one
        at a time, so that fewer are needed to recall); none found read
        only."""
        usable = [
            v
            for v in self.library.list_volumes()
            if v.reachable
            and not v.full
            and v.label not in self.read_only
            and self.library.free_bytes(v.label) >= size
        ]
        return sorted(usable, key=lambda v: (v.free, v.label))

    def _read_back(self, location: PackLocation, keys: KeyStore | None) -> VerifyReport:
        stream = reader_over(self.library.read_pack(location))
        try:
            return PackReader(stream, keys).read_all()
        finally:
            stream.close()

    @contextmanager
    def _spooled(self, purpose: str) -> Iterator[Path]:
        path = self.spool / purpose / f"{secrets.token_hex(8)}.spool"
        try:
            yield path
        finally:
            durable.discard(path)


def pack_location(location: str, pack_id: str, size: int, sha256: str) -> PackLocation:
    """The volume location of a pack as the catalog records it: reading it
    there checks that the volume holds that pack, with those bytes."""
    volume, _, position = location.partition("/")
    if not position.isdigit():
        raise StorageError(f"not an offline location: {location!r}")
    return PackLocation(volume, int(position), pack_id, size, sha256)


def _chunks(source: io.BufferedReader) -> Iterator[bytes]:
    while chunk := source.read(_CHUNK):
        yield chunk
