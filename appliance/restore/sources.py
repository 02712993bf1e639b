"""Where a rebuilt catalog's content comes from: the latest catalog snapshot
that opens and the journal after it, or, failing those, every pack's
manifest.

Either way the result is a *work* catalog, in a folder of its own: the
state of the lost appliance as far as the mirror knows it. Packs on the
mirror that the snapshot and journal do not mention (uploaded just before
the disaster, before their journal segment) are read as in a scan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.catalog import replication
from appliance.catalog.archive import archive_id
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, StorageError, TransportError
from appliance.replication.identity import marker_archive
from appliance.restore.cache import PackCache
from appliance.restore.mirror import (
    Fetcher,
    MirrorContents,
    Received,
    RemoteFile,
    Snapshot,
    pack_number,
)
from appliance.restore.replay import merge_manifest, replay_journal
from appliance.storage.keys import KeyStore
from appliance.storage.packs import PackReader

logger = logging.getLogger(__name__)

# Units of a step's numbers.
BYTES = "bytes"
ENTRIES = "journal entries"
PACKS = "packs"


@dataclass(frozen=True)
class Step:
    """How far one step of the catalog phase is: ``done`` of ``total``
    ``unit`` (bytes of the snapshot or journal read, journal entries
    replayed, packs whose manifest was read)."""

    what: str
    done: int
    total: int
    unit: str


# Called at the start of each step and as it advances, to its total.
Progress = Callable[[Step], None]


@dataclass
class WorkCatalog:
    """The lost appliance's catalog as rebuilt, and how it was found."""

    catalog: Catalog
    source: str
    # The last journal entry the lost appliance wrote, as far as known.
    last_journal: int = 0
    # The next pack number the lost appliance would have used (0: unknown).
    next_pack: int = 0
    # Packs whose manifest could not be read: pack id -> why.
    unreadable: dict[str, str] = field(default_factory=dict)
    # The lost appliance's archive id, which its volume labels name ("":
    # not known).
    archive: str = ""


