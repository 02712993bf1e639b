"""Keeping the archive's id where the volumes read it (the data directory)
the same as the catalog's, and making it for the first volume labelled.

The catalog's id is the archive's (the mirror's identity marker names it
and a restore brings it back); the data directory's copy
(:mod:`appliance.storage.archive_id`) follows it. Where only the copy
exists (volumes labelled before the catalog was made), the catalog takes
it.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from appliance.catalog.archive import archive_id, keep_archive_id
from appliance.catalog.store import Catalog, catalog_exists
from appliance.config import Config
from appliance.storage.archive_id import read_archive_id, write_archive_id

logger = logging.getLogger(__name__)


def known_archive(data_dir: Path, catalog: Catalog | None) -> str:
    """The archive id, the catalog's and the data directory's made the same;
    empty when neither has one. The catalog's wins: volumes labelled under
    a copy that differed (a data directory copied from another appliance)
    are named in a warning, as they are then refused."""
    kept = read_archive_id(data_dir)
    recorded = archive_id(catalog) if catalog is not None else ""
    if catalog is not None and kept and not recorded:
        recorded = keep_archive_id(catalog, kept)
    if recorded and kept != recorded:
        if kept:
            logger.warning(
                "the archive id in %s (%s) is not the catalog's (%s): the "
                "catalog's is kept; volumes labelled under %s are refused as "
                "another archive's",
                data_dir,
                kept,
                recorded,
                kept,
            )
        write_archive_id(data_dir, recorded)
    return recorded or kept


def archive_for_labels(data_dir: Path, catalog: Catalog | None) -> str:
    """The archive id to write in a new volume's label, made now if the
    appliance has none yet (kept in the catalog, when there is one, and in
    the data directory)."""
    known = known_archive(data_dir, catalog)
    if known:
        return known
    made = str(uuid.uuid4())
    if catalog is not None:
        made = keep_archive_id(catalog, made)
    write_archive_id(data_dir, made)
    logger.info("archive id %s made for the volume labels", made)
    return made


def archive_of(config: Config, make: bool = False) -> str:
    """:func:`known_archive` (``make``: :func:`archive_for_labels`) for the
    appliance ``config`` describes, its catalog opened for it if there is
    one (a command run before the first start finds none)."""
    step = archive_for_labels if make else known_archive
    if not catalog_exists(config.catalog_path):
        return step(config.data_dir, None)
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        return step(config.data_dir, catalog)
    finally:
        catalog.close()
