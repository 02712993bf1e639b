"""Operator requests: one per volume, gathering the studies that wait."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.catalog import requests
from appliance.catalog.store import Catalog


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(tmp_path / "catalog", map_size=2**24)
    yield catalog
    catalog.close()


def test_one_request_per_volume_gathers_studies(catalog: Catalog) -> None:
    requests.request_volume(catalog, "L00042", "recall", "1.2.3")
    requests.request_volume(catalog, "L00042", "recall", "1.2.4")
    requests.request_volume(catalog, "L00042", "recall", "1.2.3")
    requests.request_volume(catalog, "L00007", "recall", "1.2.5")

    found = requests.open_requests(catalog)

    assert [r.volume for r in found] == ["L00042", "L00007"]
    assert found[0].studies == ["1.2.3", "1.2.4"]
    assert "load volume L00042" in found[0].describe()


def test_loading_closes_the_request(catalog: Catalog) -> None:
    requests.request_volume(catalog, "L00042", "recall", "1.2.3")

    waiting = requests.close_volume_requests(catalog, "L00042")

    assert waiting == ["1.2.3"]
    assert requests.open_requests(catalog) == []
    assert requests.close_volume_requests(catalog, "L00042") == []


def test_requests_survive_reopening(tmp_path: Path) -> None:
    first = Catalog(tmp_path / "catalog", map_size=2**24)
    requests.request_volume(first, "L00042", "recall", "1.2.3")
    first.close()

    second = Catalog(tmp_path / "catalog", map_size=2**24)
    try:
        assert [r.studies for r in requests.open_requests(second)] == [["1.2.3"]]
    finally:
        second.close()