class Sources:
    """Builds the work catalog from what the mirror holds."""

    def __init__(
        self,
        fetcher: Fetcher,
        contents: MirrorContents,
        keys: KeyStore,
        folder: Path,
        cache: PackCache,
        map_size: int,
        progress: Progress | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.contents = contents
        self.keys = keys
        self.folder = folder
        self.cache = cache
        self.map_size = map_size
        self.progress = progress

    def build(self, scan: bool) -> WorkCatalog:
        """The work catalog: from the snapshot and journal unless ``scan``
        or those are missing or damaged, else from the pack manifests."""
        work = self._from_history_or_packs(scan)
        work.archive = self._archive(work.catalog)
        return work

    def _from_history_or_packs(self, scan: bool) -> WorkCatalog:
        if not scan:
            try:
                return self._from_history()
            except TransportError:
                raise
            except ApplianceError as exc:
                logger.warning("%s; rebuilding from the pack manifests instead", exc)
        work = WorkCatalog(self._empty_catalog(), "the manifests of every pack")
        self._merge_packs(work, sorted(self.contents.packs, key=pack_number))
        return work

    def _archive(self, catalog: Catalog) -> str:
        """The lost appliance's archive id: the one the mirror's identity
        marker names, else the snapshot's. The rebuilt catalog keeps it, so
        that the appliance reads its own volumes (their labels name it) and
        replicates to its mirror again."""
        marked = marker_archive(self.fetcher.transport, self.keys)
        return marked or archive_id(catalog)

    # -- snapshot and journal --------------------------------------------------

    def _from_history(self) -> WorkCatalog:
        opened = self._latest_snapshot()
        if opened is None and not self.contents.segments:
            raise StorageError("the mirror holds no catalog snapshot and no journal")
        if opened is None:
            catalog, included, name = self._empty_catalog(), 0, ""
        else:
            catalog, snapshot = opened
            included = replication.last_journal_number(catalog)
            name = snapshot.file.name
        try:
            return self._replay(catalog, included, name)
        except BaseException:
            catalog.close()
            raise

    def _replay(self, catalog: Catalog, included: int, name: str) -> WorkCatalog:
        """The journal after the snapshot, then the packs it does not name."""
        entries = self._journal_after(included)
        replay_journal(
            catalog, entries, self._stepper("replaying the journal", ENTRIES)
        )
        last = entries[-1]["seq"] if entries else included
        journal = (
            f"journal entries {included + 1} to {last}"
            if last > included
            else "no journal entry after it"
        )
        work = WorkCatalog(
            catalog,
            f"{name} and {journal}" if name else f"{journal} (no snapshot opened)",
            last_journal=last,
            next_pack=_next_pack(catalog),
        )
        unknown = [
            pack_id
            for pack_id in sorted(self.contents.packs, key=pack_number)
            if not replication.pack_is_recorded(catalog, pack_id)
        ]
        if unknown:
            logger.info("%d pack(s) on the mirror the journal lacks", len(unknown))
            work.source += f", and {len(unknown)} pack(s) the journal lacks"
            self._merge_packs(work, unknown)
        return work

    def _latest_snapshot(self) -> tuple[Catalog, Snapshot] | None:
        """The newest snapshot that opens and is of the mirror's archive,
        as a writable work catalog."""
        archive = ""
        if self.contents.snapshots:
            archive = marker_archive(self.fetcher.transport, self.keys)
        for snapshot in self.contents.snapshots:
            folder = self._fresh_folder()
            read = self._counter("reading the catalog snapshot", snapshot.file.size)
            try:
                self.fetcher.fetch_sealed(
                    snapshot.file, folder / "data.mdb", self.keys, self.folder, read
                )
                catalog = Catalog(folder, self.map_size, durable=False)
            except TransportError:
                raise
            except ApplianceError as exc:
                logger.warning("snapshot %s does not open: %s", snapshot.file.name, exc)
                continue
            # Another archive's snapshot opens when its keys were imported
            # too: its packs and journal numbers are not this mirror's.
            theirs = archive_id(catalog)
            if archive and theirs and theirs != archive:
                logger.warning(
                    "snapshot %s is of another archive (%s; the mirror's "
                    "identity marker names %s): left aside",
                    snapshot.file.name,
                    theirs,
                    archive,
                )
                catalog.close()
                continue
            logger.info("catalog snapshot %s opened", snapshot.file.name)
            return catalog, snapshot
        return None

    def _journal_after(self, included: int) -> list[dict[str, Any]]:
        """Entries after ``included`` up to the last on the mirror, in order;
        StorageError if any of them cannot be read."""
        wanted = self.contents.last_journal_number
        found: dict[int, dict[str, Any]] = {}
        later = [s for s in self.contents.segments if s.last > included]
        size = sum(s.file.size for s in later)
        counted = self._counter("reading the journal", size)
        for segment in later:
            text = self.folder / "segment"
            try:
                self.fetcher.fetch_sealed(
                    segment.file, text, self.keys, self.folder, counted
                )
                lines = text.read_text(encoding="utf-8").splitlines()
                read = [e for e in map(json.loads, lines) if e["seq"] > included]
            except TransportError:
                raise
            except (ApplianceError, ValueError, KeyError, OSError) as exc:
                logger.warning("journal segment %s: %s", segment.file.name, exc)
                continue
            finally:
                text.unlink(missing_ok=True)
            for entry in read:
                _take(found, entry, segment.file.name)
        gaps = [n for n in range(included + 1, wanted + 1) if n not in found]
        if gaps:
            raise StorageError(
                f"journal entries {gaps[0]} to {gaps[-1]} cannot be read from the "
                f"mirror ({len(gaps)} missing after entry {included})"
            )
        return [found[number] for number in sorted(found)]

    # -- manifests -------------------------------------------------------------

    def _merge_packs(self, work: WorkCatalog, pack_ids: list[str]) -> None:
        """Read each pack's manifest (the whole pack is fetched: it stays in
        the cache for the data restore) and merge it, oldest first."""
        told = self._stepper("reading the pack manifests", PACKS)
        for done, pack_id in enumerate(pack_ids):
            told(done, len(pack_ids))
            remote = self.contents.packs[pack_id]
            path = self.cache.fetch(pack_id, remote)
            if not merge_pack_file(work, pack_id, path, remote, self.keys):
                self.cache.drop(pack_id)
        told(len(pack_ids), len(pack_ids))

    def _stepper(self, what: str, unit: str) -> Callable[[int, int], None]:
        """Tell the progress how far the step ``what`` is."""

        def tell(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(Step(what, done, total, unit))

        return tell

    def _counter(self, what: str, total: int) -> Received:
        """Count the bytes of the step ``what`` as they are received (told
        once at 0 now, then with every chunk)."""
        tell = self._stepper(what, BYTES)
        done = 0
        tell(done, total)

        def received(size: int) -> None:
            nonlocal done
            done += size
            tell(done, total)

        return received

    def _empty_catalog(self) -> Catalog:
        return Catalog(self._fresh_folder(), self.map_size, durable=False)

    # The work catalog is made again from the start by any run that finds
    # no checked rebuilt catalog (see ``rebuild``): nothing in it needs to
    # outlive a crash, so its commits are not flushed.
    def _fresh_folder(self) -> Path:
        folder = self.folder / "catalog"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder


def merge_pack_file(
    work: WorkCatalog,
    pack_id: str,
    path: Path,
    remote: RemoteFile,
    keys: KeyStore,
    tier: str = OFFSITE,
    sha256: str | None = None,
) -> bool:
    """Merge the manifest of the pack in the local file ``path`` into the
    work catalog, its copies on ``tier``; whether it could be read (if not,
    the pack is noted as unreadable). ``sha256`` is the pack's digest as
    recorded where it is kept; by default that of the file."""
    try:
        with PackReader.open(path, keys) as reader:
            manifest = reader.manifest()
        if reader.pack_id != pack_id:
            raise StorageError(f"the file holds pack {reader.pack_id}")
        digest = sha256 or _sha256_of(path)
    except ApplianceError as exc:
        logger.error("pack %s: manifest unreadable: %s", pack_id, exc)
        work.unreadable[pack_id] = str(exc)
        return False
    merge_manifest(work.catalog, manifest, remote, digest, tier)
    work.next_pack = max(work.next_pack, pack_number(pack_id) + 1)
    return True


def _take(found: dict[int, dict[str, Any]], entry: dict[str, Any], name: str) -> None:
    """Add a journal entry; segments may overlap, with the same entries.

    An entry that differs from the one already found under its number is
    another history (a segment of another archive, whose keys opened it):
    the journal cannot say which is this archive's, the manifests can.
    """
    number = entry["seq"]
    if found.get(number, entry) != entry:
        raise StorageError(
            f"journal entry {number} in segment {name} differs from the one "
            "another segment holds (a segment of another archive?)"
        )
    found[number] = entry


def _next_pack(catalog: Catalog) -> int:
    with catalog.read() as txn:
        return int(txn.get(b"next_pack", b"1", db=catalog.db["meta"]))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
