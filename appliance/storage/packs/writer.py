"""Writing a pack as one stream: header, instances, manifest, trailer.

Nothing is written out of order and nothing is sought back to, so a pack
can go straight to a pipe or a tape drive. Each instance is read (its
checksum checked), compressed and encrypted into a spool first, because a
tar header needs the member's size before its data; the spool stays in
memory up to 64 MiB and goes to a temporary file beyond (``spool_dir``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import zstandard

from appliance.errors import ApplianceError, PackError, SourceMismatchError
from appliance.storage import durable
from appliance.storage.keys import DataKey
from appliance.storage.packs import sealing
from appliance.storage.packs.manifest import (
    HEADER_MEMBER,
    TRAILER_MEMBER,
    TRAILER_SIZE,
    Encryption,
    InstanceMeta,
    Manifest,
    PackedInstance,
    PackHeader,
    Trailer,
    check_pack_id,
    instance_member,
    manifest_member,
)
from appliance.storage.packs.tar import (
    DEFAULT_RECORD_SIZE,
    Member,
    RecordWriter,
    member_headers,
)

logger = logging.getLogger(__name__)

DEFAULT_LEVEL = 3
# Instances smaller than this are sealed by the writing thread itself.
SEAL_AHEAD_MIN = 128 << 10
Source = Path | BinaryIO


@dataclass(frozen=True)
class PackSummary:
    """What was written: size and SHA-256 of the whole stream, every member."""

    pack_id: str
    bytes_written: int
    sha256: str
    record_size: int
    members: tuple[Member, ...]
    manifest: Manifest

    @property
    def manifest_offset(self) -> int:
        """Where the manifest member's header starts."""
        return self.members[-2].header_offset


