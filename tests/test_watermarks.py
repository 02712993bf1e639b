"""A tiny online tier crosses its high watermark during ingest: the service
releases the least recently used studies that have another verified copy,
down towards the low mark, and keeps every study that has none."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as configuration
from appliance.hsm import jobs
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.datasets import study_files, uid

# Four studies of about 100 kB each on a 400 kB online tier.
CAPACITY = 400_000
COPY_TO_NEARLINE = """
[[rules]]
name = "copy-to-nearline"
action = "copy"
to = "nearline"
"""


class NoRules(Appliance):
    """An appliance whose configuration turns the default rules off, so that
    only the watermarks act."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        self.config_path.write_text("rules = []\n" + text)


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[NoRules]:
    directory = tmp_path / "node"
    directory.mkdir()
    settings = {
        "online": {
            "capacity_bytes": CAPACITY,
            "high_watermark": 60,
            "low_watermark": 30,
        },
        "migration": {"min_copies": 1, "watermark_interval": 1.0},
    }
    node = NoRules(directory, settings)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _store(appliance: Appliance, tmp_path: Path, label: str) -> str:
    files = study_files(tmp_path / label, label, 4, pixel_bytes=24_000)
    assert set(client.store_files(appliance.port, files).values()) == {0}
    return uid("study", label)


def _cli(appliance: Appliance, *args: str, extra: str = "") -> str:
    config = appliance.directory / "cli.toml"
    config.write_text(
        appliance.config_path.read_text().replace("rules = []\n", "") + extra
    )
    done = subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _online_studies(appliance: Appliance) -> int:
    rows = json.loads(_cli(appliance, "tiers", "--json"))
    return next(row["studies"] for row in rows if row["tier"] == "online")


def test_watermark_releases_only_studies_with_copies(
    appliance: NoRules, tmp_path: Path
) -> None:
    copied = [_store(appliance, tmp_path, name) for name in ("wm-a", "wm-b")]
    _cli(appliance, "migrate", "--now", extra=COPY_TO_NEARLINE)
    kept = [_store(appliance, tmp_path, name) for name in ("wm-c", "wm-d")]

    deadline = time.monotonic() + 60
    while _online_studies(appliance) > 2 and time.monotonic() < deadline:
        time.sleep(1)

    assert _online_studies(appliance) == 2
    log = appliance.log()
    for study in copied:
        assert f"study {study} released from online" in log
    for study in kept:
        assert f"study {study} released" not in log
    # Releasing both copied studies leaves the tier above its low mark:
    # the rest have no other copy, and the log says so.
    assert "online" in log and "low watermark" in log


# What shutil.disk_usage reports: ``free`` leaves out the blocks reserved
# for root, so used + free is less than total.
DiskUsage = namedtuple("DiskUsage", ["total", "used", "free"])


def test_usage_without_capacity_leaves_out_the_root_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1000-byte file system with 50 reserved for root: 900 used and 50
    # free to the appliance is 94.7% as df counts it, above a 90% mark.
    disk = DiskUsage(total=1000, used=900, free=50)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: disk)
    config = configuration.load(
        overrides={"storage.data_dir": str(tmp_path), "online.high_watermark": 90}
    )

    usage = jobs.tier_usage(config, {}, "online")

    assert usage is not None
    assert (usage.used, usage.capacity) == (900, 950)
    assert round(usage.percent, 1) == 94.7
    assert "online" in jobs.above_high_watermark(config, {})


def test_usage_with_capacity_counts_the_archive_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: DiskUsage(1000, 900, 50))
    config = configuration.load(
        overrides={
            "storage.data_dir": str(tmp_path),
            "nearline.capacity_bytes": 400,
        }
    )

    usage = jobs.tier_usage(config, {"packbytes.nearline": 100}, "nearline")

    assert usage is not None
    assert (usage.used, usage.capacity) == (100, 400)
