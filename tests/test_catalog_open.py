"""Opening the catalog: a catalog written by an older version, and a folder
that holds none."""

from __future__ import annotations

import random
from pathlib import Path

import lmdb
import pytest

from appliance.catalog import patients
from appliance.catalog.bulk import BulkLoad
from appliance.catalog.records import patient_key
from appliance.catalog.store import POINTERS_BY_TARGET, Catalog
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


def _without_pointer_index(path: Path) -> None:
    """Merges made, then the catalog as a version without the index of
    pointers left it: the pointers in ``merged``, no index."""
    catalog = Catalog(path, 2**24)
    try:
        with catalog.env.begin(write=True) as txn:
            for survivor, retired in (("B", "A"), ("C", "B"), ("C", "X"), ("E", "D")):
                patients.merge(catalog, txn, (survivor, ""), (retired, ""), {}, "A40")
    finally:
        catalog.close()
    env = lmdb.open(str(path), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(POINTERS_BY_TARGET.encode(), txn=txn), delete=True)
    env.close()


def _pointer_index(catalog: Catalog) -> list[tuple[bytes, bytes]]:
    with catalog.read() as txn:
        index = catalog.db[POINTERS_BY_TARGET]
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=index)]


@pytest.mark.parametrize("readonly", [False, True])
def test_an_older_catalog_gets_the_index_of_its_pointers(
    tmp_path: Path, readonly: bool
) -> None:
    path = tmp_path / "catalog"
    _without_pointer_index(path)

    catalog = Catalog(path, 2**24, readonly=readonly)
    try:
        indexed = _pointer_index(catalog)
    finally:
        catalog.close()

    a, b, c, d, e, x = (patient_key(p, "").encode() for p in "ABCDEX")
    assert indexed == [(c, a), (c, b), (c, x), (e, d)]
    # Merges made after the upgrade move the pointers it indexed.
    catalog = Catalog(path, 2**24)
    try:
        with catalog.env.begin(write=True) as txn:
            patients.merge(catalog, txn, ("F", ""), ("C", ""), {}, "A47")
        f = patient_key("F", "").encode()
        assert _pointer_index(catalog) == [(e, d), (f, a), (f, b), (f, c), (f, x)]
    finally:
        catalog.close()


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