class PackWriter:
    """Writes one pack to ``fileobj``, which need not be seekable.

    The stream, in order (every member a POSIX ustar file)::

        pack.json                       clear header: format, pack id,
                                        wrapped data key (never patient data)
        instances/000001.dcm.zst[.enc]  one zstd frame per instance,
        instances/000002.dcm.zst[.enc]  encrypted when the pack is
        ...
        manifest.json.zst[.enc]         every instance's UIDs, checksums,
                                        attributes and position
        trailer.json                    clear: where the manifest starts
        two NUL blocks, NULs to a whole record

    ``key`` (from :meth:`KeyStore.new_data_key`) encrypts the pack; without
    it the pack is compressed only. Use as a context manager, or call
    :meth:`close` to finish the pack; an exception inside the ``with``
    block leaves the stream unfinished (the caller discards it).
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        pack_id: str,
        study_uid: str | None = None,
        key: DataKey | None = None,
        level: int = DEFAULT_LEVEL,
        record_size: int = DEFAULT_RECORD_SIZE,
        spool_dir: Path | None = None,
    ) -> None:
        if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"level must be 1 to {zstandard.MAX_COMPRESSION_LEVEL}")
        self.pack_id = check_pack_id(pack_id)
        self.study_uid = study_uid
        self.level = level
        self.summary: PackSummary | None = None
        self._key = key
        self._spool_dir = spool_dir
        self._per_thread = threading.local()
        self._out = RecordWriter(fileobj, record_size)
        self._mtime = int(time.time())
        self._created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._mtime))
        self._instances: list[PackedInstance] = []
        self._members: list[Member] = []
        self._uids: set[str] = set()
        self._failed = False

        encryption = Encryption(key.master_key_id, key.wrapped) if key else None
        header = PackHeader(self.pack_id, encryption).to_bytes()
        self.header_sha256 = hashlib.sha256(header).hexdigest()
        self._write_member(HEADER_MEMBER, len(header), lambda write: write(header))

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is not None:
            self._failed = True
        elif self.summary is None:
            self.close()

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    def add(self, meta: InstanceMeta, source: Source) -> PackedInstance:
        """Compress (and encrypt) one instance read from a path or a stream.

        The source is read in chunks, its size and SHA-256 checked against
        ``meta`` before anything of it is written: on SourceMismatchError
        the pack is unchanged and other instances may still be added.
        """
        self._check_open()
        self._check_meta(meta)
        name = instance_member(len(self._instances) + 1, self.encrypted)
        return self._write_sealed(meta, name, self._seal_source(meta, source, name))

    def add_all(
        self, items: Iterable[tuple[InstanceMeta, Source]], threads: int = 2
    ) -> list[PackedInstance]:
        """Add instances in order, compressing up to ``threads`` at a time.

        Worker threads read, hash, compress and encrypt the next sources
        (zstd, SHA-256 and AES release the GIL) while this thread writes
        finished members in order. Up to twice ``threads`` instances are
        handed out ahead, so that a thread done before the oldest one is
        written finds the next at once (each held sealed until written: in
        memory up to 64 MB, beyond in a temporary file). The first error
        stops it, as :meth:`add` would: the instances before it are in the
        pack, those after it are not.
        """
        entries: list[PackedInstance] = []
        queued: deque[tuple[InstanceMeta, str, Future[sealing.Sealed]]] = deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="pack") as pool:
            try:
                for meta, source in items:
                    self._check_open()
                    self._check_meta(
                        meta, {queue[0].sop_instance_uid for queue in queued}
                    )
                    if meta.size < SEAL_AHEAD_MIN:
                        # Handing a small instance to a thread costs more
                        # than sealing it here.
                        entries += self._write_queued(queued, keep=0)
                        entries.append(self.add(meta, source))
                        continue
                    number = len(self._instances) + len(queued) + 1
                    name = instance_member(number, self.encrypted)
                    future = pool.submit(self._seal_source, meta, source, name)
                    queued.append((meta, name, future))
                    entries += self._write_queued(queued, keep=2 * threads)
                entries += self._write_queued(queued, keep=0)
            finally:
                _discard(queued)
        return entries

    def close(self) -> PackSummary:
        """Write the manifest and the trailer, end the archive; the summary."""
        self._check_open()
        manifest = Manifest(
            pack_id=self.pack_id,
            created=self._created,
            study_uid=self.study_uid,
            compression_level=self.level,
            header_sha256=self.header_sha256,
            encryption=self._encryption(),
            instances=tuple(self._instances),
        )
        name = manifest_member(self.encrypted)
        sealed = sealing.seal_bytes(
            manifest.to_bytes(), self._compressor(), self._secret, self._aad(name)
        )
        member = self._write_member(name, len(sealed), lambda write: write(sealed))

        trailer = Trailer(
            manifest_header_offset=member.header_offset,
            manifest_data_offset=member.data_offset,
            manifest_member_size=member.size,
            manifest_sha256=hashlib.sha256(sealed).hexdigest(),
            instance_count=len(self._instances),
        ).to_bytes()
        self._write_member(TRAILER_MEMBER, TRAILER_SIZE, lambda write: write(trailer))

        digest = self._out.finish()
        self.summary = PackSummary(
            pack_id=self.pack_id,
            bytes_written=self._out.offset,
            sha256=digest,
            record_size=self._out.record_size,
            members=tuple(self._members),
            manifest=manifest,
        )
        logger.info(
            "pack %s written: %d instances, %d bytes%s",
            self.pack_id,
            len(self._instances),
            self._out.offset,
            ", encrypted" if self.encrypted else "",
        )
        return self.summary

    def _check_open(self) -> None:
        if self._failed:
            raise PackError(f"pack {self.pack_id}: an earlier write failed")
        if self.summary is not None:
            raise PackError(f"pack {self.pack_id} is already closed")

    def _check_meta(self, meta: InstanceMeta, queued: Set[str] = frozenset()) -> None:
        if self.study_uid is not None and meta.study_uid != self.study_uid:
            raise ValueError(
                f"instance {meta.sop_instance_uid} belongs to study "
                f"{meta.study_uid}, not to this pack's {self.study_uid}"
            )
        uid = meta.sop_instance_uid
        if uid in self._uids or uid in queued:
            raise ValueError(f"instance {uid} is already in the pack")

    def _write_queued(
        self,
        queued: deque[tuple[InstanceMeta, str, Future[sealing.Sealed]]],
        keep: int,
    ) -> list[PackedInstance]:
        """Write queued instances, oldest first, until ``keep`` are left."""
        entries = []
        while len(queued) > keep:
            meta, name, future = queued.popleft()
            entries.append(self._write_sealed(meta, name, future.result()))
        return entries

    def _seal_source(
        self, meta: InstanceMeta, source: Source, name: str
    ) -> sealing.Sealed:
        """Read, check, compress and encrypt one instance (in any thread)."""
        try:
            if isinstance(source, Path):
                with open(source, "rb") as handle:
                    return self._seal_stream(meta, handle, name)
            return self._seal_stream(meta, source, name)
        except OSError as exc:
            raise durable.translate_os_error(
                exc, f"cannot read instance {meta.sop_instance_uid}"
            ) from exc

    def _seal_stream(
        self, meta: InstanceMeta, handle: BinaryIO, name: str
    ) -> sealing.Sealed:
        try:
            return sealing.seal_source(
                handle,
                meta.size,
                meta.sha256,
                self._compressor(),
                self._secret,
                self._aad(name),
                self._spool_dir,
            )
        except SourceMismatchError as exc:
            raise SourceMismatchError(
                f"instance {meta.sop_instance_uid}: {exc}; not packed"
            ) from exc

    def _write_sealed(
        self, meta: InstanceMeta, name: str, sealed: sealing.Sealed
    ) -> PackedInstance:
        """Write a sealed instance as the next member; its manifest entry."""
        # Names are given out in order when sealing starts; writing keeps it.
        assert name == instance_member(len(self._instances) + 1, self.encrypted)
        try:
            member = self._write_member(name, sealed.member_size, sealed.write_to)
        finally:
            sealed.close()
        entry = PackedInstance(
            meta=meta,
            member=name,
            header_offset=member.header_offset,
            data_offset=member.data_offset,
            member_size=member.size,
            compressed_size=sealed.compressed_size,
        )
        self._instances.append(entry)
        self._uids.add(meta.sop_instance_uid)
        logger.debug(
            "pack %s: %s as %s (%d -> %d bytes)",
            self.pack_id,
            meta.sop_instance_uid,
            name,
            meta.size,
            sealed.compressed_size,
        )
        return entry

    def _write_member(
        self,
        name: str,
        size: int,
        body: Callable[[Callable[[bytes | memoryview], None]], None],
    ) -> Member:
        """Header, ``body`` (which must write exactly ``size`` bytes), padding."""
        header_offset = self._out.offset
        try:
            self._out.write(member_headers(name, size, self._mtime))
            data_offset = self._out.offset
            body(self._out.write)
            if self._out.offset - data_offset != size:
                raise PackError(f"pack {self.pack_id}: {name} is not {size} bytes")
            self._out.pad_block()
        except BaseException:
            self._failed = True
            raise
        member = Member(name, size, self._mtime, header_offset, data_offset)
        self._members.append(member)
        return member

    @property
    def _secret(self) -> bytes | None:
        return self._key.secret if self._key else None

    def _aad(self, name: str) -> bytes:
        return sealing.associated_data(self.pack_id, name)

    def _compressor(self) -> zstandard.ZstdCompressor:
        """This thread's compressor: a zstd context serves one thread at a time."""
        compressor = getattr(self._per_thread, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True
            )
            self._per_thread.compressor = compressor
        return compressor

    def _encryption(self) -> Encryption | None:
        if self._key is None:
            return None
        return Encryption(self._key.master_key_id, self._key.wrapped)


