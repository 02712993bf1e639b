"""Volumes as folders: the default offline tier, and LTFS-mounted tapes.

Layout under the library folder ``PATH``::

    PATH/
      .registry/LABEL.json     every labelled volume, also those on the shelf
      LABEL/                   a reachable volume: a folder, or the mount
        VOLUME                 point of an LTFS tape; its label file (JSON:
        packs/                 format, label, capacity, archive)
          000001-p-000123-<sha256>.pack    one file per pack (packfiles.py)
        incoming/              packs being received; never counted

A volume is *reachable* when ``PATH/LABEL/VOLUME`` exists, names LABEL
and no other archive than this one (``archive``, absent from labels written
before labels named one), and ``PATH/LABEL/packs`` is there. It goes *on
the shelf* when its folder leaves ``PATH`` (moved elsewhere, or its LTFS
tape unmounted) and comes back when the folder is put back or the tape
mounted there again. Its capacity is the one written in ``VOLUME`` at
labelling; the file system's own free space limits it too.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from appliance.errors import (
    OutOfSpaceError,
    VolumeError,
    VolumeFull,
    VolumeNotReachable,
)
from appliance.storage import durable
from appliance.storage.volumes.base import (
    ArchiveSource,
    PackLocation,
    VolumeInfo,
    VolumeLibrary,
    another_archives,
    check_capacity,
    check_label,
    check_pack_id,
    is_label,
    refused_writes,
    verified_stream,
)
from appliance.storage.volumes.packfiles import (
    location_from_name,
    pack_file_name,
    receive,
    stream_file,
)
from appliance.storage.volumes.registry import (
    Registry,
    VolumeRecord,
    write_atomically,
)

logger = logging.getLogger(__name__)

LABEL_FILE = "VOLUME"
LABEL_FORMAT = "pacs-appliance volume 1"
# What _problem says of a volume whose folder is simply not there.
_ABSENT = "absent"


class DirectoryLibrary(VolumeLibrary):
    """Volumes that are folders under one library folder.

    One library object writes to a folder at a time (the one that holds
    the migration lock); that one, opened with ``recover``, removes packs
    left half-received by a crash. Readers open it without.
    """

    kind = "directory"

    def __init__(
        self, path: Path, recover: bool = True, archive: ArchiveSource = ""
    ) -> None:
        self.path = path
        self.archive_source = archive
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {path}") from exc
        self.registry = Registry(path / ".registry")
        if recover:
            self._discard_incoming()

    def list_volumes(self) -> list[VolumeInfo]:
        self._adopt_new_folders()
        return [self._info(self._record(label)) for label in self.registry.labels()]

    def label(self, volume: str, capacity: int) -> VolumeInfo:
        check_label(volume)
        check_capacity(capacity)
        self.registry.refuse_twin(volume)
        folder = self.path / volume
        if self.registry.get(volume) or (folder / LABEL_FILE).exists():
            raise VolumeError(f"volume {volume} is already labelled")
        if folder.is_dir() and any(folder.iterdir()):
            raise VolumeError(
                f"{folder} is not empty; a new volume needs an empty folder"
            )

        durable.make_directories(folder / "packs", self.path)
        durable.make_directories(folder / "incoming", self.path)
        fields = {"format": LABEL_FORMAT, **self.label_fields(volume, capacity)}
        text = json.dumps(fields)
        write_atomically(folder / LABEL_FILE, text.encode(), self.path)
        record = VolumeRecord(label=volume, capacity=capacity)
        self.registry.save(record)

        logger.info("directory volume %s labelled, %d bytes", volume, capacity)
        return self._info(record)

    def is_reachable(self, volume: str) -> bool:
        return self._problem(self.path / check_label(volume), volume) is None

    def check_reachable(self, volume: str) -> None:
        self._folder(volume)

    def free_bytes(self, volume: str) -> int:
        info = self._info(self._record(volume))
        if not info.reachable:
            return info.free
        # The file system may run out before the labelled capacity does
        # (all default volumes share one disk): report the smaller room.
        return min(info.free, shutil.disk_usage(self.path / volume).free)

    def write_pack(
        self, volume: str, pack_id: str, chunks: Iterable[bytes]
    ) -> PackLocation:
        check_pack_id(pack_id)
        folder = self._folder(volume)
        record = self._record(volume)
        limit = self.free_bytes(volume)

        temporary = folder / "incoming" / f"{secrets.token_hex(8)}.part"
        try:
            size, sha256 = self._receive(chunks, temporary, limit, volume)
            position = self._next_position(volume)
            name = pack_file_name(position, pack_id, sha256)
            durable.move_into_place(temporary, folder / "packs" / name, folder)
        except OutOfSpaceError as exc:
            raise VolumeFull(f"volume {volume} is full: {exc}") from exc
        finally:
            durable.discard(temporary)

        record.used = self._used(folder)
        self.registry.save(record)
        logger.info(
            "pack %s written to directory volume %s at position %d, %d bytes",
            pack_id,
            volume,
            position,
            size,
        )
        return PackLocation(volume, position, pack_id, size, sha256)

    def read_pack(self, location: PackLocation, check: bool = True) -> Iterator[bytes]:
        folder = self._folder(location.volume)
        name = pack_file_name(location.position, location.pack_id, location.sha256)
        path = folder / "packs" / name
        if not path.is_file():
            raise VolumeError(
                f"volume {location.volume} holds no pack {location.pack_id} at "
                f"position {location.position}"
            )
        chunks = stream_file(path)
        return verified_stream(location, chunks) if check else chunks

    def list_packs(self, volume: str) -> list[PackLocation]:
        folder = self._folder(volume)
        found = []
        try:
            for path in (folder / "packs").iterdir():
                location = location_from_name(volume, path.name, path.stat().st_size)
                if location is not None:
                    found.append(location)
        except OSError as exc:
            # Taken away while being listed: the volume is gone, not broken.
            raise VolumeNotReachable(
                f"volume {volume}: cannot list its packs: {exc}"
            ) from exc
        return sorted(found, key=lambda location: location.position)

    def archive_named(self, volume: str) -> str:
        folder = self._folder(volume)
        try:
            fields = json.loads((folder / LABEL_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise VolumeError(f"label file of {folder} is unreadable: {exc}") from exc
        return str(fields.get("archive") or "")

    def _receive(
        self, chunks: Iterable[bytes], temporary: Path, limit: int, volume: str
    ) -> tuple[int, str]:
        """Write the pack's bytes to ``temporary``; VolumeFull if they do not fit."""
        try:
            with open(temporary, "wb") as handle:
                return receive(chunks, handle, limit, volume)
        except OSError as exc:
            refused = refused_writes(exc, volume)
            if refused is not None:
                raise refused from exc
            raise durable.translate_os_error(
                exc, f"cannot write to volume {volume}"
            ) from exc

    def _next_position(self, volume: str) -> int:
        packs = self.list_packs(volume)
        return packs[-1].position + 1 if packs else 1

    def _folder(self, volume: str) -> Path:
        """The folder of a reachable volume; VolumeNotReachable if shelved."""
        record = self._record(volume)
        folder = self.path / record.label
        problem = self._problem(folder, record.label)
        if problem == _ABSENT:
            raise VolumeNotReachable(
                f"volume {volume} is on the shelf: put its folder back as "
                f"{folder} (or mount its tape there)"
            )
        if problem:
            raise VolumeNotReachable(f"volume {volume} cannot be used: {problem}")
        return folder

    def _record(self, volume: str) -> VolumeRecord:
        """The registry's record of ``volume``; a folder not yet known is adopted."""
        record = self.registry.get(check_label(volume))
        if record is None:
            self.registry.refuse_twin(volume)
            record = self._adopt(self.path / volume)
        if record is None:
            raise VolumeError(f"no volume labelled {volume} is known; label it first")
        return record

    def _adopt(self, folder: Path) -> VolumeRecord | None:
        """Register a labelled folder written elsewhere (another appliance)."""
        try:
            label = json.loads((folder / LABEL_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise VolumeError(f"label file of {folder} is unreadable: {exc}") from exc
        named = label.get("label") if isinstance(label, dict) else None
        if not isinstance(label, dict) or label.get("format") != LABEL_FORMAT:
            raise VolumeError(f"{folder / LABEL_FILE} is not a volume label file")
        if named != folder.name:
            # A folder copied or renamed by hand: say what it holds, and
            # the name it must have to be used.
            raise VolumeError(
                f"{folder} holds volume {named}, not {folder.name}: rename the "
                f"folder to {named} to use it"
            )
        theirs = self.other_archive(label)
        if theirs is not None:
            raise VolumeError(
                another_archives(str(folder), folder.name, theirs, self.archive())
            )

        try:
            capacity = check_capacity(label.get("capacity", 0))
        except ValueError as exc:
            # A label file edited by hand: one warning, not a traceback that
            # stops every other volume from being listed.
            raise VolumeError(f"{folder / LABEL_FILE}: {exc}") from exc
        record = VolumeRecord(label=folder.name, capacity=capacity)
        record.used = self._used(folder)
        self.registry.save(record)
        logger.info("directory volume %s found and registered", folder.name)
        return record

    def _adopt_new_folders(self) -> None:
        known = set(self.registry.labels())
        for folder in self.path.iterdir():
            if not is_label(folder.name) or folder.name in known:
                continue
            if not (folder / LABEL_FILE).is_file():
                continue
            try:
                self._adopt(folder)
            except VolumeError as exc:
                # A stray copy (a backup of a volume's folder, say) must not
                # stop every other volume from being used.
                logger.warning("directory volumes: %s; folder ignored", exc)

    def _info(self, record: VolumeRecord) -> VolumeInfo:
        folder = self.path / record.label
        problem = self._problem(folder, record.label)
        if problem:
            if problem != _ABSENT:
                logger.warning(
                    "directory volume %s cannot be used: %s", record.label, problem
                )
            return VolumeInfo(record.label, record.capacity, record.used, False)

        used = self._used(folder)
        read_only = _refuses_writes(folder)
        return VolumeInfo(record.label, record.capacity, used, True, False, read_only)

    @staticmethod
    def _used(folder: Path) -> int:
        packs = folder / "packs"
        return sum(path.stat().st_size for path in packs.glob("*.pack"))

    def _discard_incoming(self) -> None:
        for leftover in self.path.glob("*/incoming/*.part"):
            leftover.unlink(missing_ok=True)
            logger.info("directory volumes: removed half-received %s", leftover)

    def _problem(self, folder: Path, volume: str) -> str | None:
        """Why ``folder`` cannot serve as volume ``volume`` now: _ABSENT when
        it is not there (on the shelf), a sentence when it is there but
        wrong; None when it is ready.

        The label file is read each time: the folder under a volume's name
        is whatever a person last put there, and another volume's folder
        (swapped on the way back from the vault, the wrong LTFS tape
        mounted, or another archive's volume of the same label) must
        neither be read as this one nor take its packs."""
        try:
            fields = json.loads((folder / LABEL_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return _ABSENT
        except (OSError, ValueError) as exc:
            return f"its label file {folder / LABEL_FILE} is unreadable: {exc}"
        if not isinstance(fields, dict) or fields.get("format") != LABEL_FORMAT:
            # Edited by hand, or not ours: as when the folder is adopted.
            return f"{folder / LABEL_FILE} is not a volume label file"
        named = fields.get("label")
        if named != volume:
            return (
                f"{folder} holds volume {named}, not {volume}: put that folder "
                f"back under its own name and {volume}'s folder here"
            )
        theirs = self.other_archive(fields)
        if theirs is not None:
            return another_archives(str(folder), volume, theirs, self.archive())
        return _packs_problem(folder)


def _refuses_writes(folder: Path) -> bool:
    """Whether a reachable volume's folder refuses packs, seen without
    writing to it: a pack is received in ``incoming`` and moved into
    ``packs``. access() says no for a file system mounted read only (an
    LTFS tape's too), a folder without write permission and an immutable
    one, as the writing itself would."""
    places = (folder / "incoming", folder / "packs")
    wanted = os.W_OK | os.X_OK
    return any(place.is_dir() and not os.access(place, wanted) for place in places)


def _packs_problem(folder: Path) -> str | None:
    """A sentence when the volume's folder lacks its packs folder."""
    if not (folder / "packs").is_dir():
        return (
            f"{folder} has no packs folder: the folder is damaged or was not "
            "copied back whole"
        )
    return None
