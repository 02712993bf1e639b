"""An appliance that stores and replicates to a mirror, then is lost, and
the new appliance that is restored from that mirror: shared by the
restore tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest

from appliance import config as configuration
from appliance.catalog.query import LEVELS, Query, find
from appliance.catalog.store import Catalog
from appliance.hsm.tiers import Tiers
from appliance.ingest import Ingest
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports import Transport
from appliance.replication.transports.directory import DirectoryTransport
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.online import OnlineTier
from tests.conftest import config_text
from tests.datasets import study_files


def write_config(
    path: Path,
    data_dir: Path,
    mirror: dict[str, object],
    more: dict[str, dict[str, object]] | None = None,
) -> Path:
    settings: dict[str, dict[str, object]] = {
        "storage": {"data_dir": str(data_dir), "reserved_bytes": 0},
        "mirror": mirror,
        # Tests run side by side: none may take the HTTP default, 8080.
        "web": {"enabled": False},
        **(more or {}),
    }
    path.write_text(config_text(settings, []))
    return path


def answers(catalog: Catalog) -> dict[str, list[str]]:
    """Every C-FIND row the catalog gives at every level, all keys."""
    found = {}
    for level in LEVELS:
        rows = find(catalog, Query(level, {}), lambda: False)
        found[level] = sorted(json.dumps(row, sort_keys=True) for row in rows)
    return found


def online_bytes(catalog: Catalog, online_root: Path) -> dict[str, bytes]:
    """Every instance's online file, by SOP Instance UID."""
    online = OnlineTier(online_root)
    found = {}
    with catalog.read() as txn:
        for uid, _data in catalog.all_records(txn, "instances"):
            record = catalog.instance(txn, uid)
            assert record is not None
            copy = record.copy_on("online")
            if copy is not None:
                found[uid] = online.path_of(copy.location).read_bytes()
    return found


@dataclass
class Origin:
    """The appliance before the disaster, driven in this process."""

    folder: Path
    transport: Transport
    mirror_settings: dict[str, object]
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = write_config(
            self.folder / "origin.toml", self.folder / "origin", self.mirror_settings
        )
        config = configuration.load(self.config_path)
        self.config = config
        self.catalog = Catalog(config.catalog_path, 2**26)
        self.online = OnlineTier(config.online_path)
        self.online.open()
        self.keys = KeyStore.create_if_missing(key_store_path(config.data_dir))
        self.ingest = Ingest(self.catalog, self.online, "replace")
        self.replicator = Replicator(
            self.catalog,
            Tiers(self.online, {}, self.keys),
            self.transport,
            config.data_dir / "spool",
            Settings(batch_seconds=0),
        )

    def store(self, label: str, count: int, **attributes: Any) -> list[str]:
        uids = []
        for path in study_files(
            self.folder / "files" / label, label, count, **attributes
        ):
            assert self.ingest.import_file(path, "test").ok
            uids.append(str(pydicom.dcmread(path).SOPInstanceUID))
        return uids

    def replicate(self) -> None:
        """Send everything queued, in one pack."""
        assert self.replicator.send(self.replicator.ready()) is not None

    def escrow(self) -> Path:
        path = self.folder / "escrow.txt"
        path.write_text(self.keys.export_escrow())
        return path

    def lose(self) -> tuple[dict[str, bytes], dict[str, list[str]]]:
        """The disaster: what it held (bytes, C-FIND answers), then gone."""
        self.ingest.close()
        held = online_bytes(self.catalog, self.config.online_path)
        found = answers(self.catalog)
        self.replicator.close()
        self.catalog.close()
        return held, found


def appliance(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class Restored:
    """The new appliance, restored from the mirror by the command line."""

    folder: Path
    mirror_settings: dict[str, object]
    escrow: Path
    settings: dict[str, dict[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = self.folder / "restored"
        self.config_path = write_config(
            self.folder / "restored.toml",
            self.data_dir,
            self.mirror_settings,
            self.settings,
        )
        self.config = configuration.load(self.config_path)
        done = appliance("keys", "import", str(self.escrow), config=self.config_path)
        assert done.returncode == 0, done.stderr

    def restore(self, *options: str) -> subprocess.CompletedProcess[str]:
        return appliance(
            "restore", "--from", "mirror", *options, config=self.config_path
        )

    def catalog(self) -> Catalog:
        return Catalog(self.config.catalog_path, 2**26)

    def held(self) -> tuple[dict[str, bytes], dict[str, list[str]]]:
        catalog = self.catalog()
        try:
            return online_bytes(catalog, self.config.online_path), answers(catalog)
        finally:
            catalog.close()

    def object_files(self) -> list[Path]:
        return [
            p for p in (self.config.online_path / "objects").rglob("*") if p.is_file()
        ]

    def report(self) -> dict[str, Any]:
        reports = sorted((self.data_dir / "restore").glob("report-*.json"))
        return dict(json.loads(reports[-1].read_text()))


@pytest.fixture(scope="session")
def disaster(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, bytes], dict[str, list[str]], dict[str, list[str]]]:
    """A mirror of an archive that is gone: 5 studies in 4 packs, a catalog
    snapshot after the second pack, journal segments after every pack; an
    instance replaced after it was replicated. Kept read-only: each test
    restores from a copy, so that the session's modules share it."""
    folder = tmp_path_factory.mktemp("disaster")
    mirror = folder / "mirror"
    mirror.mkdir()
    origin = Origin(folder, DirectoryTransport(mirror), mirror_settings(mirror))
    studies: dict[str, list[str]] = {}
    studies["ct-old"] = origin.store("ct-old", 3, study_date="20240105")
    studies["mr-new"] = origin.store(
        "mr-new", 2, study_date="20260301", modality="MR", patient_id="P2"
    )
    origin.replicate()
    studies["ct-mid"] = origin.store("ct-mid", 4, study_date="20250610")
    origin.replicate()
    origin.replicator.send_snapshot()
    studies["us-late"] = origin.store(
        "us-late", 2, study_date="20251201", modality="US", patient_name="Roe^Max"
    )
    origin.replicate()
    # The same instance sent again with other bytes (policy replace).
    studies["ct-old"] += origin.store(
        "ct-old", 1, study_date="20240105", pixel_bytes=4096
    )
    studies["cr-last"] = origin.store(
        "cr-last", 2, study_date="20260302", modality="CR"
    )
    origin.replicate()
    origin.escrow()
    held, found = origin.lose()
    shutil.rmtree(folder / "origin")
    return folder, held, found, studies


def mirror_settings(mirror: Path) -> dict[str, object]:
    return {"kind": "directory", "path": str(mirror)}


@pytest.fixture
def site(disaster, tmp_path: Path) -> Iterator[tuple[Restored, Path]]:
    folder = disaster[0]
    mirror = tmp_path / "mirror"
    shutil.copytree(folder / "mirror", mirror)
    yield Restored(tmp_path, mirror_settings(mirror), folder / "escrow.txt"), mirror


def interrupted_summary(said: list[str]) -> tuple[int, int]:
    """The two lines a restore stopped in its data phase ends with, last in
    ``said``: how many instances it restored and verified, how many it did
    not try yet."""
    line = re.fullmatch(
        r"restore interrupted: (\d+) instance\(s\) restored and verified, "
        r"(\d+) not tried yet; report: (\S+)",
        said[-2],
    )
    assert line is not None, said
    assert said[-1] == "run the same command again to continue"
    return int(line[1]), int(line[2])
