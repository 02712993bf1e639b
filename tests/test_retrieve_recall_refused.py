"""A C-GET of a study that is not online, when its recall fails on the
online tier (its recall folder read only, or full): the requester gets a
final status saying so, not an aborted association, and the service
serves the next request."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_NEARLINE


def read_only(folder: Path) -> None:
    for command in (
        ["mount", "--bind", str(folder), str(folder)],
        ["mount", "-o", "remount,ro,bind", str(folder)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)
            pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")


@pytest.fixture
def archive(appliance_factory, tmp_path: Path) -> Iterator[Appliance]:
    """A running appliance with one study moved to nearline."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    files = study_files(tmp_path / "study", "refused", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(appliance.config_path.read_text() + MOVE_TO_NEARLINE)
    command = [sys.executable, "-m", "appliance", "migrate", "--now"]
    moved = subprocess.run(
        [*command, "--config", str(rules)], capture_output=True, text=True
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    notes = appliance.data_dir / "online" / "recalls"
    notes.mkdir(exist_ok=True)
    read_only(notes)
    try:
        yield appliance
    finally:
        subprocess.run(["umount", "-l", str(notes)], check=False)


def test_a_recall_refused_online_is_answered(archive: Appliance) -> None:
    identifier = dicom_client.study_identifier(StudyInstanceUID=uid("study", "refused"))
    storage = dicom_client.all_storage_contexts()

    received, responses = dicom_client.get(archive.port, identifier, storage)

    assert received == {}
    assert [r.Status for r in responses] == [0xA702]
    assert responses[-1].ErrorComment == "recall failed; the archive's log says why"
    assert dicom_client.echo(archive.port) == 0
