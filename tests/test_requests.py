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


def test_loading_names_the_studies_and_their_recalls_close_the_request(
    catalog: Catalog,
) -> None:
    requests.request_volume(catalog, "L00042", "recall", "1.2.3")
    requests.request_volume(catalog, "L00042", "recall", "1.2.4")

    waiting = requests.volume_loaded(catalog, "L00042")

    assert waiting == ["1.2.3", "1.2.4"]
    # Until each study's recall has run, it is still asked for.
    assert [r.studies for r in requests.open_requests(catalog)] == [waiting]
    requests.study_recalled(catalog, "1.2.3")
    assert requests.volume_loaded(catalog, "L00042") == ["1.2.4"]
    requests.study_recalled(catalog, "1.2.4")
    assert requests.open_requests(catalog) == []
    assert requests.volume_loaded(catalog, "L00042") == []


def test_a_recall_that_still_waits_for_the_volume_keeps_its_study(
    catalog: Catalog,
) -> None:
    requests.request_volume(catalog, "L00042", "recall", "1.2.3")
    requests.request_volume(catalog, "L00007", "recall", "1.2.3")

    requests.study_recalled(catalog, "1.2.3", ["L00007"])

    assert [(r.volume, r.studies) for r in requests.open_requests(catalog)] == [
        ("L00007", ["1.2.3"])
    ]


def test_a_request_no_study_waits_for_closes_when_loaded(catalog: Catalog) -> None:
    requests.request_volume(catalog, "L00042", "a restore must read it")

    assert requests.volume_loaded(catalog, "L00042") == []
    assert requests.open_requests(catalog) == []


def test_requests_survive_reopening(tmp_path: Path) -> None:
    first = Catalog(tmp_path / "catalog", map_size=2**24)
    requests.request_volume(first, "L00042", "recall", "1.2.3")
    first.close()

    second = Catalog(tmp_path / "catalog", map_size=2**24)
    try:
        assert [r.studies for r in requests.open_requests(second)] == [["1.2.3"]]
    finally:
        second.close()
