"""Restore from offline volumes, the catalog phase: every pack's manifest
on every volume the library holds, merged into a rebuilt catalog.

Volumes are read one at a time. Each pack is read whole (its manifest is
at its end) into a spool file, and its manifest merged into a work catalog
(:func:`.sources.merge_pack_file`) with the pack's offline copy where the
library lists it: ``VOLUME/POSITION``, its size and SHA-256. After each
volume, what was read is noted in ``restore/work/volumes.json``, so that
an interrupted run, or one that waited for a volume, reads only the
volumes not read yet::

    {"packs": {"L00001": [{"volume": "L00001", "position": 1,
                           "pack_id": "p-000000007", "size": ..., ...}]},
     "damaged": {"p-000000009": "why"}, "unreadable": {}, "next_pack": 10,
     "archives": {"L00001": "<the archive id its label names, or empty>"}}

The rebuilt catalog takes the archive id the labels of the volumes read
name (volumes labelled before labels named one name none), so that the
appliance goes on reading them as its own; volumes that name two archives
leave it without one, and say so.

A volume on the shelf is asked for (an operator request, and a line on
the terminal), and the catalog is written from the volumes read so far:
exported, checked and put in place as for the mirror (:mod:`.export`,
:mod:`.check`, :mod:`.swap`), so that their studies are restored at once.
Once the volume is loaded, the next run reads it, writes the catalog again
from the work catalog, and puts it in place of the earlier one with the
online copies restored since whose bytes are unchanged; the files of the
others (an older version of an instance a newer pack replaced) are
removed. The work catalog is removed when every volume was read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, StorageError, VolumeNotReachable
from appliance.hsm.tiers import OFFLINE, ONLINE
from appliance.restore import swap
from appliance.restore.mirror import MirrorContents, RemoteFile, pack_number
from appliance.restore.rebuild import Rebuild, rebuilt_before, write_checked
from appliance.restore.sources import WorkCatalog, merge_pack_file
from appliance.storage import durable
from appliance.storage.keys import KeyStore
from appliance.storage.online import OnlineTier
from appliance.storage.volumes import PackLocation, VolumeLibrary
from appliance.storage.volumes.registry import write_atomically

logger = logging.getLogger(__name__)

# Called with (packs read so far, packs to read), before each pack and as
# each chunk of it is read.
Progress = Callable[[int, int], None]

_STATE = "volumes.json"
_SUPERSEDED = ".superseded"


@dataclass
class VolumesRead:
    """What the volumes read so far gave: their packs (those merged), the
    packs whose bytes differ from their record, the packs whose manifest
    could not be read, and the next pack number."""

    packs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    next_pack: int = 0
    # The archive id each volume read names in its label ("": none).
    archives: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> VolumesRead:
        try:
            return cls(**json.loads((folder / _STATE).read_text()))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError) as exc:
            raise StorageError(f"{folder / _STATE} is unreadable: {exc}") from exc

    def save(self, folder: Path) -> None:
        write_atomically(folder / _STATE, json.dumps(asdict(self)).encode(), folder)

    def knows(self, pack_id: str) -> str | None:
        """The volume a pack was read from, if it was."""
        for volume, packs in self.packs.items():
            if any(p["pack_id"] == pack_id for p in packs):
                return volume
        return None

    def contents(self) -> MirrorContents:
        """The packs read, as the rebuild's export and check see them."""
        found = MirrorContents(tier=OFFLINE)
        for volume, packs in self.packs.items():
            for pack in packs:
                where = f"{volume}/{pack['position']}"
                found.packs[pack["pack_id"]] = RemoteFile(where, pack["size"])
                number = pack_number(pack["pack_id"])
                found.highest_pack = max(found.highest_pack, number)
        return found


@dataclass
class VolumeRebuild:
    """The catalog phase's outcome, and the volumes it could not read."""

    rebuild: Rebuild
    unread: list[str] = field(default_factory=list)


