"""What the status commands say of instances that wait for the mirror: they
are being sent only while the service that sends them runs; otherwise the
status says that nothing sends them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import overview
from appliance.config import load
from appliance.storage.lock import claim_tier, serving
from tests.test_replicator import Site, built_site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from built_site(tmp_path)


def test_the_listener_lock_tells_whether_the_service_runs(tmp_path: Path) -> None:
    root = tmp_path / "online"
    root.mkdir()
    assert not serving(root)  # never served: no lock file
    claim = claim_tier(root, wait_for_workers=0)
    try:
        assert serving(root)
    finally:
        claim.release()
    assert not serving(root)  # the file is left behind, unlocked
    assert (root / "serve.lock").exists()


def test_waiting_instances_are_sent_only_while_the_service_runs(
    site: Site, tmp_path: Path
) -> None:
    config = load(
        None,
        {
            "storage.data_dir": str(tmp_path / "data"),
            "mirror.kind": "directory",
            "mirror.path": str(site.mirror),
        },
    )
    config.online_path.mkdir(parents=True)
    empty = overview.replication_status(config, site.catalog)
    site.store("waiting", 2)

    stopped = overview.replication_status(config, site.catalog)
    claim = claim_tier(config.online_path, wait_for_workers=0)
    try:
        running = overview.replication_status(config, site.catalog)
    finally:
        claim.release()

    assert empty["state"] == "up to date"
    assert (stopped["state"], stopped["queued_instances"]) == ("not running", 2)
    assert "the service is not running" in stopped["summary"]
    assert overview.mirror_state(config, site.catalog)["state"] == "not running"
    assert (running["state"], running["summary"]) == ("sending", "sending")
