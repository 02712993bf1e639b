"""Opening the catalog: a catalog written by an older version, and a folder
that holds none."""

from __future__ import annotations

import random
from pathlib import Path

import lmdb
import pytest

from appliance.catalog.bulk import BulkLoad
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from tests.test_catalog_bulk import _instances


def test_a_catalog_from_an_older_version_opens_read_only(tmp_path: Path) -> None:
    """Databases added since are made when an older catalog is opened for
    reading; a folder that holds no catalog is not made into one."""
    path = tmp_path / "catalog"
    Catalog(path, 2**24).close()
    env = lmdb.open(str(path), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"commitments", txn=txn), delete=True)
    env.close()

    catalog = Catalog(path, 2**24, readonly=True)
    try:
        with catalog.read() as txn:
            assert txn.stat(catalog.db["commitments"])["entries"] == 0
    finally:
        catalog.close()
    (tmp_path / "empty").mkdir()
    lmdb.open(str(tmp_path / "empty")).close()
    with pytest.raises(CatalogError, match="holds no catalog"):
        Catalog(tmp_path / "empty", 2**24, readonly=True)


def test_a_full_catalog_says_which_setting_to_raise(tmp_path: Path) -> None:
    items = _instances(random.Random(3), 120)
    for write in ("writer", "bulk"):
        catalog = Catalog(tmp_path / write, map_size=64 * 1024)
        try:
            with pytest.raises(CatalogError, match=r"raise storage\.catalog_max_size"):
                if write == "writer":
                    catalog.record(items, "refuse")
                else:
                    load = BulkLoad(catalog)
                    for item in items:
                        load.add(item)
                    load.commit()
            # Nothing of the failed write counts.
            assert catalog.counts()["instances"] == 0
        finally:
            catalog.close()