def rebuild_from_volumes(
    catalog_path: Path,
    map_size: int,
    work_folder: Path,
    library: VolumeLibrary,
    keys: KeyStore,
    online: OnlineTier,
    progress: Progress | None = None,
) -> VolumeRebuild:
    """Rebuild the catalog at ``catalog_path`` from the packs on every
    reachable volume not read yet (see the module for the steps)."""
    _drop_superseded(catalog_path, online)
    earlier = rebuilt_before(catalog_path)
    if earlier is not None and not earlier.note.get("volumes_unread"):
        # A run killed once the catalog was in place left the work.
        shutil.rmtree(work_folder, ignore_errors=True)
        return VolumeRebuild(earlier)
    rebuilt = swap.rebuilt_path(catalog_path)
    note = swap.note_of(rebuilt)
    if note is None:
        if earlier is None:
            swap.refuse_unless_empty(catalog_path)
        shutil.rmtree(rebuilt, ignore_errors=True)
        reader = VolumeReader(library, keys, work_folder, map_size, progress)
        try:
            reader.read_reachable()
        except BaseException:
            reader.close()
            raise
        # Not only those read now: a run stopped before its catalog was
        # in place leaves volumes read that only the work catalog holds.
        if earlier is not None and not _newer(earlier, reader):
            reader.close()
            return VolumeRebuild(earlier, reader.unread())
        note = _write(reader, rebuilt, map_size, work_folder)
    aside = _put_in_place(rebuilt, catalog_path, map_size, online)
    unread = list(note.get("volumes_unread", []))
    if not unread:
        shutil.rmtree(work_folder, ignore_errors=True)
    rebuild = Rebuild(note, set_aside=aside, lost=note.get("lost", []))
    return VolumeRebuild(rebuild, unread)


def _newer(earlier: Rebuild, reader: VolumeReader) -> bool:
    """Whether the work catalog holds volumes the earlier catalog lacks."""
    return bool(set(reader.state.packs) - set(earlier.note.get("volumes_read", [])))


def _write(
    reader: VolumeReader, rebuilt: Path, map_size: int, work_folder: Path
) -> dict[str, Any]:
    """The checked catalog of what was read, with its note."""
    extra = {
        "volumes_read": sorted(reader.state.packs),
        "volumes_unread": reader.unread(),
        "damaged_packs": dict(reader.state.damaged),
    }
    contents = reader.state.contents()
    reader.work.archive = reader.archive()
    try:
        return write_checked(reader.work, rebuilt, map_size, contents, extra)
    except StorageError:
        # Nothing opened (the wrong keys): read every volume again next time.
        shutil.rmtree(work_folder, ignore_errors=True)
        raise


