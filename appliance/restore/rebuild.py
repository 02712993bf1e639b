"""The first phase of a restore: the catalog, rebuilt from the mirror.

Steps, each leaving a state the next run continues from::

    catalog already rebuilt and checked?        -> nothing to do
    catalog.rebuilt checked, not moved yet?     -> move it into place
    otherwise: refuse a catalog holding instances; then
      work catalog (snapshot + journal, or manifests)   restore/work/
      -> fresh catalog in catalog.rebuilt.partial (copy, or export)
      -> nothing queued, numbers after the mirror's (finish)
      -> check -> mark checked -> rename to catalog.rebuilt
      -> move into place

Anything unchecked left by an interrupted run is made again from the start.
It is never opened: written without flushing until it is checked, a copy
killed half way or a power cut leaves it cut short or with pages of
zeros, which LMDB would read past its end (SIGBUS) or refuse as corrupt.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.catalog.store import Catalog
from appliance.errors import CatalogError, StorageError
from appliance.restore import swap
from appliance.restore.adopt import Written, adopt
from appliance.restore.cache import PackCache
from appliance.restore.check import check
from appliance.restore.export import Exported, export, finish, mark_checked
from appliance.restore.mirror import Fetcher, MirrorContents
from appliance.restore.sources import Progress, Sources, Step, WorkCatalog
from appliance.storage import durable
from appliance.storage.keys import KeyStore

logger = logging.getLogger(__name__)


@dataclass
class Rebuild:
    """What the catalog was rebuilt from, and what the mirror could not give."""

    note: dict[str, Any]
    done_before: bool = False  # an earlier run had rebuilt it
    set_aside: Path | None = None
    lost: list[dict[str, str]] = field(default_factory=list)

    @property
    def source(self) -> str:
        return str(self.note.get("source", ""))


def rebuild_catalog(
    catalog_path: Path,
    map_size: int,
    work_folder: Path,
    fetcher: Fetcher,
    contents: MirrorContents,
    keys: KeyStore,
    cache: PackCache,
    scan: bool = False,
    progress: Progress | None = None,
) -> Rebuild:
    """Rebuild the catalog at ``catalog_path`` from the mirror, unless it
    already was (see the module for the steps)."""
    earlier = rebuilt_before(catalog_path)
    if earlier is not None:
        # A run killed once the catalog was in place left the work.
        shutil.rmtree(work_folder, ignore_errors=True)
        return earlier
    rebuilt = swap.rebuilt_path(catalog_path)
    note = swap.note_of(rebuilt)
    if note is None:
        swap.refuse_unless_empty(catalog_path)
        shutil.rmtree(rebuilt, ignore_errors=True)
        shutil.rmtree(work_folder, ignore_errors=True)
        work_folder.mkdir(parents=True)
        sources = Sources(
            fetcher, contents, keys, work_folder, cache, map_size, progress
        )
        work = sources.build(scan)
        written = _writing(work, progress)
        note = write_checked(work, rebuilt, map_size, contents, written=written)
        written(written.count)
    return put_in_place(rebuilt, catalog_path, work_folder, note)


class _Writing:
    """The step of writing the rebuilt catalog, counted in instances as
    they are written (the check after them, and a catalog written anew when
    the copy fails it, are not counted: the step ends with both)."""

    def __init__(self, count: int, progress: Progress | None) -> None:
        self.count = count
        self.progress = progress
        self(0)

    def __call__(self, done: int) -> None:
        if self.progress is not None:
            done = min(done, self.count)
            self.progress(Step("writing the catalog", done, self.count, "instances"))


def _writing(work: WorkCatalog, progress: Progress | None) -> _Writing:
    return _Writing(work.catalog.counts()["instances"], progress)


def rebuilt_before(catalog_path: Path) -> Rebuild | None:
    """What an earlier run rebuilt, if the catalog in place was rebuilt."""
    note = swap.note_of(catalog_path)
    if note is None:
        return None
    logger.info("the catalog was rebuilt already, from %s", note.get("source"))
    return Rebuild(note, done_before=True, lost=note.get("lost", []))


def write_checked(
    work: WorkCatalog,
    rebuilt: Path,
    map_size: int,
    contents: MirrorContents,
    extra: dict[str, Any] | None = None,
    written: Written | None = None,
) -> dict[str, Any]:
    """Write the work catalog as a checked catalog at ``rebuilt``, which
    must not exist (then close the work catalog); its note, with ``extra``
    added to it. It is written beside it and takes its name once marked
    checked: ``rebuilt`` holds a whole catalog or nothing. ``written`` is
    told how many instances are written, as they are."""
    partial = partial_path(rebuilt)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _refuse_if_nothing_opened(work, contents)
        note = _write(work, partial, map_size, contents, extra or {}, written)
    finally:
        work.catalog.close()
    partial.rename(rebuilt)
    durable.fsync_directory(rebuilt.parent)
    return note


def partial_path(rebuilt: Path) -> Path:
    """Where the rebuilt catalog is written until it is marked checked."""
    return rebuilt.with_name(rebuilt.name + ".partial")


def put_in_place(
    rebuilt: Path, catalog_path: Path, work_folder: Path, note: dict[str, Any]
) -> Rebuild:
    """Move the checked catalog into place; the work is no longer needed."""
    aside = swap.move_into_place(rebuilt, catalog_path)
    shutil.rmtree(work_folder, ignore_errors=True)
    return Rebuild(note, set_aside=aside, lost=note.get("lost", []))


@contextmanager
def flushed(folder: Path) -> Iterator[None]:
    """Flush the catalog in ``folder`` (its file and the folder) in a thread
    while the block runs; leave once it is done, raising what it raised."""
    with ThreadPoolExecutor(1, thread_name_prefix="catalog-flush") as pool:
        flushing = pool.submit(_flush, folder)
        try:
            yield
        finally:
            flushing.result()


def _flush(folder: Path) -> None:
    try:
        durable.fsync_file(folder / "data.mdb")
        durable.fsync_directory(folder)
    except OSError as exc:
        raise durable.translate_os_error(exc, f"cannot flush {folder}") from exc


def _refuse_if_nothing_opened(work: WorkCatalog, contents: MirrorContents) -> None:
    """Stop before anything is put in place when the mirror (or the volumes)
    holds packs but the rebuilt catalog knows no instance: with the wrong
    master keys nothing opens, and an empty catalog swapped in would look
    like a restore that succeeded, and would stop the right one."""
    if not contents.packs or work.catalog.counts().get("instances", 0):
        return
    unreadable = len(work.unreadable)
    sealed = len(contents.snapshots) + len(contents.segments)
    others = (
        f"{len(contents.snapshots)} catalog snapshot(s) and "
        f"{len(contents.segments)} journal segment(s) that do not open"
        if sealed
        else "no catalog snapshot or journal"
    )
    raise StorageError(
        f"nothing on {contents.where} opens with the master keys in the key "
        f"store ({unreadable} of {len(contents.packs)} pack(s) unreadable, and "
        f"{others}): import the escrow copy of this archive's keys "
        "(appliance keys import) and run the restore again; nothing was put "
        "in place"
    )


def _write(
    work: WorkCatalog,
    rebuilt: Path,
    map_size: int,
    contents: MirrorContents,
    extra: dict[str, Any],
    written: Written | None = None,
) -> dict[str, Any]:
    """Make, finish, check and mark the rebuilt catalog; its note.

    It is made from a copy of the work catalog; should that copy fail its
    check (a work catalog whose own counts or records were wrong, which a
    copy keeps), it is made again by writing every record anew, which
    counts everything from the instances themselves."""
    try:
        final, exported = adopt(work.catalog, rebuilt, map_size, contents, written)
        return _finished(work, final, exported, contents, extra, map_size)
    except CatalogError as exc:
        logger.warning(
            "the rebuilt catalog copied from the work catalog cannot be used "
            "(%s); writing every record anew instead",
            exc,
        )
    shutil.rmtree(rebuilt, ignore_errors=True)
    final = Catalog(rebuilt, map_size, durable=False)
    try:
        exported = export(work.catalog, final, contents)
    except BaseException:
        final.close()
        raise
    return _finished(work, final, exported, contents, extra, map_size)


def _finished(
    work: WorkCatalog,
    final: Catalog,
    exported: Exported,
    contents: MirrorContents,
    extra: dict[str, Any],
    map_size: int,
) -> dict[str, Any]:
    """Finish, check and mark ``final``, written without flushing (then
    close it); its note."""
    try:
        last_journal = max(work.last_journal, contents.last_journal_number)
        next_pack = max(work.next_pack, contents.highest_pack + 1)
        finish(final, last_journal, next_pack, work.archive)
        # Its pages go to the disk while it is checked; the mark follows
        # once they are there, so that a crash can leave a catalog marked
        # checked only whole.
        with flushed(final.path):
            check(final, contents, exported.instances)
        note = {
            "source": work.source,
            "instances": exported.instances,
            "lost": exported.lost,
            "missing_packs": sorted(exported.missing),
            "unreadable_packs": work.unreadable,
            **extra,
        }
    finally:
        final.close()
    checked = Catalog(final.path, map_size)
    try:
        mark_checked(checked, note)
    finally:
        checked.close()
    logger.info(
        "catalog rebuilt from %s: %d instances; %d never reached the mirror",
        work.source,
        exported.instances,
        len(exported.lost),
    )
    return note
