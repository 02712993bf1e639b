"""Crash test: ``appliance migrate --now`` killed (SIGKILL) at random
instants, again and again; after each kill every instance still has a
verified copy, every copy the catalog counts reads back with the right
checksum, and a last run finishes the work.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.config import load
from appliance.hsm.tiers import Tiers, open_tiers
from appliance.ingest import Ingest
from appliance.storage.online import OnlineTier
from appliance.storage.volumes import DirectoryLibrary
from tests.datasets import study_files

APPLIANCE = (sys.executable, "-m", "appliance")
STUDIES = 12
KILLS = 8
CONFIG = """
[storage]
data_dir = "{data_dir}"
reserved_bytes = 0

[migration]
min_copies = 1
rate_mb_per_s = 0

[[rules]]
name = "keep-a-volume-copy"
action = "copy"
to = "offline"

[[rules]]
name = "then-to-nearline"
action = "move"
from = "online"
to = "nearline"
"""


def _archive(tmp_path: Path) -> Path:
    """A data directory with a few stored studies and one labelled volume."""
    data_dir = tmp_path / "data"
    config_path = tmp_path / "appliance.toml"
    config_path.write_text(CONFIG.format(data_dir=data_dir))
    config = load(config_path)

    online = OnlineTier(config.online_path)
    online.open()
    catalog = Catalog(config.catalog_path, map_size=2**28)
    ingest = Ingest(catalog, online, "refuse")
    try:
        for number in range(STUDIES):
            label = f"crash-{number}"
            files = study_files(tmp_path / label, label, 16, pixel_bytes=400_000)
            for path in files:
                _add_noise(path, number)
                assert ingest.import_file(path, "test").ok
    finally:
        ingest.close()
        catalog.close()
    DirectoryLibrary(Path(config.volume_settings()["path"])).label("L00001", 2**30)
    return config_path


def _add_noise(path: Path, seed: int) -> None:
    """Pixel data that compresses like an image's, not like a pattern, so
    that packing takes as long as it would."""
    dataset = pydicom.dcmread(path)
    noise = random.Random(f"{seed}{path.name}").randbytes(len(dataset.PixelData))
    dataset.PixelData = bytes(b & 0x0F for b in noise)
    dataset.save_as(path)


def _migrate(config_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*APPLIANCE, "migrate", "--now", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _check_every_copy(config_path: Path) -> dict[str, int]:
    """Every instance has a verified copy and every counted copy reads back
    right; returns how many studies are wholly on each tier."""
    config = load(config_path)
    catalog = Catalog(config.catalog_path, map_size=2**28)
    try:
        tiers = open_tiers(config)
        on_tier: dict[str, int] = {}
        for study in copies.all_study_copies(catalog):
            records = copies.instances_of(catalog, study.study_uid)
            assert len(records) == study.instances
            for record in records:
                verified = [c for c in record.copies if c.verified]
                assert verified, f"{record.sop_instance_uid} has no verified copy"
                for copy in verified:
                    assert _copy_bytes_digest(catalog, tiers, record, copy) == (
                        record.sha256
                    ), f"{copy.tier} copy of {record.sop_instance_uid} is wrong"
            for tier, count in study.copies.items():
                assert count == sum(1 for r in records if r.copy_on(tier))
                if count == study.instances:
                    on_tier[tier] = on_tier.get(tier, 0) + 1
        return on_tier
    finally:
        catalog.close()


def _copy_bytes_digest(catalog: Catalog, tiers: Tiers, record, copy) -> str:
    if copy.tier == "online":
        return hashlib.sha256(
            tiers.online.path_of(copy.location).read_bytes()
        ).hexdigest()
    with catalog.read() as txn:
        pack = catalog.get(txn, "packs", copy.location.partition("/")[0])
    assert pack is not None, f"copy {copy.location} names an unknown pack"
    tier = tiers.packs[copy.tier]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "instance.dcm"
        reader_context = tier.reader(
            pack["location"], pack["pack_id"], pack["size"], pack["sha256"], tiers.keys
        )
        with reader_context as reader:
            reader.extract_to(record.sop_instance_uid, out)
        return hashlib.sha256(out.read_bytes()).hexdigest()


def test_migration_killed_at_random_instants_loses_nothing(tmp_path: Path) -> None:
    config_path = _archive(tmp_path)
    rng = random.Random(20261204)
    kills = 0

    for _ in range(KILLS):
        process = _migrate(config_path)
        time.sleep(rng.uniform(0.5, 1.1))
        if process.poll() is not None:
            break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        _check_every_copy(config_path)

    final = _migrate(config_path)
    assert final.wait(timeout=300) == 0
    on_tier = _check_every_copy(config_path)
    assert on_tier.get("nearline") == STUDIES
    assert on_tier.get("offline") == STUDIES
    assert "online" not in on_tier
    # The kills must have landed in the middle of the work, not after it.
    assert kills >= 3
