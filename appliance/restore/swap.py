"""Moving a checked, rebuilt catalog into place.

The rebuilt catalog is written in a folder beside the catalog's
(``catalog.rebuilt.partial``, renamed ``catalog.rebuilt`` once it passed
its check, which it records in itself) and renamed to the catalog's name
only then. A catalog already there is set
aside (``catalog.before-restore-TIME``), never deleted, and only if it
holds no instance: a restore never replaces an archive. A crash between
the two renames leaves no catalog and a checked one beside it: the next
run finishes the move.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from appliance.catalog.store import Catalog, catalog_exists
from appliance.errors import ApplianceError, StorageError
from appliance.restore.export import rebuilt_note
from appliance.storage import durable

logger = logging.getLogger(__name__)


def rebuilt_path(catalog_path: Path) -> Path:
    """Where the rebuilt catalog is written before it is moved into place."""
    return catalog_path.with_name(catalog_path.name + ".rebuilt")


def note_of(path: Path) -> dict[str, Any] | None:
    """The rebuild note of the catalog at ``path``; None if there is no
    catalog there, or one that was not rebuilt and checked."""
    if not catalog_exists(path):
        return None
    try:
        catalog = Catalog(path, readonly=True)
    except ApplianceError as exc:
        logger.warning("%s cannot be read: %s", path, exc)
        return None
    try:
        return rebuilt_note(catalog)
    finally:
        catalog.close()


def refuse_unless_empty(catalog_path: Path) -> None:
    """Stop a restore onto an appliance whose catalog holds instances."""
    if not catalog_exists(catalog_path):
        return
    catalog = Catalog(catalog_path, readonly=True)
    try:
        held = catalog.counts()["instances"]
    finally:
        catalog.close()
    if held:
        raise StorageError(
            f"the catalog at {catalog_path} holds {held} instance(s): a restore "
            "rebuilds an empty appliance only (give it a new data directory)"
        )


def move_into_place(rebuilt: Path, catalog_path: Path) -> Path | None:
    """Rename the checked ``rebuilt`` catalog to ``catalog_path``; returns
    where an empty catalog found there was set aside."""
    if note_of(rebuilt) is None:
        raise StorageError(f"{rebuilt} was not checked; it is not moved into place")
    aside = None
    if catalog_path.exists():
        refuse_unless_empty(catalog_path)
        aside = catalog_path.with_name(
            f"{catalog_path.name}.before-restore-{int(time.time())}"
        )
        catalog_path.rename(aside)
        logger.info("the empty catalog found was set aside as %s", aside)
    rebuilt.rename(catalog_path)
    durable.fsync_directory(catalog_path.parent)
    logger.info("rebuilt catalog moved into place at %s", catalog_path)
    return aside