def write_pack_file(
    destination: Path,
    items: Iterable[tuple[InstanceMeta, Source]],
    pack_id: str,
    study_uid: str | None = None,
    key: DataKey | None = None,
    level: int = DEFAULT_LEVEL,
    record_size: int = DEFAULT_RECORD_SIZE,
    root: Path | None = None,
    threads: int = 2,
) -> PackSummary:
    """Write a pack file durably: temp name, fsync, rename, directory fsync.

    ``root`` is the tier's root (folders up to it are created and flushed);
    ``threads`` compress ahead of the writing (:meth:`PackWriter.add_all`).
    A pack is never overwritten: PackError if ``destination`` exists. On
    any failure nothing is left under ``destination``'s name.
    """
    if destination.exists():
        raise PackError(f"{destination} already exists; packs are never overwritten")
    stop = root or destination.parent
    temp = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.partial")
    try:
        durable.make_directories(destination.parent, stop)
        with open(temp, "xb") as out, durable.flushed_ahead(out.fileno()):
            writer = PackWriter(out, pack_id, study_uid, key, level, record_size)
            writer.add_all(items, threads)
            summary = writer.close()
        durable.move_into_place(temp, destination, stop)
    except OSError as exc:
        raise durable.translate_os_error(exc, f"cannot write {destination}") from exc
    finally:
        temp.unlink(missing_ok=True)
    return summary


def _discard(queued: deque[tuple[InstanceMeta, str, Future[sealing.Sealed]]]) -> None:
    """Drop sealed instances that an error kept from being written."""
    for _, _, future in queued:
        if future.cancel():
            continue
        with contextlib.suppress(ApplianceError):
            future.result().close()
