"""Reading a pack: its manifest, one instance, or everything in order.

Where the manifest is found depends on the source:

* a file (seekable): the trailer, the last member before the closing NULs,
  gives the manifest's offset, so the manifest costs a few reads whatever
  the pack's size, and a recall then reads one member. If the trailer is
  damaged, the reader walks the tar headers from the start instead (one
  read per member, data skipped) and logs a warning.
* a stream (tape, pipe, download): the manifest comes after the instances
  because the writer only knows it at the end, so reaching it means
  reading the whole pack. :meth:`PackReader.read_all` decodes and checks
  every instance on the way and matches them with the manifest at the end;
  :meth:`PackReader.manifest` skips the instances' data without decoding.

Nothing read is trusted until its checks pass: GCM tag (encrypted packs),
zstd frame and checksum, then size and SHA-256 against the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from appliance.errors import (
    DamagedPackError,
    KeyStoreError,
    MissingKeyError,
    PackError,
)
from appliance.storage import durable
from appliance.storage.keys import KeyStore
from appliance.storage.packs import sealing
from appliance.storage.packs.manifest import (
    HEADER_MEMBER,
    INSTANCE_FOLDER,
    TRAILER_MEMBER,
    TRAILER_SIZE,
    Manifest,
    PackedInstance,
    PackHeader,
    Trailer,
    VersionError,
    manifest_member,
)
from appliance.storage.packs.report import Seen, VerifyReport, compare, reconcile
from appliance.storage.packs.tar import (
    BLOCK,
    MAX_RECORD_SIZE,
    BlockReader,
    Member,
    TarFormatError,
    padding,
)

logger = logging.getLogger(__name__)

Sink = Callable[[str], BinaryIO]
MAX_HEADER_BYTES = 64 << 10
MAX_MANIFEST_BYTES = 1 << 30
_TAIL_CHUNK = 64 << 10
_MAX_TAIL = MAX_RECORD_SIZE + 3 * BLOCK
_UNKNOWN = "(unknown)"
# Members of this size range are read whole and decoded in a worker thread;
# smaller ones cost less to decode than to hand over, larger ones stream.
_DECODE_AHEAD_MIN = 128 << 10
_DECODE_AHEAD_MAX = 8 << 20

_Decoded = tuple[sealing.Opened | None, str | None]


class PackReader:
    """Reads one pack from a binary file or stream positioned at its start.

    ``keys`` is needed for encrypted packs. The clear header is read at
    once: a damaged header, or a master key the store lacks, fails here.
    """

    def __init__(self, source: BinaryIO, keys: KeyStore | None = None) -> None:
        self._input = BlockReader(source)
        self._keys = keys
        self._owned: BinaryIO | None = None
        self._manifest: Manifest | None = None
        self._streamed = False
        # Held while the source is read (it has one position).
        self._lock = threading.Lock()
        self.pack_id = _UNKNOWN
        self.header, self.header_sha256 = self._read_header()
        self.pack_id = self.header.pack_id
        self._header_end = self._input.offset
        self._secret = self._data_key()

    @classmethod
    def open(cls, path: Path, keys: KeyStore | None = None) -> PackReader:
        """A reader of the pack file at ``path``; close it (or use ``with``)."""
        try:
            # The reader owns the file from here on and closes it.
            handle = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {path}") from exc
        try:
            reader = cls(handle, keys)
        except BaseException:
            handle.close()
            raise
        reader._owned = handle
        return reader

    def close(self) -> None:
        """Close the file :meth:`open` opened (a given stream is left open)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> PackReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def encrypted(self) -> bool:
        return self.header.encryption is not None

    def manifest(self) -> Manifest:
        """The pack's manifest, checked (see the module for how it is found)."""
        found = self._manifest
        if found is not None:
            # Once read it never changes: threads extracting at once look
            # their instances up in it without waiting for the one reading.
            return found
        with self._lock:
            return self._manifest_now()

    def _manifest_now(self) -> Manifest:
        if self._manifest is None:
            if self._input.seekable:
                self._manifest = self._locate_manifest()
            else:
                self._manifest = self._skip_to_manifest()
        return self._manifest

    def extract(self, instance: str | PackedInstance, out: BinaryIO) -> PackedInstance:
        """Write one instance's stored bytes to ``out`` (seekable packs only).

        ``instance`` is a SOP Instance UID or a manifest entry. Bytes reach
        ``out`` before the last checks pass: on DamagedPackError discard
        what was written. :meth:`extract_to` does that for files.

        Several threads may extract from one reader at once: the pack is
        read by one at a time, and members up to 8 MiB are decrypted,
        decompressed and hashed outside that lock.
        """
        entry = self._entry(instance)
        with self._lock:
            member = self._member_of(entry)
            streamed = member.size > _DECODE_AHEAD_MAX
            if streamed:
                opened, problem = self._open_instance(
                    member, self._input.read_exact, out
                )
            else:
                data = self._input.read_exact(member.size)
        if not streamed:
            # Decoded without the lock: other threads read on meanwhile.
            opened, problem = self._open_instance(member, io.BytesIO(data).read, out)
        if opened is not None:
            problem = compare(entry, member, opened)
        if problem:
            raise self._damaged(entry.member, problem, entry.sop_instance_uid)
        return entry

    def _member_of(self, entry: PackedInstance) -> Member:
        """The tar member the manifest entry names, checked, with the
        reader at its data."""
        self._input.seek(entry.header_offset)
        try:
            member = self._next_member()
        except DamagedPackError as exc:
            uid = entry.sop_instance_uid
            raise self._damaged(exc.part, exc.reason, uid) from exc
        if member is None or (member.name, member.data_offset, member.size) != (
            entry.member,
            entry.data_offset,
            entry.member_size,
        ):
            raise self._damaged(
                entry.member, "its tar header differs from the manifest"
            )
        return member

    def extract_to(
        self,
        instance: str | PackedInstance,
        destination: Path,
        root: Path | None = None,
        flush: bool = True,
    ) -> PackedInstance:
        """Extract one instance into a file, only once it checks out; durably
        unless ``flush`` is false (the caller then flushes the file and its
        folder before anything relies on it)."""
        stop = root or destination.parent
        temp = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
        try:
            durable.make_directories(destination.parent, stop)
            with open(temp, "xb") as out:
                entry = self.extract(instance, out)
            if flush:
                durable.move_into_place(temp, destination, stop)
            else:
                os.rename(temp, destination)
        except OSError as exc:
            raise durable.translate_os_error(
                exc, f"cannot write {destination}"
            ) from exc
        finally:
            durable.discard(temp)
        return entry

    def read_all(self, sink: Sink | None = None, threads: int = 2) -> VerifyReport:
        """Read the pack in order, decoding and checking every member.

        ``sink(member_name)``, if given, returns a writable binary file for
        an instance's bytes; it is closed after the member. Which instance a
        member holds is known from the report, once the manifest has come:
        keep only members whose check is good. A stream can be read once.

        With ``threads`` above 1, members from 128 KiB to 8 MiB are decoded
        in worker threads while this one reads on: their sinks are written
        and closed there.
        """
        self._start_sequential()
        with contextlib.ExitStack() as stack:
            pool = None
            if threads > 1:
                pool = stack.enter_context(ThreadPoolExecutor(threads, "pack-read"))
            walk = _Walk(pool, ahead=2 * threads)
            try:
                self._walk(walk, sink)
            except TarFormatError as exc:
                walk.complete = False
                walk.problems.append(
                    f"tar header at byte {exc.offset}: {exc.reason}; nothing "
                    "after it could be read"
                )
            walk.settle()
        if walk.manifest is not None:
            self._manifest = walk.manifest
        manifest = walk.manifest or self._manifest_for_report()
        return reconcile(
            self.pack_id, manifest, walk.seen, walk.problems, walk.complete
        )

    def verify(self, threads: int = 2) -> VerifyReport:
        """Read and check everything; log the outcome; the report."""
        report = self.read_all(threads=threads)
        if report.ok:
            logger.info(
                "pack %s verified: %d instances good",
                self.pack_id,
                len(report.instances),
            )
        else:
            logger.warning("%s", report.describe())
        return report

    # -- the header ------------------------------------------------------------

    def _read_header(self) -> tuple[PackHeader, str]:
        member = self._next_member()
        if member is None or member.name != HEADER_MEMBER:
            found = member.name if member else "nothing"
            raise PackError(f"not a pack: it starts with {found}, not {HEADER_MEMBER}")
        if member.size > MAX_HEADER_BYTES:
            raise self._damaged(HEADER_MEMBER, f"implausibly large ({member.size})")

        data = self._read_data(member)
        try:
            header = PackHeader.from_bytes(data)
        except VersionError as exc:
            raise PackError(f"{HEADER_MEMBER}: {exc}") from exc
        except ValueError as exc:
            raise self._damaged(HEADER_MEMBER, str(exc)) from exc
        return header, hashlib.sha256(data).hexdigest()

    def _data_key(self) -> bytes | None:
        encryption = self.header.encryption
        if encryption is None:
            return None
        if self._keys is None:
            raise KeyStoreError(
                f"pack {self.pack_id} is encrypted under master key "
                f"{encryption.master_key_id}, and no key store was given"
            )
        try:
            key = self._keys.unwrap(
                encryption.master_key_id, encryption.wrapped_data_key
            )
        except MissingKeyError:
            raise
        except KeyStoreError as exc:
            raise self._damaged(HEADER_MEMBER, str(exc)) from exc
        return key.secret

    # -- the manifest ----------------------------------------------------------

    def _locate_manifest(self) -> Manifest:
        try:
            trailer = self._read_trailer()
            self._input.seek(trailer.manifest_header_offset)
            member = self._input.read_member()
            expected = (manifest_member(self.encrypted), trailer.manifest_member_size)
            if member is None or (member.name, member.size) != expected:
                raise ValueError("the trailer does not point at the manifest")
        except (TarFormatError, ValueError) as exc:
            logger.warning(
                "pack %s: trailer unusable (%s); walking the tar headers",
                self.pack_id,
                exc,
            )
            return self._skip_to_manifest()
        manifest, sha256 = self._load_manifest(member)
        if sha256 != trailer.manifest_sha256:
            raise self._damaged(member.name, "its SHA-256 differs from the trailer's")
        return manifest

    def _read_trailer(self) -> Trailer:
        """The trailer: the 512-byte member that ends just before the NULs."""
        end = self._last_data_byte() + 1
        data_offset = end + padding(end) - BLOCK
        self._input.seek(data_offset - BLOCK)
        member = self._input.read_member()
        if member is None or (member.name, member.size) != (TRAILER_MEMBER, BLOCK):
            raise ValueError("the last member is not the trailer")
        return Trailer.from_bytes(self._input.read_exact(TRAILER_SIZE))

    def _last_data_byte(self) -> int:
        """The offset of the last byte that is not NUL, near the end."""
        position = self._input.length()
        limit = max(self._header_end, position - _MAX_TAIL)
        while position > limit:
            start = max(limit, position - _TAIL_CHUNK)
            self._input.seek(start)
            kept = self._input.read_exact(position - start).rstrip(b"\x00")
            if kept:
                return start + len(kept) - 1
            position = start
        raise ValueError("only NULs after the header")

    def _skip_to_manifest(self) -> Manifest:
        """Walk the members from the start, skipping data, to the manifest."""
        self._start_sequential()
        name = manifest_member(self.encrypted)
        while (member := self._next_member()) is not None:
            if member.name == name:
                return self._load_manifest(member)[0]
            self._input.skip(member.size + padding(member.size))
        raise self._damaged(name, "the pack ends without it")

    def _load_manifest(self, member: Member) -> tuple[Manifest, str]:
        """Read, open and parse the manifest member; with its SHA-256."""
        if member.size > MAX_MANIFEST_BYTES:
            raise self._damaged(member.name, f"implausibly large ({member.size})")
        data = self._read_data(member)
        decoded = io.BytesIO()
        aad = sealing.associated_data(self.pack_id, member.name)
        try:
            sealing.open_member(
                io.BytesIO(data).read, len(data), self._secret, aad, decoded
            )
            manifest = Manifest.from_bytes(decoded.getvalue())
        except ValueError as exc:
            raise self._damaged(member.name, str(exc)) from exc
        self._check_manifest(manifest, member.name)
        return manifest, hashlib.sha256(data).hexdigest()

    def _check_manifest(self, manifest: Manifest, name: str) -> None:
        """The manifest must describe this pack's header as it was written."""
        if manifest.pack_id != self.pack_id:
            raise self._damaged(name, f"it belongs to pack {manifest.pack_id}")
        if manifest.header_sha256 != self.header_sha256:
            raise self._damaged(
                HEADER_MEMBER, "its SHA-256 differs from the manifest's record of it"
            )

    def _manifest_for_report(self) -> Manifest | None:
        """After a sequential read that missed the manifest: try the trailer."""
        if not self._input.seekable:
            return None
        try:
            return self._locate_manifest()
        except PackError as exc:
            logger.debug("pack %s: no manifest for the report: %s", self.pack_id, exc)
            return None

    # -- members ---------------------------------------------------------------

    def _walk(self, walk: _Walk, sink: Sink | None) -> None:
        """Read every member after the header, in order, into ``walk``."""
        manifest_name = manifest_member(self.encrypted)
        while (member := self._input.read_member()) is not None:
            if member.name.startswith(INSTANCE_FOLDER):
                self._walk_instance(member, walk, sink)
            elif member.name == manifest_name:
                self._walk_manifest(member, walk)
            elif member.name == TRAILER_MEMBER:
                self._walk_trailer(member, walk)
            else:
                walk.problems.append(f"unexpected member {member.name}")
                self._input.skip(member.size + padding(member.size))
        if walk.trailer is None:
            walk.problems.append(f"{TRAILER_MEMBER} is missing")
        self._walk_end(walk)

    def _walk_instance(self, member: Member, walk: _Walk, sink: Sink | None) -> None:
        out = sink(member.name) if sink is not None else None
        ahead = _DECODE_AHEAD_MIN <= member.size <= _DECODE_AHEAD_MAX
        if walk.pool is None or not ahead:
            walk.settle()
            opened, problem = self._decode(member, self._input.read_exact, out)
            walk.add(member, opened, problem, self._input.read_padding(member))
            return
        data = self._input.read_exact(member.size)
        padded = self._input.read_padding(member)
        future = walk.pool.submit(self._decode, member, io.BytesIO(data).read, out)
        walk.queue(member, future, padded)

    def _decode(
        self, member: Member, read: Callable[[int], bytes], out: BinaryIO | None
    ) -> _Decoded:
        """Decode one instance member into ``out``, then close ``out``."""
        try:
            return self._open_instance(member, read, out)
        finally:
            if out is not None:
                out.close()

    def _walk_manifest(self, member: Member, walk: _Walk) -> None:
        walk.manifest_member = member
        try:
            walk.manifest, walk.manifest_sha256 = self._load_manifest(member)
        except DamagedPackError as exc:
            walk.problems.append(f"{exc.part}: {exc.reason}")
            # Too large to read: go past it all the same.
            if self._input.offset < member.end:
                self._input.skip(member.end - self._input.offset)

    def _walk_trailer(self, member: Member, walk: _Walk) -> None:
        walk.settle()  # the trailer counts the instance members
        try:
            walk.trailer = Trailer.from_bytes(self._read_data(member, pad=False))
        except ValueError as exc:
            walk.problems.append(f"{TRAILER_MEMBER}: {exc}")
            return
        if walk.manifest is not None and not walk.trailer_matches():
            walk.problems.append(f"{TRAILER_MEMBER}: does not match the manifest")

    def _walk_end(self, walk: _Walk) -> None:
        """After the first NUL block: one more, then NULs to the end."""
        closing = self._input.read_some(BLOCK)
        if len(closing) < BLOCK:
            walk.problems.append("the pack is cut short in its closing NUL blocks")
        while closing:
            if closing.strip(b"\x00"):
                start = self._input.offset - len(closing)
                walk.problems.append(f"bytes other than NUL after the end ({start}+)")
                return
            closing = self._input.read_some(1 << 20)

    def _open_instance(
        self, member: Member, read: Callable[[int], bytes], out: BinaryIO | None
    ) -> _Decoded:
        """Decode one instance member into ``out``: (result, problem)."""
        aad = sealing.associated_data(self.pack_id, member.name)
        try:
            opened = sealing.open_member(read, member.size, self._secret, aad, out)
        except sealing.MemberError as exc:
            return None, str(exc)
        except OSError as exc:
            raise durable.translate_os_error(
                exc, f"cannot write {member.name} out"
            ) from exc
        return opened, None

    def _read_data(self, member: Member, pad: bool = True) -> bytes:
        """A small member's data (and, with ``pad``, its NUL padding)."""
        data = self._input.read_exact(member.size)
        if pad and not self._input.read_padding(member):
            raise self._damaged(member.name, "bytes other than NUL after it")
        return data

    def _next_member(self) -> Member | None:
        try:
            return self._input.read_member()
        except TarFormatError as exc:
            raise self._damaged(f"tar header at byte {exc.offset}", exc.reason) from exc

    def _start_sequential(self) -> None:
        if self._input.seekable:
            self._input.seek(self._header_end)
            return
        if self._streamed:
            raise PackError(
                f"pack {self.pack_id}: a stream can be read once, and this one was"
            )
        self._streamed = True

    def _entry(self, instance: str | PackedInstance) -> PackedInstance:
        if not self._input.seekable:
            raise PackError(
                "extracting one instance needs a pack file; read a stream with "
                "read_all()"
            )
        if isinstance(instance, PackedInstance):
            return instance
        try:
            return self.manifest().instance(instance)
        except LookupError as exc:
            raise PackError(str(exc)) from None

    def _damaged(
        self, part: str, reason: str, sop_instance_uid: str | None = None
    ) -> DamagedPackError:
        return DamagedPackError(self.pack_id, part, reason, sop_instance_uid)


