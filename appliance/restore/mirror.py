"""What the mirror holds for a restore, and fetching files from it.

The mirror's names (see ``docs/replication.md``)::

    packs/NNN/p-NNNNNNNNN.pack                 packs, in arrival order
    journal/FFFFFFFFFFFF-LLLLLLLLLLLL          journal entries F to L, sealed
    catalog/snapshot-SSSSSSSSSSSS-TTTTTTTTTT   the catalog as of entry S
                                               (at least), sealed at time T

Files are fetched within the restore's own bandwidth cap, hashed on the
way, and written under a temporary name first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from appliance.catalog.replication import OFFSITE
from appliance.errors import StorageError
from appliance.replication.bandwidth import Limiter
from appliance.replication.transports import Transport
from appliance.storage import durable, sealed
from appliance.storage.keys import KeyStore

logger = logging.getLogger(__name__)

_SNAPSHOT = re.compile(r"catalog/snapshot-(\d{12})-(\d{10})")
_SEGMENT = re.compile(r"journal/(\d{12})-(\d{12})")
_PACK = re.compile(r"packs/\d+/(p-(\d+))\.pack")

# Called with the bytes of each chunk received.
Received = Callable[[int], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file on the mirror."""

    name: str
    size: int


@dataclass(frozen=True)
class Snapshot:
    number: int  # the last journal entry it holds, at least
    time: int
    file: RemoteFile


@dataclass(frozen=True)
class Segment:
    first: int
    last: int
    file: RemoteFile


@dataclass
class MirrorContents:
    """The snapshots, journal segments and packs found on the mirror; or,
    for a restore from offline volumes (``tier`` offline), the packs found
    on the volumes, each named ``VOLUME/POSITION``."""

    snapshots: list[Snapshot] = field(default_factory=list)  # newest first
    segments: list[Segment] = field(default_factory=list)  # by first, last
    packs: dict[str, RemoteFile] = field(default_factory=dict)  # by pack id
    # The highest pack number on the mirror, unfinished uploads included.
    highest_pack: int = 0
    # The tier whose copies the rebuilt catalog records.
    tier: str = OFFSITE

    @property
    def where(self) -> str:
        """Where the packs are, for messages."""
        return "the mirror" if self.tier == OFFSITE else "the volumes"

    @property
    def last_journal_number(self) -> int:
        """The last journal entry any segment holds (0 when none)."""
        return max((segment.last for segment in self.segments), default=0)


def pack_number(pack_id: str) -> int:
    """The number in a pack id such as ``p-000000123``."""
    return int(pack_id.rpartition("-")[2])


def survey(transport: Transport) -> MirrorContents:
    """List what the mirror holds (three listings, no file read)."""
    found = MirrorContents()
    for name, size in transport.list("catalog/"):
        if match := _SNAPSHOT.fullmatch(name):
            number, when = int(match[1]), int(match[2])
            found.snapshots.append(Snapshot(number, when, RemoteFile(name, size)))
    found.snapshots.sort(key=lambda s: (s.number, s.time), reverse=True)
    for name, size in transport.list("journal/"):
        if match := _SEGMENT.fullmatch(name):
            first, last = int(match[1]), int(match[2])
            found.segments.append(Segment(first, last, RemoteFile(name, size)))
    found.segments.sort(key=lambda s: (s.first, s.last))
    for name, size in transport.list("packs/"):
        if match := _PACK.fullmatch(name):
            found.packs[match[1]] = RemoteFile(name, size)
            found.highest_pack = max(found.highest_pack, int(match[2]))
    for name, _size in transport.list("packs/", partial=True):
        if match := _PACK.fullmatch(name):
            found.highest_pack = max(found.highest_pack, int(match[2]))
    logger.info(
        "mirror: %d snapshot(s), %d journal segment(s), %d pack(s)",
        len(found.snapshots),
        len(found.segments),
        len(found.packs),
    )
    return found


@dataclass(frozen=True)
class Fetched:
    """A file fetched from the mirror: where it is locally, its size and hash."""

    path: Path
    size: int
    sha256: str


class Fetcher:
    """Fetches files from the mirror within the restore's bandwidth cap."""

    def __init__(self, transport: Transport, limiter: Limiter | None = None) -> None:
        self.transport = transport
        self.limiter = limiter

    def fetch(
        self,
        name: str,
        destination: Path,
        received: Received | None = None,
        flush: bool = False,
    ) -> Fetched:
        """Fetch ``name`` into ``destination`` (through a temporary name),
        with ``flush``, on the disk before it takes that name.

        Raises TransportError when the mirror cannot be read; the caller
        compares size and SHA-256 with what it expects.
        """
        temporary = destination.with_name(f".{destination.name}.part")
        digest = hashlib.sha256()
        size = 0
        chunks = self.transport.get(name)
        try:
            with (
                open(temporary, "wb") as out,
                durable.flushed_ahead(out.fileno()) if flush else nullcontext(),
            ):
                for chunk in chunks:
                    if self.limiter is not None:
                        self.limiter.acquire(len(chunk))
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if received is not None:
                        received(len(chunk))
                if flush:
                    out.flush()
                    os.fsync(out.fileno())
            temporary.replace(destination)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot write {temporary}") from exc
        finally:
            # A download given up midway ends here, in this thread: the
            # connection is free for the next one at once.
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            temporary.unlink(missing_ok=True)
        return Fetched(destination, size, digest.hexdigest())

    def fetch_sealed(
        self,
        remote: RemoteFile,
        destination: Path,
        keys: KeyStore,
        folder: Path,
        received: Received | None = None,
    ) -> None:
        """Fetch a sealed file and open it into ``destination``.

        Raises SealedFileError when it does not open (damaged, cut short,
        renamed, or sealed under a master key the store lacks).
        """
        download = folder / "sealed.download"
        fetched = self.fetch(remote.name, download, received)
        try:
            if fetched.size != remote.size:
                raise sealed.SealedFileError(
                    f"{remote.name}: {fetched.size} bytes read, {remote.size} listed"
                )
            with open(download, "rb") as source, open(destination, "wb") as out:
                sealed.open_sealed(source, remote.name, keys, out)
        except OSError as exc:
            raise StorageError(f"cannot open {remote.name}: {exc}") from exc
        except Exception:
            destination.unlink(missing_ok=True)
            raise
        finally:
            download.unlink(missing_ok=True)
