"""One catalog, one running appliance: a second ``appliance serve`` with
its own data directory and online tier but the same
``storage.catalog_path`` (a configuration copied with that key) stops at
once, as one on the same online tier does. Running, it would take every
instance the other stored for missing from its own online tier."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_second_appliance_on_the_same_catalog_does_not_start(
    appliance_factory, tmp_path: Path
) -> None:
    catalog = tmp_path / "one-catalog"
    catalog.mkdir()  # a folder the configuration names is never made
    settings = {"storage": {"catalog_path": str(catalog)}}
    first = appliance_factory(settings, name="first").start()
    second = appliance_factory(settings, name="second")

    with pytest.raises(RuntimeError, match="appliance exited") as refused:
        second.start()

    assert f"another appliance already serves the catalog at {catalog}" in str(
        refused.value
    )
    assert first.process is not None and first.process.poll() is None
    first.stop()
    second.start()
    assert second.status()["instances"] == 0