class _Walk:
    """What a sequential read met so far, and the members still decoding."""

    def __init__(self, pool: ThreadPoolExecutor | None, ahead: int) -> None:
        self.pool = pool
        self.ahead = ahead
        self.seen: dict[str, Seen] = {}
        self.problems: list[str] = []
        self.manifest: Manifest | None = None
        self.manifest_member: Member | None = None
        self.manifest_sha256: str | None = None
        self.trailer: Trailer | None = None
        self.complete = True
        self._pending: deque[tuple[Member, Future[_Decoded], bool]] = deque()

    def add(
        self,
        member: Member,
        opened: sealing.Opened | None,
        problem: str | None,
        padded: bool,
    ) -> None:
        """Record a decoded member; ``padded`` is False for non-NUL padding."""
        if not padded:
            problem = problem or "bytes other than NUL after it"
        self.seen[member.name] = Seen(member, opened, problem)

    def queue(self, member: Member, future: Future[_Decoded], padded: bool) -> None:
        """Hold a member decoding in a worker; wait once too many are ahead."""
        self._pending.append((member, future, padded))
        while len(self._pending) > self.ahead:
            self._settle_first()

    def trailer_matches(self) -> bool:
        """Whether the trailer describes the manifest and members met."""
        trailer, manifest = self.trailer, self.manifest_member
        assert trailer is not None and manifest is not None
        return (
            trailer.manifest_header_offset == manifest.header_offset
            and trailer.manifest_data_offset == manifest.data_offset
            and trailer.manifest_member_size == manifest.size
            and trailer.manifest_sha256 == self.manifest_sha256
            and trailer.instance_count == len(self.seen)
        )

    def settle(self) -> None:
        """Wait for every member still decoding, in order."""
        while self._pending:
            self._settle_first()

    def _settle_first(self) -> None:
        member, future, padded = self._pending.popleft()
        opened, problem = future.result()
        self.add(member, opened, problem, padded)