class VolumeReader:
    """Reads the packs of the volumes not read yet into the work catalog."""

    def __init__(
        self,
        library: VolumeLibrary,
        keys: KeyStore,
        folder: Path,
        map_size: int,
        progress: Progress | None = None,
    ) -> None:
        self.library = library
        self.keys = keys
        self.folder = folder
        self.progress = progress
        folder.mkdir(parents=True, exist_ok=True)
        self.state = VolumesRead.load(folder)
        catalog = Catalog(folder / "catalog", map_size)
        self.work = WorkCatalog(
            catalog,
            "",
            next_pack=self.state.next_pack,
            unreadable=self.state.unreadable,
        )
        self._shelved: list[str] = []
        # (packs read, packs to read), told again as each chunk comes: a
        # pack on tape takes minutes, and Ctrl-C is acted on in the call.
        self._told = (0, 0)

    def close(self) -> None:
        self.work.catalog.close()

    def unread(self) -> list[str]:
        """Volumes the library knows whose packs were not read."""
        known = [volume.label for volume in self.library.list_volumes()]
        return [label for label in known if label not in self.state.packs]

    def read_reachable(self) -> list[str]:
        """Read every reachable volume not read yet; those read now."""
        listed = self._list_unread()
        total = sum(len(packs) for packs in listed.values())
        done = 0
        read = []
        for volume, packs in listed.items():
            merged = []
            try:
                for location in packs:
                    self._report(done, total)
                    if self._merge(location):
                        merged.append(asdict(location))
                    done += 1
            except VolumeNotReachable as exc:
                # Taken out while it was read: read again once it is back.
                logger.warning("volume %s left the library: %s", volume, exc)
                continue
            self.state.packs[volume] = merged
            self.state.archives[volume] = self._archive_named(volume)
            self.state.next_pack = self.work.next_pack
            self.state.save(self.folder)
            read.append(volume)
            logger.info("volume %s read: %d pack(s)", volume, len(merged))
        self._report(total, total)
        volumes = ", ".join(self.state.packs) or "no volume"
        self.work.source = f"the manifests of the packs on {volumes}"
        return read

    def archive(self) -> str:
        """The archive id the volumes read name; empty when none names one,
        or when they name several (which one is this archive's is then not
        known: each is named in a warning)."""
        named = sorted({archive for archive in self.state.archives.values() if archive})
        if len(named) > 1:
            for archive in named:
                volumes = [v for v, a in self.state.archives.items() if a == archive]
                logger.warning(
                    "volume(s) %s name archive %s", ", ".join(volumes), archive
                )
            logger.warning(
                "the volumes read name %d archives: the rebuilt catalog takes "
                "no archive id (new volume labels will name a new one)",
                len(named),
            )
            return ""
        return named[0] if named else ""

    def _archive_named(self, volume: str) -> str:
        try:
            return self.library.archive_named(volume)
        except ApplianceError as exc:
            logger.warning("volume %s: its label cannot be read: %s", volume, exc)
            return ""

    def _list_unread(self) -> dict[str, list[PackLocation]]:
        """The packs of each reachable volume not read yet, by volume."""
        listed = {}
        for volume in self.library.list_volumes():
            if volume.label in self.state.packs:
                continue
            try:
                listed[volume.label] = self.library.list_packs(volume.label)
            except VolumeNotReachable:
                logger.warning("volume %s is on the shelf", volume.label)
            except ApplianceError as exc:
                logger.error("volume %s cannot be listed: %s", volume.label, exc)
        return listed

    def _merge(self, location: PackLocation) -> bool:
        """Read one pack and merge its manifest; whether it was merged (a
        pack read from another volume already is not)."""
        pack_id = location.pack_id
        elsewhere = self.state.knows(pack_id)
        if elsewhere is not None and self._same_as_read(location, elsewhere):
            logger.warning(
                "pack %s is on volume %s and on %s: the copy on %s is used",
                pack_id,
                elsewhere,
                location.volume,
                elsewhere,
            )
            return False
        if elsewhere is not None:
            # Not a copy: another pack under its number, as a volume of
            # another archive holds. Its instances are unknown, and what
            # this archive's volume held is not here: the report says so.
            why = (
                f"volume {location.volume} holds other bytes under the number "
                f"of pack {pack_id} of volume {elsewhere}: is it this "
                "archive's volume?"
            )
            logger.error("pack %s: %s", pack_id, why)
            self.work.unreadable[f"{pack_id} on {location.volume}"] = why
            return False
        path = self.folder / "pack.spool"
        try:
            self._read_whole(location, path)
            remote = RemoteFile(f"{location.volume}/{location.position}", location.size)
            merge_pack_file(
                self.work, pack_id, path, remote, self.keys, OFFLINE, location.sha256
            )
        except VolumeNotReachable:
            raise
        except ApplianceError as exc:
            logger.error("pack %s on volume %s: %s", pack_id, location.volume, exc)
            self.work.unreadable[pack_id] = str(exc)
        finally:
            path.unlink(missing_ok=True)
        return True

    def _same_as_read(self, location: PackLocation, volume: str) -> bool:
        """Whether ``location`` holds the bytes of the pack of its number
        read from ``volume``: a copy of the same pack."""
        read = [p for p in self.state.packs[volume] if p["pack_id"] == location.pack_id]
        return any(
            (p["size"], p["sha256"]) == (location.size, location.sha256) for p in read
        )

    def _read_whole(self, location: PackLocation, path: Path) -> None:
        """Copy a pack from its volume as it is; note it when its bytes
        differ from its record (each instance is checked on recall)."""
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "wb") as out:
                for chunk in self.library.read_pack(location, check=False):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    self._report(*self._told)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot write {path}") from exc
        if size == location.size and digest.hexdigest() == location.sha256:
            return
        where = f"volume {location.volume} (position {location.position})"
        if size != location.size:
            why = f"{size} bytes read from {where}, {location.size} recorded"
        else:
            why = f"its bytes on {where} do not match its recorded SHA-256"
        logger.warning("pack %s is damaged: %s", location.pack_id, why)
        self.state.damaged[location.pack_id] = why

    def _report(self, done: int, total: int) -> None:
        self._told = (done, total)
        if self.progress is not None:
            self.progress(done, total)


