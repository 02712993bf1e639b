"""Transparent recall through DICOM: studies that live only on nearline or on
an offline volume come back byte for byte through DCMTK's getscu and
movescu; a study on a shelved volume yields an operator request and a clear
failure, then succeeds once the volume is loaded.

The migrations run with ``appliance migrate --now`` beside the running
service, as an administrator would run them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from tests import dicom_client as client
from tests.conftest import Appliance, dcmtk, require_dcmtk
from tests.datasets import study_files, uid
from tests.ports import held_port
from tests.test_retrieve import assert_same_data_sets, dcmtk_storescp, received_files

STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
RULES = {
    "nearline": """
[[rules]]
name = "all-to-nearline"
action = "move"
from = "online"
to = "nearline"
""",
    "offline": """
[[rules]]
name = "all-to-offline"
action = "move"
from = "online"
to = "offline"
""",
}


class Archive:
    """A running appliance, and a way to run its command line beside it."""

    def __init__(self, appliance: Appliance, directory: Path) -> None:
        self.appliance = appliance
        self.directory = directory

    def cli(self, *args: str, rules: str = "") -> subprocess.CompletedProcess[str]:
        config = self.directory / f"cli-{abs(hash(rules))}.toml"
        config.write_text(self.appliance.config_path.read_text() + rules)
        command = [sys.executable, "-m", "appliance", *args, "--config", str(config)]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=300, cwd=self.directory
        )

    def store_study(self, label: str, count: int = 4) -> tuple[str, list[Path]]:
        files = study_files(self.directory / label, label, count, pixel_bytes=30000)
        assert set(client.store_files(self.appliance.port, files).values()) == {0}
        return uid("study", label), files

    def migrate(self, tier: str) -> None:
        done = self.cli("migrate", "--now", rules=RULES[tier])
        assert done.returncode == 0, done.stdout + done.stderr

    def studies_on(self, tier: str) -> int:
        done = self.cli("tiers", "--json")
        assert done.returncode == 0, done.stderr
        rows = {row["tier"]: row for row in json.loads(done.stdout)}
        return int(rows[tier]["studies"])

    @property
    def volumes(self) -> Path:
        return self.appliance.data_dir / "volumes"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    require_dcmtk()
    directory = tmp_path / "node"
    directory.mkdir()
    # Held while the appliance runs: storescp listens only in its test.
    destination = held_port()
    peers = [{"ae_title": "DCMTK", "host": "127.0.0.1", "port": destination.port}]
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "replication": {"batch_seconds": 1.0},
    }
    appliance = Appliance(directory, settings, peers)
    appliance.start()
    try:
        yield Archive(appliance, tmp_path)
    finally:
        appliance.stop()
        destination.release()


def getscu(
    archive: Archive, study: str, folder: Path
) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    return dcmtk(
        "getscu",
        "-S",
        "+B",
        "-aec",
        "APPLIANCE",
        "-od",
        str(folder),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        str(archive.appliance.port),
    )


def test_study_only_on_nearline_comes_back_with_getscu(
    archive: Archive, tmp_path: Path
) -> None:
    study, files = archive.store_study("nearline-get")
    archive.migrate("nearline")
    assert archive.studies_on("online") == 0
    assert archive.studies_on("nearline") == 1

    result = getscu(archive, study, tmp_path / "got")

    assert result.returncode == 0, result.stderr
    assert_same_data_sets(received_files(tmp_path / "got"), files)
    assert archive.studies_on("online") == 1


def test_study_only_on_a_volume_comes_back_with_movescu(
    archive: Archive, tmp_path: Path
) -> None:
    labelled = archive.cli("volumes", "label", "L00001", "--capacity", "1G")
    assert labelled.returncode == 0, labelled.stderr
    study, files = archive.store_study("offline-move")
    archive.migrate("offline")
    assert archive.studies_on("offline") == 1 and archive.studies_on("online") == 0
    destination = tmp_path / "moved"
    destination.mkdir()

    port = archive.appliance.peers[0]["port"]
    with dcmtk_storescp(port, destination):
        result = dcmtk(
            "movescu",
            "-v",
            "-S",
            "-aec",
            "APPLIANCE",
            "-aem",
            "DCMTK",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(archive.appliance.port),
        )

    assert result.returncode == 0, result.stderr
    assert "Received Final Move Response (Success)" in result.stderr
    assert_same_data_sets(received_files(destination), files)


def _move_statuses(archive: Archive, study: str) -> list[Dataset]:
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(STUDY_MOVE)
    assoc = ae.associate("127.0.0.1", archive.appliance.port, ae_title="APPLIANCE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    try:
        return [
            status for status, _ in assoc.send_c_move(identifier, "DCMTK", STUDY_MOVE)
        ]
    finally:
        assoc.release()


def test_shelved_volume_asks_an_operator_then_succeeds(
    archive: Archive, tmp_path: Path
) -> None:
    assert archive.cli("volumes", "label", "L00002", "--capacity", "1G").returncode == 0
    study, files = archive.store_study("shelved")
    archive.migrate("offline")
    # The mirror holds the study too; a shelved volume is still waited for.
    _wait_until_replicated(archive)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (archive.volumes / "L00002").rename(shelf / "L00002")

    statuses = _move_statuses(archive, study)

    final = statuses[-1]
    assert int(final.Status) == 0xA702
    assert "L00002" in str(final.ErrorComment)
    waiting = archive.cli("volumes", "requests")
    assert "load volume L00002" in waiting.stdout

    not_yet = archive.cli("volumes", "loaded", "L00002")
    assert not_yet.returncode == 1 and "not reachable" in not_yet.stderr
    # One piece of advice, the library's own: where the folder goes.
    assert not_yet.stderr.count("put its folder back") == 1
    assert "put it in the library" not in not_yet.stderr
    (shelf / "L00002").rename(archive.volumes / "L00002")
    loaded = archive.cli("volumes", "loaded", "L00002")
    assert loaded.returncode == 0, loaded.stderr
    assert "no open requests" in archive.cli("volumes", "requests").stdout

    result = getscu(archive, study, tmp_path / "got")
    assert result.returncode == 0, result.stderr
    assert_same_data_sets(received_files(tmp_path / "got"), files)


def _wait_until_replicated(archive: Archive, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(archive.cli("replication", "status", "--json").stdout)
        if status["queued_instances"] == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"still queued: {status}")


def test_volume_verify_reads_every_pack(archive: Archive) -> None:
    assert archive.cli("volumes", "label", "L00003", "--capacity", "1G").returncode == 0
    archive.store_study("verify-a")
    archive.store_study("verify-b")
    archive.migrate("offline")

    listed = archive.cli("volumes", "list")
    verified = archive.cli("volumes", "verify", "L00003")

    assert "L00003" in listed.stdout and "loaded" in listed.stdout
    assert verified.returncode == 0, verified.stderr
    assert "2 pack(s) read, 0 bad" in verified.stdout
