"""Optical volumes: one ISO 9660 image per disc, grown one session per pack.

Layout under the library folder ``PATH``::

    PATH/
      LABEL.iso            a reachable volume: an ISO 9660 image (Rock Ridge,
                           MD5 of every file and session) holding
                             /VOLUME       the label (JSON: format, label,
                                           capacity, archive)
                             /packs/000001-p-000123-<sha256>.pack  (packfiles.py)
      .registry/LABEL.json every labelled volume, also those on the shelf
      .staging/            packs being received, packs being read back, and
                           LABEL.journal while a pack is being added

Each pack is added by xorriso as a new session at the end of the image.
Below the image's former end, xorriso rewrites only the first 64 KiB (to
point at the new directory tree) and the padding after the last session
(300 KiB by default), where the new session starts. The journal keeps
those two regions and the former size, so an append cut short is undone
when the library is next opened. Every pack is checked against its MD5
once added.

A volume is *reachable* while ``PATH/LABEL.iso`` exists and the label
written in it names LABEL and no other archive than this one (another
disc's image copied there, or another archive's DISC01 in place of this
one's, is not the volume, and is neither read nor written; labels written
before they named an archive name none). When it is full
or :meth:`OpticalLibrary.finalise` is called it takes no more packs and is
ready to burn (``xorriso -as cdrecord dev=/dev/sr0 LABEL.iso``); moving the
image out of ``PATH`` puts the volume on the shelf.

An image that may not be written refuses packs (VolumeReadOnly) and can
still be read. ``.staging`` must be writable: labels and packs pass through
it, so while it is not, every operation that needs it raises SpoolError
naming it, and no volume is taken for unreachable or to blame.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import (
    SpoolError,
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
    labelled_capacity,
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
from appliance.storage.volumes.xorriso import Xorriso, volume_id

logger = logging.getLogger(__name__)

LABEL_FORMAT = "pacs-appliance volume 1"
# The parts of an image xorriso rewrites below its old end, saved in the
# journal before each append: system area and volume descriptors at the
# start; the last session's padding at the end (measured: the new session
# starts 288 KiB before the old end with xorriso's default 300 KiB padding).
HEAD_SIZE = 64 * 1024
TAIL_SIZE = 1024 * 1024
# Room a new session needs besides the pack's data: alignment to 32
# blocks, the rewritten directory tree and checksum tags (measured: 64 to
# 80 KiB with few packs), plus room for the tree's growth per pack.
SESSION_OVERHEAD = 128 * 1024
TREE_BYTES_PER_PACK = 512
_JOURNAL = struct.Struct(">QQQ")  # old size, head length, tail offset
# The ISO 9660 primary volume descriptor (sector 16): its volume id and
# times tell one image from another; xorriso rewrites it on each append.
_DESCRIPTOR_OFFSET = 16 * 2048
_DESCRIPTOR_SIZE = 2048
# What _problem says of a volume whose image is simply not there.
_ABSENT = "absent"


class OpticalLibrary(VolumeLibrary):
    """ISO 9660 images, one per optical disc, in one library folder."""

    kind = "optical"

    def __init__(
        self,
        path: Path,
        xorriso: Xorriso | None = None,
        recover: bool = True,
        archive: ArchiveSource = "",
    ) -> None:
        self.path = path
        self.archive_source = archive
        self.staging = path / ".staging"
        self.xorriso = xorriso or Xorriso()
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {path}") from exc
        self.registry = Registry(path / ".registry")
        # The label fields last read from each image, with what identified
        # the image then (its file's identity and times, its volume
        # descriptor): read again only when the file is another or changed.
        self._labels: dict[str, tuple[tuple[int, ...], bytes, dict[str, Any]]] = {}
        # Only the writer (the holder of the migration lock) may undo an
        # append a crash cut short: a reader could undo one in progress.
        if recover:
            self._recover()

    def list_volumes(self) -> list[VolumeInfo]:
        for image in self.path.glob("*.iso"):
            if not is_label(image.stem) or self.registry.get(image.stem):
                continue
            try:
                self._adopt(image)
            except VolumeError as exc:
                # A stray image (another disc's copy under a new name, say)
                # must not stop every other volume from being used.
                logger.warning("optical volumes: %s; image ignored", exc)
        return [self._info(self._record(label)) for label in self.registry.labels()]

    def label(self, volume: str, capacity: int) -> VolumeInfo:
        check_label(volume)
        check_capacity(capacity)
        self.registry.refuse_twin(volume)
        self._check_staging()
        image = self._image_path(volume)
        if self.registry.get(volume) or image.exists():
            raise VolumeError(f"volume {volume} is already labelled")

        label_file = self.staging / f"{secrets.token_hex(8)}.label"
        new_image = self.staging / f"{volume}.iso.new"
        try:
            fields = {"format": LABEL_FORMAT, **self.label_fields(volume, capacity)}
            label_file.write_text(json.dumps(fields))
            new_image.unlink(missing_ok=True)
            self.xorriso.create(new_image, volume_id(volume), {"/VOLUME": label_file})
            if new_image.stat().st_size > capacity:
                raise VolumeError(f"capacity {capacity} is too small for an image")
            durable.move_into_place(new_image, image, self.path)
        finally:
            label_file.unlink(missing_ok=True)
            new_image.unlink(missing_ok=True)

        record = VolumeRecord(volume, capacity, used=image.stat().st_size)
        self.registry.save(record)
        logger.info("optical volume %s labelled, %d bytes", volume, capacity)
        return self._info(record)

    def is_reachable(self, volume: str) -> bool:
        return self._problem(check_label(volume)) is None

    def check_reachable(self, volume: str) -> None:
        self._image(volume)

    def free_bytes(self, volume: str) -> int:
        record = self._record(volume)
        if record.full or not self.is_reachable(volume):
            return self._info(record).free
        return self._room(record, len(self.list_packs(volume)))

    def write_pack(
        self, volume: str, pack_id: str, chunks: Iterable[bytes]
    ) -> PackLocation:
        check_pack_id(pack_id)
        self._check_staging()
        image = self._image(volume)
        record = self._record(volume)
        if record.full:
            raise VolumeFull(f"volume {volume} is full (finalised); it takes no packs")
        packs = self.list_packs(volume)
        position = packs[-1].position + 1 if packs else 1

        temporary = self.staging / f"{secrets.token_hex(8)}.part"
        try:
            size, sha256 = self._receive(chunks, temporary, record, len(packs))
            iso_path = f"/packs/{pack_file_name(position, pack_id, sha256)}"
            self._append(record, image, iso_path, temporary)
        finally:
            temporary.unlink(missing_ok=True)

        record.used = image.stat().st_size
        self.registry.save(record)
        logger.info(
            "pack %s written to optical volume %s at position %d, %d bytes",
            pack_id,
            volume,
            position,
            size,
        )
        return PackLocation(volume, position, pack_id, size, sha256)

    def read_pack(self, location: PackLocation, check: bool = True) -> Iterator[bytes]:
        image = self._image(location.volume)
        # Checked now, not when the first chunk is asked for.
        self._check_staging()
        name = pack_file_name(location.position, location.pack_id, location.sha256)
        if name not in self.xorriso.list_files(image, "/packs"):
            raise VolumeError(
                f"volume {location.volume} holds no pack {location.pack_id} at "
                f"position {location.position}"
            )
        chunks = self._extracted(image, f"/packs/{name}")
        return verified_stream(location, chunks) if check else chunks

    def list_packs(self, volume: str) -> list[PackLocation]:
        image = self._image(volume)
        found = []
        for name, size in self.xorriso.list_files(image, "/packs").items():
            location = location_from_name(volume, name, size)
            if location is not None:
                found.append(location)
        return sorted(found, key=lambda location: location.position)

    def archive_named(self, volume: str) -> str:
        image = self._image(volume)
        return str(self._label_of(volume, image).get("archive") or "")

    def finalise(self, volume: str) -> None:
        """Take no more packs on ``volume``; check every MD5; ready to burn."""
        image = self._image(volume)
        record = self._record(volume)
        self.xorriso.verify_all(image)
        record.full = True
        self.registry.save(record)
        logger.info("optical volume %s finalised: %s is ready to burn", volume, image)

    def _receive(
        self, chunks: Iterable[bytes], temporary: Path, record: VolumeRecord, packs: int
    ) -> tuple[int, str]:
        """Stage the pack's bytes; a pack that cannot fit finalises the volume."""
        try:
            with open(temporary, "wb") as handle:
                return receive(chunks, handle, self._room(record, packs), record.label)
        except VolumeFull:
            self._mark_full(record)
            raise
        except OSError as exc:
            raise durable.translate_os_error(exc, "cannot stage a pack") from exc

    def _append(
        self, record: VolumeRecord, image: Path, iso_path: str, source: Path
    ) -> None:
        """Add one file to the image as a new session, undoably."""
        journal = self._journal_path(record.label)
        old_size = image.stat().st_size
        tail_offset = max(0, old_size - TAIL_SIZE)
        # Opened for writing, though only read here: an image that may not
        # be written refuses now, before anything is journaled or appended
        # (xorriso would fail in words, and the undo could not write).
        with self._open_for_append(image, record.label) as handle:
            head = handle.read(HEAD_SIZE)
            handle.seek(tail_offset)
            tail = handle.read()
        saved = _JOURNAL.pack(old_size, len(head), tail_offset) + head + tail
        write_atomically(journal, saved, self.path)

        try:
            self.xorriso.append(image, {iso_path: source})
            durable.fsync_file(image)
            if image.stat().st_size > record.capacity:
                raise VolumeFull(
                    f"volume {record.label} is full: the pack does not fit in "
                    f"its capacity of {record.capacity} bytes"
                )
            self.xorriso.verify(image, iso_path)
        except BaseException as exc:
            self._roll_back(record.label)
            if isinstance(exc, VolumeFull):
                self._mark_full(record)
            raise
        self._drop_journal(journal)

    def _open_for_append(self, image: Path, volume: str) -> BinaryIO:
        """``image`` open for reading and writing; VolumeReadOnly if it
        may not be written (a read-only mount, no write permission)."""
        try:
            return open(image, "r+b")
        except OSError as exc:
            refused = refused_writes(exc, volume)
            if refused is not None:
                raise refused from exc
            raise VolumeError(f"cannot write to volume {volume}: {exc}") from exc

    def _roll_back(self, volume: str) -> None:
        """Undo an append that did not finish: old head and tail, old size."""
        journal = self._journal_path(volume)
        saved = journal.read_bytes()
        old_size, head_length, tail_offset = _JOURNAL.unpack_from(saved)
        head_end = _JOURNAL.size + head_length
        image = self._image_path(volume)
        with open(image, "r+b") as handle:
            handle.write(saved[_JOURNAL.size : head_end])
            handle.seek(tail_offset)
            handle.write(saved[head_end:])
            handle.truncate(old_size)
            os.fsync(handle.fileno())
        self._drop_journal(journal)
        logger.warning("optical volume %s: unfinished append undone", volume)

    def _drop_journal(self, journal: Path) -> None:
        journal.unlink()
        durable.fsync_directory(journal.parent)

    def _extracted(self, image: Path, iso_path: str) -> Iterator[bytes]:
        """A pack copied out of the image (MD5 checked), then streamed."""
        destination = self.staging / f"{secrets.token_hex(8)}.out"
        try:
            self.xorriso.extract(image, iso_path, destination)
            yield from stream_file(destination)
        finally:
            destination.unlink(missing_ok=True)

    def _mark_full(self, record: VolumeRecord) -> None:
        record.full = True
        self.registry.save(record)
        logger.warning(
            "optical volume %s is full; it takes no more packs", record.label
        )

    def _room(self, record: VolumeRecord, packs: int) -> int:
        """Bytes of pack data a new session on the volume can still hold."""
        size = self._image_path(record.label).stat().st_size
        overhead = SESSION_OVERHEAD + TREE_BYTES_PER_PACK * (packs + 1)
        return max(0, record.capacity - size - overhead)

    def _image(self, volume: str) -> Path:
        """The image of a reachable volume; VolumeNotReachable if shelved
        or if the image there is not this volume's."""
        self._record(volume)
        image = self._image_path(volume)
        problem = self._problem(volume)
        if problem == _ABSENT:
            raise VolumeNotReachable(
                f"volume {volume} is on the shelf: put its image back as {image}"
            )
        if problem:
            raise VolumeNotReachable(f"volume {volume} cannot be used: {problem}")
        return image

    def _problem(self, volume: str) -> str | None:
        """Why the image under ``volume``'s name cannot serve as that volume
        now: _ABSENT when there is none (on the shelf), a sentence when it
        is there but wrong; None when it is ready.

        The image is whatever a person last copied there (from a disc, with
        dd): the label written in it when it was made must name ``volume``,
        or another disc's image would be read as this one, its packs taken
        for missing ones, and this volume's packs written to it. So must the
        archive it names (another archive may have a DISC01 too)."""
        image = self._image_path(volume)
        try:
            fields = self._label_of(volume, image)
        except FileNotFoundError:
            return _ABSENT
        except OSError as exc:
            return f"{image} cannot be read: {exc.strerror or exc}"
        except VolumeError as exc:
            return str(exc)
        named = fields.get("label")
        if named != volume:
            return (
                f"{image} holds volume {named}, not {volume}: put that image "
                f"back as {named}.iso and {volume}'s image here"
            )
        theirs = self.other_archive(fields)
        if theirs is not None:
            return another_archives(str(image), volume, theirs, self.archive())
        return None

    def _label_of(self, volume: str, image: Path) -> dict[str, Any]:
        """The label fields written in ``image``; read again only when the
        file is not the one last read (a person replaced it) or has
        changed."""
        with open(image, "rb") as handle:
            identity = os.fstat(handle.fileno())
            handle.seek(_DESCRIPTOR_OFFSET)
            descriptor = handle.read(_DESCRIPTOR_SIZE)
        key = (
            identity.st_dev,
            identity.st_ino,
            identity.st_size,
            identity.st_mtime_ns,
            identity.st_ctime_ns,
        )
        known = self._labels.get(volume)
        if known is not None and known[0] == key and known[1] == descriptor:
            return known[2]
        fields = self._label_fields(image)
        self._labels[volume] = (key, descriptor, fields)
        return fields

    def _label_fields(self, image: Path) -> dict[str, Any]:
        """The label file written in ``image`` when it was labelled."""
        self._check_staging()
        label_copy = self.staging / f"{secrets.token_hex(8)}.label"
        try:
            self.xorriso.extract(image, "/VOLUME", label_copy)
            fields = json.loads(label_copy.read_text())
        except (OSError, ValueError, VolumeError) as exc:
            raise VolumeError(f"label of {image} is unreadable: {exc}") from exc
        finally:
            label_copy.unlink(missing_ok=True)
        if not isinstance(fields, dict) or fields.get("format") != LABEL_FORMAT:
            raise VolumeError(f"{image} holds no volume label of this appliance")
        return fields

    def _check_staging(self) -> None:
        """SpoolError naming ``.staging`` when it may not be written: every
        label and pack is copied through it, so no volume can be read or
        written now, and none is at fault (xorriso and the clean-up would
        fail with words about the image instead)."""
        if os.access(self.staging, os.W_OK | os.X_OK):
            return

        where = f"the optical library's staging folder {self.staging}"
        if os.statvfs(self.staging).f_flag & os.ST_RDONLY:
            problem = "is on a file system mounted read only"
            remedy = "remount it read-write"
        else:
            problem = "may not be written by this user"
            remedy = (
                "give the appliance's user write permission on it (and clear "
                "an immutable flag: chattr -i)"
            )
        raise SpoolError(
            f"{where} {problem}: labels and packs pass through it, so no "
            f"optical volume can be read or written (the volumes are not at "
            f"fault); {remedy}"
        )

    def _image_path(self, volume: str) -> Path:
        return self.path / f"{volume}.iso"

    def _journal_path(self, volume: str) -> Path:
        return self.staging / f"{volume}.journal"

    def _record(self, volume: str) -> VolumeRecord:
        record = self.registry.get(check_label(volume))
        if record is None:
            self.registry.refuse_twin(volume)
        if record is None and self._image_path(volume).is_file():
            record = self._adopt(self._image_path(volume))
        if record is None:
            raise VolumeError(f"no volume labelled {volume} is known; label it first")
        return record

    def _adopt(self, image: Path) -> VolumeRecord:
        """Register an image labelled elsewhere (another appliance)."""
        fields = self._label_fields(image)
        if fields.get("label") != image.stem:
            raise VolumeError(f"{image} does not hold a volume labelled {image.stem}")
        theirs = self.other_archive(fields)
        if theirs is not None:
            raise VolumeError(
                another_archives(str(image), image.stem, theirs, self.archive())
            )

        record = VolumeRecord(image.stem, labelled_capacity(fields, str(image)))
        record.used = image.stat().st_size
        self.registry.save(record)
        logger.info("optical volume %s found and registered", image.stem)
        return record

    def _info(self, record: VolumeRecord) -> VolumeInfo:
        image = self._image_path(record.label)
        problem = self._problem(record.label)
        if problem not in (None, _ABSENT):
            logger.warning(
                "optical volume %s cannot be used: %s", record.label, problem
            )
        if problem is not None:
            return VolumeInfo(
                record.label, record.capacity, record.used, False, record.full
            )

        # As _open_for_append would find it, without opening it to write:
        # access() says no for a read-only mount, no write permission and
        # an immutable image.
        read_only = not os.access(image, os.W_OK)
        used = image.stat().st_size
        return VolumeInfo(
            record.label, record.capacity, used, True, record.full, read_only
        )

    def _recover(self) -> None:
        """Undo appends a crash interrupted; drop leftover staged files."""
        if any(self.staging.iterdir()):
            self._check_staging()
        for journal in self.staging.glob("*.journal"):
            self._roll_back(journal.stem)
        for leftover in self.staging.iterdir():
            if leftover.suffix in (".part", ".out", ".label", ".new"):
                leftover.unlink(missing_ok=True)