def _put_in_place(
    rebuilt: Path, catalog_path: Path, map_size: int, online: OnlineTier
) -> Path | None:
    """Move the checked catalog into place; where an empty catalog found
    there was set aside. One rebuilt by an earlier run (from fewer
    volumes) gives way, its online copies carried over."""
    if swap.note_of(catalog_path) is None:
        aside = swap.move_into_place(rebuilt, catalog_path)
        # A run killed between the renames below left the earlier one.
        _drop_superseded(catalog_path, online)
        return aside
    _carry_over(catalog_path, rebuilt, map_size)
    superseded = catalog_path.with_name(catalog_path.name + _SUPERSEDED)
    shutil.rmtree(superseded, ignore_errors=True)
    catalog_path.rename(superseded)
    rebuilt.rename(catalog_path)
    durable.fsync_directory(catalog_path.parent)
    logger.info("catalog rebuilt again, with the volumes loaded since")
    _drop_superseded(catalog_path, online)
    return None


def _carry_over(catalog_path: Path, rebuilt: Path, map_size: int) -> None:
    """Give the rebuilt catalog the online copies the catalog in place
    counts, for every instance whose bytes it records the same."""
    earlier = Catalog(catalog_path, map_size)
    try:
        online = _online_copies(earlier)
    finally:
        earlier.close()
    final = Catalog(rebuilt, map_size)
    try:
        unused = copies.add_copies(final, ONLINE, online)
    finally:
        final.close()
    logger.info(
        "%d online copies carried over, %d not (replaced by a newer pack)",
        len(online) - len(unused),
        len(unused),
    )


def _online_copies(catalog: Catalog) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (online key, SHA-256) of every online copy."""
    found = {}
    with catalog.read() as txn:
        for uid, _data in catalog.all_records(txn, "instances"):
            record = catalog.instance(txn, uid)
            copy = record.copy_on(ONLINE) if record is not None else None
            if record is not None and copy is not None:
                found[uid] = (copy.location, record.sha256)
    return found


def _drop_superseded(catalog_path: Path, online: OnlineTier) -> None:
    """Remove the catalog that gave way to a new one once that one is in
    place, and the online files only it counts."""
    superseded = catalog_path.with_name(catalog_path.name + _SUPERSEDED)
    if not superseded.exists() or swap.note_of(catalog_path) is None:
        return
    removed = 0
    for key in _online_keys(superseded) - _online_keys(catalog_path):
        if online.path_of(key).exists():
            online.remove(key)
            removed += 1
    shutil.rmtree(superseded)
    logger.info("the earlier rebuilt catalog removed, and %d online file(s)", removed)


def _online_keys(path: Path) -> set[str]:
    catalog = Catalog(path, readonly=True)
    try:
        return {key for key, _sha256 in _online_copies(catalog).values()}
    finally:
        catalog.close()
