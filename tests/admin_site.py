"""A running appliance with web accounts for the admin API and dashboard
tests, its command line, and a volume taken off to the shelf."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.web_site import Site, accounts

OFFLINE_RULE = """
[[rules]]
name = "all-to-offline"
action = "move"
from = "online"
to = "offline"
"""
JSON = {"Content-Type": "application/json"}


class AdminSite(Site):
    """The running appliance, its command line, and shelving volumes."""

    def cli(self, *args: str, rules: str = "") -> subprocess.CompletedProcess[str]:
        config = self.appliance.directory / f"cli-{len(rules)}.toml"
        config.write_text(self.appliance.config_path.read_text() + rules)
        command = [sys.executable, "-m", "appliance", *args, "--config", str(config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    def cli_json(self, *args: str) -> object:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def shelved_study(self, label: str) -> tuple[str, Path]:
        """A study moved to a new volume ``label``, whose folder is then
        taken off the library (the shelf); the study's UID and the shelf."""
        labelled = self.cli("volumes", "label", label, "--capacity", "1G")
        assert labelled.returncode == 0, labelled.stderr
        folder = self.appliance.directory / label
        files = study_files(folder, label, 2, pixel_bytes=4000)
        stored = dicom_client.store_files(self.appliance.port, files)
        assert set(stored.values()) == {0}
        moved = self.cli("migrate", "--now", rules=OFFLINE_RULE)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        # One move planned, done as a copy and a release.
        assert "1 planned step(s) run: 1 copy(ies) made, 1 release(s)" in moved.stdout
        shelf = self.appliance.directory / "shelf"
        shelf.mkdir(exist_ok=True)
        (self.volumes / label).rename(shelf / label)
        return uid("study", label), shelf

    @property
    def volumes(self) -> Path:
        return self.appliance.data_dir / "volumes"


def start_admin_site(
    directory: Path, more: dict[str, dict[str, object]] | None = None
) -> Iterator[AdminSite]:
    settings: dict[str, dict[str, object]] = {
        "web": {"accounts": accounts()},
        "migration": {"enabled": False, "min_copies": 1},
        "replication": {"batch_seconds": 1.0},
    }
    for section, keys in (more or {}).items():
        settings.setdefault(section, {}).update(keys)
    appliance = Appliance(directory, settings)
    appliance.start()
    try:
        yield AdminSite(appliance)
    finally:
        appliance.stop()
