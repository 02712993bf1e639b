"""Packs fetched from the mirror, kept on local disk while they are needed,
and the mirror seen as a pack tier so that recall can read them.

A pack is fetched whole (the transport reads files from their start), so
each is fetched once and kept until every instance it holds for the
restore was tried; the oldest-used packs make room when the cache reaches
its size. Files are named by pack id: ``<folder>/p-000000123.pack``.

The catalog phase flushes each pack it fetches: a scan fetches them all,
and the data phase of the next run reads them still. The data phase does
not (``<folder>/p-000000123.unflushed``): a pack lives there for a study or
two and is dropped, mostly before the kernel would write it out, which
spares the disk writing every pack besides every instance (whose flushes
are what it must serve). A power cut may leave such a file cut short or
zeroed at any size, so the next run removes them all and fetches again
the few it still needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import StorageError
from appliance.restore.mirror import Fetcher, Received, RemoteFile
from appliance.storage.keys import DataKey, KeyStore
from appliance.storage.packs import PackReader, PackSummary
from appliance.storage.packs.manifest import InstanceMeta, check_pack_id
from appliance.storage.packs.writer import Source

logger = logging.getLogger(__name__)


class PackCache:
    """Whole packs from the mirror in a local folder, at most ``limit`` bytes
    of them besides the one being fetched. One thread may fetch while
    another reads and drops packs."""

    def __init__(self, folder: Path, fetcher: Fetcher, limit: int) -> None:
        self.folder = folder
        self.fetcher = fetcher
        self.limit = limit
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in [*folder.glob(".*.part"), *folder.glob("*.unflushed")]:
            leftover.unlink(missing_ok=True)
        # pack id -> when last used; packs fetched by an earlier run count.
        self._used = {path.stem: path.stat().st_mtime for path in self._files()}
        # Those not compared with the mirror's listing yet.
        self._earlier = set(self._used)
        # Packs fetched by this run whose bytes differ from their record.
        self.damaged: set[str] = set()
        # Packs fetched by this run without a flush.
        self._unflushed: set[str] = set()
        # The restore fetches in one thread and drops packs in another.
        self._lock = threading.RLock()

    def path_of(self, pack_id: str) -> Path:
        if pack_id in self._unflushed:
            return self.folder / f"{check_pack_id(pack_id)}.unflushed"
        return self.folder / f"{check_pack_id(pack_id)}.pack"

    def holds(self, pack_id: str) -> bool:
        return pack_id in self._used

    def fetch(
        self,
        pack_id: str,
        remote: RemoteFile,
        sha256: str | None = None,
        received: Received | None = None,
        keep: Collection[str] = (),
        flush: bool = True,
    ) -> Path:
        """The local copy of a pack, fetched now unless the cache holds it;
        without ``flush``, for this run only (see the module).

        A copy whose size or SHA-256 differs from what the catalog recorded
        is kept all the same: each instance in it is checked when it is
        extracted, so the undamaged ones can still be restored. Packs in
        ``keep`` (the others a study needs) are not dropped to make room.
        """
        with self._lock:
            self._drop_if_cut_short(pack_id, remote)
            held = pack_id in self._used
            if not held:
                self._make_room(remote.size, set(keep))
                if flush:
                    self._unflushed.discard(pack_id)
                else:
                    self._unflushed.add(pack_id)
        path = self.path_of(pack_id)
        if not held:
            fetched = self.fetcher.fetch(remote.name, path, received, flush=flush)
            if fetched.size != remote.size or (sha256 and fetched.sha256 != sha256):
                self.damaged.add(pack_id)
                logger.warning(
                    "pack %s read from the mirror differs from its record "
                    "(%d bytes, SHA-256 %s...); its instances are checked one "
                    "by one",
                    pack_id,
                    fetched.size,
                    fetched.sha256[:16],
                )
        with self._lock:
            self._used[pack_id] = time.monotonic()
        return path

    def _drop_if_cut_short(self, pack_id: str, remote: RemoteFile) -> None:
        """Drop a pack an earlier run fetched that is not the size the
        mirror lists: cut short on the disk (by a power cut, before packs
        were flushed), it would lose every instance after the cut."""
        if pack_id not in self._earlier or pack_id not in self._used:
            return
        self._earlier.discard(pack_id)
        size = self.path_of(pack_id).stat().st_size
        if size != remote.size:
            logger.warning(
                "pack %s in the restore cache holds %d bytes, the mirror %d: "
                "fetched again",
                pack_id,
                size,
                remote.size,
            )
            self.drop(pack_id)

    def drop(self, pack_id: str) -> None:
        """Remove a pack nobody needs any more."""
        with self._lock:
            if self._used.pop(pack_id, None) is not None:
                self.path_of(pack_id).unlink(missing_ok=True)
            self._unflushed.discard(pack_id)

    def drop_all(self, keep: Iterable[str] = ()) -> None:
        kept = set(keep)
        with self._lock:
            for pack_id in list(self._used):
                if pack_id not in kept:
                    self.drop(pack_id)

    def _make_room(self, size: int, keep: set[str]) -> None:
        while self._bytes() + size > self.limit:
            unpinned = [pack_id for pack_id in self._used if pack_id not in keep]
            if not unpinned:
                return
            oldest = min(unpinned, key=self._used.__getitem__)
            logger.info("restore cache full: pack %s dropped", oldest)
            self.drop(oldest)

    def _bytes(self) -> int:
        return sum(self.path_of(pack_id).stat().st_size for pack_id in self._used)

    def _files(self) -> list[Path]:
        return [path for path in self.folder.glob("p-*.pack") if path.is_file()]


class ReadOnlyMirror:
    """What every view of the mirror as a pack tier shares: it is always
    reachable, needs no volume, and is never written to or pruned here
    (replication alone does that)."""

    def write(
        self,
        pack_id: str,
        items: Iterable[tuple[InstanceMeta, Source]],
        study_uid: str,
        key: DataKey | None,
        keys: KeyStore | None = None,
    ) -> tuple[str, PackSummary]:
        raise StorageError("packs reach the mirror through replication only")

    def is_reachable(self, location: str) -> bool:
        return True

    def volume_of(self, location: str) -> str | None:
        return None

    def remove(self, location: str) -> None:
        # The last verified copy may be this one: never deleted from here.
        raise StorageError(f"{location} is never removed from the mirror here")


class MirrorTier(ReadOnlyMirror):
    """The mirror as a pack tier for recall, read through the pack cache.

    Only packs the cache holds can be read; the restore fetches them before
    it recalls a study.
    """

    def __init__(self, cache: PackCache) -> None:
        self.cache = cache

    @contextmanager
    def reader(
        self,
        location: str,
        pack_id: str,
        size: int,
        sha256: str,
        keys: KeyStore | None = None,
    ) -> Iterator[PackReader]:
        if not self.cache.holds(pack_id):
            raise StorageError(f"pack {pack_id} could not be read from the mirror")
        with PackReader.open(self.cache.path_of(pack_id), keys) as reader:
            if reader.pack_id != pack_id:
                raise StorageError(f"{location} holds pack {reader.pack_id}")
            yield reader
