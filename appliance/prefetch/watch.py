"""The watched folder: appointment list files dropped in by the RIS.

Every prefetch interval, each ``*.csv`` file in ``prefetch.watch_folder``
that has not changed for a while (the RIS may still be writing it) is
imported as ``appliance prefetch import`` would, then moved out of the
way: into ``done/`` when recorded, into ``refused/`` with a ``.errors``
file beside it listing every bad line when not. A file is moved only after
its appointments are committed, so a crash in between imports it again,
which changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.prefetch import appointments, listfile

logger = logging.getLogger(__name__)

DONE = "done"
REFUSED = "refused"
# A file modified more recently than this may still be being written.
SETTLE_SECONDS = 10.0


def import_dropped(
    catalog: Catalog, folder: Path, now: float | None = None
) -> tuple[int, int]:
    """Import the settled list files of ``folder``; (files recorded, files
    refused)."""
    now = time.time() if now is None else now
    recorded = refused = 0
    for path in sorted(folder.glob("*.csv")):
        try:
            settled = now - path.stat().st_mtime >= SETTLE_SECONDS
        except FileNotFoundError:
            continue
        if not settled:
            continue
        if _import(catalog, path):
            recorded += 1
        else:
            refused += 1
    return recorded, refused


def _import(catalog: Catalog, path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _refuse(path, [f"cannot read it: {exc}"])
    found = listfile.read(text, path.name)
    if found.problems:
        return _refuse(path, found.problems)
    try:
        count = appointments.record(catalog, found.appointments)
    except CatalogError as exc:
        # Left in place: the next interval tries again.
        logger.error("list file %s not imported: %s", path.name, exc)
        return False
    _move(path, DONE)
    logger.info("list file %s: %d appointments recorded", path.name, count)
    return True


def _refuse(path: Path, problems: list[str]) -> bool:
    target = _move(path, REFUSED)
    errors = target.with_name(target.name + ".errors")
    errors.write_text("\n".join(problems) + "\n", encoding="utf-8")
    logger.warning(
        "list file %s refused, nothing imported: %s (all reasons in %s)",
        path.name,
        problems[0],
        errors,
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
