"""Tape volumes: one drive, and optionally a changer that loads cartridges.

A volume's label is its cartridge's barcode, also written on the tape as
file 0 (tapeformat.py draws the layout) with the id of the archive that
labelled it: a tape of another archive with the same barcode is not the
volume (tapes labelled before labels named an archive name none). A
volume is *reachable* when the changer holds its cartridge in a slot or a
drive (without a changer: when it is the tape in the drive) and *on the
shelf* otherwise.

Packs are appended at end of data, one tape file each, and read back in
full before they count. Listing a tape means reading all of it, so the
registry (registry.py) remembers every pack written and :meth:`scan`
rebuilds that memory from a tape written elsewhere. A tape that reported
itself full (or reached its labelled capacity) takes no more packs.

One stream uses the drive at a time; a read must be consumed to its end
(or closed) before the next operation.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from appliance.errors import (
    VolumeError,
    VolumeFull,
    VolumeNotReachable,
    VolumeReadOnly,
)
from appliance.storage import durable
from appliance.storage.volumes import tapeformat
from appliance.storage.volumes.base import (
    ArchiveSource,
    PackLocation,
    VolumeInfo,
    VolumeLibrary,
    another_archives,
    check_capacity,
    check_label,
    check_pack_id,
    labelled_capacity,
    verified_stream,
)
from appliance.storage.volumes.registry import Registry, VolumeRecord
from appliance.storage.volumes.tapedevices import Changer, TapeDrive, TapeHandle
from appliance.storage.volumes.tapeformat import (
    HEADER_MAGIC,
    LABEL_MAGIC,
    TRAILER_MAGIC,
    PackDigest,
    from_records,
    make_record,
    read_record,
    to_records,
)

logger = logging.getLogger(__name__)

# Records are read with a buffer at least this big, so that tapes written
# with a larger record size than ours still read (variable block mode).
MIN_READ_SIZE = 1 << 20


class TapeLibrary(VolumeLibrary):
    """Tape cartridges used through one drive and an optional changer."""

    kind = "tape"

    def __init__(
        self,
        drive: TapeDrive,
        changer: Changer | None,
        state_path: Path,
        drive_number: int = 0,
        record_size: int = tapeformat.DEFAULT_RECORD_SIZE,
        load_timeout: float = 300.0,
        archive: ArchiveSource = "",
    ) -> None:
        self.archive_source = archive
        self.drive = drive
        self.changer = changer
        self.drive_number = drive_number
        self.record_size = record_size
        self.read_size = max(record_size, MIN_READ_SIZE)
        self.load_timeout = load_timeout
        try:
            state_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {state_path}") from exc
        self.registry = Registry(state_path / "registry")
        # The label last read from the tape now in the drive; forgotten
        # whenever the changer moves a cartridge.
        self._checked: str | None = None

    def list_volumes(self) -> list[VolumeInfo]:
        present, loaded = self._look()
        protected = self._write_protected(loaded)
        return [
            self._info(record, present(record.label), protected.get(record.label))
            for record in map(self._record, self.registry.labels())
        ]

    def label(self, volume: str, capacity: int) -> VolumeInfo:
        check_label(volume)
        check_capacity(capacity)
        self.registry.refuse_twin(volume)
        if self.registry.get(volume):
            raise VolumeError(f"volume {volume} is already labelled")

        self._mount(volume, check=False)
        self._refuse_used_tape(volume)
        fields = {
            **self.label_fields(volume, capacity),
            "record_size": self.record_size,
        }
        label = make_record(LABEL_MAGIC, fields, self.record_size)
        self.drive.rewind()
        self._write_file([label], volume)
        if self._read_label() != volume:
            raise VolumeError(f"the label written on {volume} does not read back")

        record = VolumeRecord(label=volume, capacity=capacity, used=len(label))
        self.registry.save(record)
        self._checked = volume
        logger.info("tape volume %s labelled, %d bytes", volume, capacity)
        return self._info(record, True)

    def is_reachable(self, volume: str) -> bool:
        return self._present()(check_label(volume))

    def free_bytes(self, volume: str) -> int:
        return self._info(self._record(volume), False).free

    def write_pack(
        self, volume: str, pack_id: str, chunks: Iterable[bytes]
    ) -> PackLocation:
        check_pack_id(pack_id)
        record = self._record(volume)
        if record.full:
            raise VolumeFull(f"volume {volume} is full; it takes no more packs")
        self._mount(volume)
        if self.drive.status().write_protected:
            # Asked before the drive moves: the pack goes to another volume.
            raise VolumeReadOnly(
                f"cannot write to volume {volume}: its cartridge is write protected"
            )

        self.drive.eod()
        position = self.drive.status().file_number
        if position < 1:
            raise VolumeError(
                f"tape drive {self.drive.name} cannot tell its file number at end "
                "of data (turn off the st option fast-eod)"
            )
        digest = PackDigest()
        writer = _PackWriter(self, record, pack_id, digest)
        try:
            self._write_file(writer.records(chunks), volume)
        except VolumeFull:
            # What was written stays on tape as a file without a trailer,
            # which no reader takes for a pack.
            record.full = True
            logger.warning(
                "tape volume %s is full; pack %s not written", volume, pack_id
            )
            raise
        finally:
            record.used += writer.written
            self.registry.save(record)

        location = PackLocation(
            volume, position, pack_id, digest.size, digest.hexdigest()
        )
        self._verify(location)
        record.packs.append(location)
        self.registry.save(record)
        logger.info(
            "pack %s written to tape volume %s as file %d, %d bytes",
            pack_id,
            volume,
            position,
            digest.size,
        )
        return location

    def read_pack(self, location: PackLocation, check: bool = True) -> Iterator[bytes]:
        self._record(location.volume)
        self._mount(location.volume)
        chunks = self._pack_data(location)
        return verified_stream(location, chunks) if check else chunks

    def list_packs(self, volume: str) -> list[PackLocation]:
        record = self._record(volume)
        if not self.is_reachable(volume):
            raise self._not_reachable(volume)
        return list(record.packs)

    def archive_named(self, volume: str) -> str:
        self._record(volume)
        self._mount(volume)
        return str((self._read_fields() or {}).get("archive") or "")

    def load(self, volume: str) -> None:
        """Put ``volume`` into the drive now (the changer does it when needed)."""
        self._record(volume)
        self._mount(volume)

    def unload(self) -> None:
        """Eject the tape in the drive and return it to a slot."""
        if self.changer is None:
            self.drive.eject()
        else:
            self._unload_drive()

    def scan(self, volume: str) -> list[PackLocation]:
        """Read a whole tape and register it with every complete pack on it.

        For tapes written by another appliance (disaster recovery); takes as
        long as reading the tape.
        """
        self.registry.refuse_twin(check_label(volume))
        self._mount(volume, check=False)
        fields = self._label_fields()
        if fields is None or fields.get("label") != volume:
            raise VolumeError(f"the tape with barcode {volume} has no volume label")
        theirs = self.other_archive(fields)
        if theirs is not None:
            where = f"the tape with barcode {volume}"
            raise VolumeError(another_archives(where, volume, theirs, self.archive()))

        capacity = labelled_capacity(fields, f"the tape with barcode {volume}")
        record = VolumeRecord(volume, capacity, used=self.record_size)
        self.drive.asf(1)
        position = 1
        while (found := self._scan_file(volume, position, record)) is not None:
            if isinstance(found, PackLocation):
                record.packs.append(found)
            position += 1
        self.registry.save(record)
        self._checked = volume
        logger.info("tape volume %s scanned: %d packs", volume, len(record.packs))
        return record.packs

    def _write_file(self, records: Iterable[bytes], volume: str) -> None:
        """Write records as one tape file (closing writes its filemark)."""
        handle = self.drive.open("w")
        try:
            for record in records:
                self._put(handle, record, volume)
        finally:
            handle.close()

    @staticmethod
    def _put(handle: TapeHandle, record: bytes, volume: str) -> None:
        try:
            handle.write(record)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise VolumeFull(f"volume {volume} is full: end of tape") from exc
            raise VolumeError(f"cannot write to volume {volume}: {exc}") from exc

    def _verify(self, location: PackLocation) -> None:
        """Read a pack just written back from the tape; VolumeError if it differs."""
        for _ in verified_stream(location, self._pack_data(location)):
            pass

    def _pack_data(self, location: PackLocation) -> Iterator[bytes]:
        """The pack's bytes from its tape file (header checked, padding cut)."""
        where = f"volume {location.volume} file {location.position}"
        self.drive.asf(location.position)
        handle = self.drive.open("r")
        try:
            header = read_record(self._read(handle, where), HEADER_MAGIC)
            if header is None or header.get("pack_id") != location.pack_id:
                raise VolumeError(f"{where} does not hold pack {location.pack_id}")
            yield from from_records(self._records(handle, where), where)
        finally:
            handle.close()

    def _records(self, handle: TapeHandle, where: str) -> Iterator[bytes]:
        """The records up to the next filemark."""
        while record := self._read(handle, where):
            yield record

    def _read(self, handle: TapeHandle, where: str) -> bytes:
        try:
            return handle.read(self.read_size)
        except OSError as exc:
            raise VolumeError(f"cannot read {where}: {exc.strerror or exc}") from exc

    def _scan_file(
        self, volume: str, position: int, record: VolumeRecord
    ) -> PackLocation | bool | None:
        """The pack in the tape file under the head: its location, False if
        it is not a sound pack, None at end of data. Counts the file's bytes
        into ``record.used`` and leaves the head at the next file."""
        where = f"volume {volume} file {position}"
        handle = self.drive.open("r")
        try:
            try:
                first = handle.read(self.read_size)
            except OSError:
                return None  # blank tape after the last filemark: end of data
            if not first:
                return None
            record.used += len(first)
            records = self._counted(self._records(handle, where), record)
            return self._scan_pack(first, records, volume, position, where)
        finally:
            handle.close()

    def _scan_pack(
        self,
        first: bytes,
        records: Iterator[bytes],
        volume: str,
        position: int,
        where: str,
    ) -> PackLocation | bool:
        header = read_record(first, HEADER_MAGIC)
        trailer: dict[str, Any] = {}
        digest = PackDigest()
        try:
            for chunk in from_records(records, where, trailer):
                digest.update(chunk)
        except VolumeError as exc:
            logger.warning("tape scan: %s; skipped", exc)
            return False

        if header is None or trailer.get("sha256") != digest.hexdigest():
            logger.warning("tape scan: %s is not a sound pack; skipped", where)
            return False
        return PackLocation(
            volume, position, str(header["pack_id"]), digest.size, digest.hexdigest()
        )

    @staticmethod
    def _counted(records: Iterator[bytes], record: VolumeRecord) -> Iterator[bytes]:
        for data in records:
            record.used += len(data)
            yield data

    def _mount(self, volume: str, check: bool = True) -> None:
        """Get ``volume`` into the drive, online; check its label unless told not."""
        if self.changer is not None:
            self._load_with_changer(volume)
        elif self.drive.status().online:
            # A person may have swapped the tape since the last look.
            self._checked = None
        else:
            raise self._not_reachable(volume)
        if not check or self._checked == volume:
            return

        fields = self._read_fields()
        found = None if fields is None else str(fields.get("label"))
        if found != volume and self.changer is None:
            inside = f"volume {found}" if found else "a tape with no volume label"
            raise VolumeNotReachable(
                f"volume {volume} is on the shelf: tape drive {self.drive.name} "
                f"holds {inside}, not {volume}; take it out and put {volume} in"
            )
        if found != volume:
            # Another volume under this one's barcode: this volume is still
            # to be fetched, and its packs are not to blame.
            raise VolumeNotReachable(
                f"the cartridge with barcode {volume} is labelled {found!r} on "
                "tape; check its barcode sticker"
            )
        self._refuse_other_archive(volume, fields or {})
        self._checked = volume

    def _refuse_other_archive(self, volume: str, fields: dict[str, Any]) -> None:
        """VolumeNotReachable when the tape in the drive, labelled
        ``volume``, is another archive's: this volume is still to be
        fetched, and that tape is neither read nor written."""
        theirs = self.other_archive(fields)
        if theirs is None:
            return
        where = f"tape drive {self.drive.name}"
        if self.changer is not None:
            where = f"the cartridge with barcode {volume} (in {where})"
        raise VolumeNotReachable(
            another_archives(where, volume, theirs, self.archive())
        )

    def _load_with_changer(self, volume: str) -> None:
        assert self.changer is not None
        status = self.changer.status()
        if status.drive(self.drive_number).barcode == volume:
            self.drive.wait_ready(self.load_timeout)
            return
        slot = status.slot_of(volume)
        if slot is None:
            raise self._not_reachable(volume)

        if status.drive(self.drive_number).full:
            self._unload_drive()
        self._checked = None
        self.changer.load(slot.number, self.drive_number)
        self.drive.wait_ready(self.load_timeout)
        logger.info("tape volume %s loaded from slot %d", volume, slot.number)

    def _unload_drive(self) -> None:
        assert self.changer is not None
        status = self.changer.status()
        bay = status.drive(self.drive_number)
        if not bay.full:
            return
        slot = status.empty_slot(preferred=bay.source_slot)
        if slot is None:
            raise VolumeError("the changer has no empty slot to unload the drive to")

        # Many libraries cannot pull a tape the drive still holds threaded.
        self.drive.eject()
        self.changer.unload(slot.number, self.drive_number)
        self._checked = None
        logger.info("tape volume %s unloaded to slot %d", bay.barcode, slot.number)

    def _read_label(self) -> str | None:
        """The label on the tape in the drive, or None if it has none."""
        fields = self._read_fields()
        return None if fields is None else str(fields.get("label"))

    def _read_fields(self) -> dict[str, Any] | None:
        """The label fields on the tape in the drive, or None if it has none."""
        self.drive.wait_ready(self.load_timeout)
        return self._label_fields()

    def _label_fields(self) -> dict[str, Any] | None:
        first = self._first_record()
        return read_record(first, LABEL_MAGIC) if first else None

    def _first_record(self) -> bytes | None:
        """The tape's first record; None for a blank tape."""
        self.drive.rewind()
        handle = self.drive.open("r")
        try:
            return handle.read(self.read_size)
        except OSError:
            return None  # a blank tape reads as end of data at once
        finally:
            handle.close()

    def _refuse_used_tape(self, volume: str) -> None:
        """Never label over data: a tape from the vault may be an archive."""
        if self._first_record():
            raise VolumeError(
                f"the tape with barcode {volume} already holds data; this "
                "appliance labels blank tapes only (use scan for its own tapes)"
            )

    def _present(self) -> Callable[[str], bool]:
        """A test ``label -> reachable`` from one look at the changer or drive."""
        return self._look()[0]

    def _look(self) -> tuple[Callable[[str], bool], str | None]:
        """From one look at the changer or drive: a test ``label ->
        reachable``, and the label of the cartridge in this library's
        drive (its barcode with a changer), None for none."""
        if self.changer is not None:
            status = self.changer.status()
            try:
                loaded = status.drive(self.drive_number).barcode
            except VolumeError:
                loaded = None

            def present(label: str) -> bool:
                return bool(status.slot_of(label) or status.drive_of(label))

            return present, loaded
        try:
            fields = self._read_fields() if self.drive.status().online else None
        except VolumeError:
            fields = None
        if fields is None or self.other_archive(fields) is not None:
            return lambda label: False, None
        in_drive = str(fields.get("label"))
        return lambda label: label == in_drive, in_drive

    def _write_protected(self, loaded: str | None) -> dict[str, bool]:
        """``{label: write protected}`` for the cartridge in the drive, as
        the drive reports its tab (WR_PROT); empty when the drive holds
        none or cannot say now (busy with another stream). The changer
        does not report tabs, and no cartridge is loaded to find out."""
        if loaded is None:
            return {}
        try:
            status = self.drive.status()
        except VolumeError:
            return {}
        return {loaded: status.write_protected} if status.online else {}

    def _record(self, volume: str) -> VolumeRecord:
        record = self.registry.get(check_label(volume))
        if record is None:
            self.registry.refuse_twin(volume)
            raise VolumeError(
                f"no volume labelled {volume} is known; label it (blank tape) or "
                "scan it (a tape written by an appliance)"
            )
        return record

    def _info(
        self, record: VolumeRecord, reachable: bool, read_only: bool | None = None
    ) -> VolumeInfo:
        return VolumeInfo(
            record.label,
            record.capacity,
            record.used,
            reachable,
            record.full,
            read_only if reachable else None,
        )

    def _not_reachable(self, volume: str) -> VolumeNotReachable:
        if self.changer is None:
            where = f"in tape drive {self.drive.name}"
        else:
            where = "into the changer's import/export slot"
        return VolumeNotReachable(
            f"volume {volume} is on the shelf; fetch it and put it {where}"
        )


class _PackWriter:
    """The records of one pack's tape file, within the volume's capacity."""

    def __init__(
        self,
        library: TapeLibrary,
        record: VolumeRecord,
        pack_id: str,
        digest: PackDigest,
    ) -> None:
        self.library = library
        self.record = record
        self.pack_id = pack_id
        self.digest = digest
        self.written = 0

    def records(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Header, data records, trailer; VolumeFull past the capacity."""
        size = self.library.record_size
        header = {"pack_id": self.pack_id, "volume": self.record.label}
        yield self._counted(make_record(HEADER_MAGIC, header, size))
        for data in to_records(chunks, size, self.digest):
            yield self._counted(data)

        trailer = {
            "pack_id": self.pack_id,
            "size": self.digest.size,
            "sha256": self.digest.hexdigest(),
        }
        yield self._counted(make_record(TRAILER_MAGIC, trailer, size))

    def _counted(self, data: bytes) -> bytes:
        # Count the record as written before it is: a failed write may
        # still have used tape, and a full tape is not written again anyway.
        if self.record.used + self.written + len(data) > self.record.capacity:
            raise VolumeFull(
                f"volume {self.record.label} is full: its capacity of "
                f"{self.record.capacity} bytes is reached"
            )
        self.written += len(data)
        return data
