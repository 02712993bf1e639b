"""The watched folder: appointment list files dropped in by the RIS.

Every prefetch interval, each ``*.csv`` file in ``prefetch.watch_folder``
that has settled is imported as ``appliance prefetch import`` would, then
moved out of the way: into ``done/`` when recorded, into ``refused/`` with
a ``.errors`` file beside it listing every bad line when not. A file is
moved only after its appointments are committed, so a crash in between
imports it again, which changes nothing.

A file has settled when its size and modification time were the same at
the previous look, one interval ago, and it is older than a few seconds:
a copy that keeps the original's time (``cp -p``, rsync) is still seen
growing. A RIS that writes under another name and renames when done
(the safe way) is imported at the next look. Only regular files are read:
a symbolic link (to a file outside the folder, say) is skipped with a
warning, so that nothing outside the folder ends up in a log.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.log_text import printable
from appliance.prefetch import appointments, listfile

logger = logging.getLogger(__name__)

DONE = "done"
REFUSED = "refused"
# A file modified more recently than this may still be being written.
SETTLE_SECONDS = 10.0


class Settling:
    """What the folder held at the previous look."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, int]] = {}
        self._skipped: set[Path] = set()

    def settled(self, folder: Path, now: float | None = None) -> list[Path]:
        """The list files of ``folder`` unchanged since the previous look."""
        now = time.time() if now is None else now
        if not folder.is_dir():
            logger.error("prefetch.watch_folder %s is not a folder", folder)
            return []
        seen, ready = {}, []
        for path in sorted(folder.glob("*.csv")):
            state = self._state(path)
            if state is None:
                continue
            seen[path] = state
            old_enough = now - state[1] / 1e9 >= SETTLE_SECONDS
            if old_enough and self._seen.get(path) == state:
                ready.append(path)
        self._seen = seen
        return ready

    def _state(self, path: Path) -> tuple[int, int] | None:
        try:
            if path.is_symlink() or not path.is_file():
                if path not in self._skipped:
                    self._skipped.add(path)
                    logger.warning(
                        "watched folder: %s is not a regular file; skipped",
                        printable(path.name),
                    )
                return None
            status = path.stat()
        except OSError:
            return None
        return status.st_size, status.st_mtime_ns


def import_files(catalog: Catalog, paths: list[Path]) -> tuple[int, int]:
    """Import settled list files; (files recorded, files refused)."""
    recorded = refused = 0
    for path in paths:
        if not path.exists():
            continue
        try:
            imported = _import(catalog, path)
        except OSError as exc:
            # done/ or refused/ cannot be made or written to (a file of that
            # name, a full disk): the other files and the planner go on, and
            # the next interval tries this one again.
            logger.error(
                "list file %s left in the watched folder: %s", printable(path.name), exc
            )
            continue
        if imported:
            recorded += 1
        else:
            refused += 1
    return recorded, refused


def _import(catalog: Catalog, path: Path) -> bool:
    try:
        if path.is_symlink():
            return _refuse(path, ["a symbolic link, not a file: not read"])
        text = listfile.load(path, regular_only=True)
    except (OSError, ValueError) as exc:
        return _refuse(path, [f"cannot read it: {exc}"])
    found = listfile.read(text, path.name)
    if found.problems:
        return _refuse(path, found.problems)
    try:
        count = appointments.record(catalog, found.appointments)
    except CatalogError as exc:
        # Left in place: the next interval tries again.
        logger.error("list file %s not imported: %s", printable(path.name), exc)
        return False
    _move(path, DONE)
    logger.info("list file %s: %d appointments recorded", printable(path.name), count)
    return True


def _refuse(path: Path, problems: list[str]) -> bool:
    target = _move(path, REFUSED)
    errors = target.with_name(target.name + ".errors")
    errors.write_text("\n".join(problems) + "\n", encoding="utf-8")
    logger.warning(
        "list file %s refused, nothing imported: %s (all reasons in %s)",
        printable(path.name),
        problems[0],
        printable(str(errors)),
    )
    return False


def _move(path: Path, where: str) -> Path:
    """Move ``path`` into the subfolder ``where``, never over another file:
    a name used before gets the time appended."""
    folder = path.parent / where
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}-{time.strftime('%Y%m%d%H%M%S')}{path.suffix}"
    os.replace(path, target)
    return target
