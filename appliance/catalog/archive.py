"""The archive's id as the catalog keeps it (``mirror.archive_id`` in
``meta``): a random UUID, the same one the mirror's identity marker and
the labels of the offline volumes name. Catalog snapshots carry it. It is
read and recorded here only: whichever of replication and the first
volume label comes first makes it, and the other takes it."""

from __future__ import annotations

import logging

import lmdb

from appliance.catalog.store import Catalog
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

KEY = b"mirror.archive_id"


def archive_id(catalog: Catalog) -> str:
    """The archive id the catalog records; empty when it has none yet."""
    with catalog.read() as txn:
        raw = txn.get(KEY, db=catalog.db["meta"])
    return bytes(raw).decode() if raw is not None else ""


def keep_archive_id(catalog: Catalog, proposed: str) -> str:
    """Record ``proposed`` as the archive id unless the catalog has one;
    the id it has then. One transaction: two processes that propose an id
    at once end with the same one."""
    try:
        with catalog.env.begin(write=True, db=catalog.db["meta"]) as txn:
            raw = txn.get(KEY)
            if raw is not None:
                return bytes(raw).decode()
            txn.put(KEY, proposed.encode())
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record the archive id: {exc}") from exc
    logger.info("archive id %s recorded in the catalog", proposed)
    return proposed
