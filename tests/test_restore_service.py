"""The whole disaster, end to end: a running appliance stores studies sent
over DICOM and replicates them to a real sshd on loopback; its data
directory is deleted; ``appliance restore --from mirror`` rebuilds a new
one; the new appliance answers C-FIND exactly as the old one did, key by
key, and C-GET gives back every instance byte for byte."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from tests import dicom_client as client
from tests.conftest import Appliance
from tests.datasets import study_files
from tests.sshd import Sshd
from tests.test_transports import sftp_settings

STUDY_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ModalitiesInStudy",
    "SOPClassesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
IMAGE_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
)


def _settings(sshd: Sshd, root: Path) -> dict[str, dict[str, object]]:
    mirror = {"kind": "sftp", **sftp_settings(sshd, root)}
    return {
        "mirror": mirror,
        "replication": {"batch_seconds": 1.0},
        "migration": {"enabled": False},
    }


def _wait_until_replicated(node: Appliance, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(node.cli("replication", "status", "--json").stdout)
        if status["queued_instances"] == 0 and status["journal_entries_sent"]:
            return
        time.sleep(0.5)
    raise AssertionError(f"still queued: {status}\n{node.log()[-3000:]}")


def _answers(port: int) -> list[list[dict[str, str]]]:
    """C-FIND at the study, series and image levels, every match."""
    found = []
    for level, keys in (
        ("STUDY", STUDY_KEYS),
        ("SERIES", SERIES_KEYS),
        ("IMAGE", IMAGE_KEYS),
    ):
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for keyword in keys:
            setattr(identifier, keyword, None)
        matches, status = client.find(port, identifier)
        assert status == 0x0000
        rows = [
            {e.keyword: str(e.value) for e in match if e.keyword} for match in matches
        ]
        found.append(sorted(rows, key=lambda row: json.dumps(row, sort_keys=True)))
    return found


def _get_all(port: int, study_uids: list[str], files: list[Path]) -> dict[str, bytes]:
    received: dict[str, bytes] = {}
    for uid in study_uids:
        identifier = client.study_identifier(StudyInstanceUID=uid)
        got, _responses = client.get(
            port, identifier, client.storage_contexts_for(files)
        )
        received.update(got)
    return received


def test_an_archive_lost_and_restored_from_an_sftp_mirror(
    sshd: Sshd, tmp_path: Path, appliance_factory
) -> None:
    mirror_root = tmp_path / "mirror"
    mirror_root.mkdir()
    settings = _settings(sshd, mirror_root)
    lost = appliance_factory(settings, name="lost").start()
    files: list[Path] = []
    for label, date, modality in (
        ("e2e-ct", "20250103", "CT"),
        ("e2e-mr", "20260220", "MR"),
        ("e2e-us", "20251111", "US"),
    ):
        files += study_files(
            tmp_path / label,
            label,
            3,
            study_date=date,
            modality=modality,
            patient_id=f"PID-{label}",
            patient_name=f"Testperson^{label[4:].upper()}",
        )
        assert set(client.store_files(lost.port, files[-3:]).values()) == {0}
        _wait_until_replicated(lost)
    before = _answers(lost.port)
    study_uids = sorted({row["StudyInstanceUID"] for row in before[0]})
    sent = {_uid(path): client.dataset_bytes(path) for path in files}
    escrow = tmp_path / "escrow.txt"
    escrow.write_text(lost.cli("keys", "export").stdout)
    lost.stop()
    shutil.rmtree(lost.data_dir)
    packs = sorted(mirror_root.rglob("*.pack"))

    new = appliance_factory(settings, name="new")
    new.write_config()
    new.cli("keys", "import", str(escrow))
    done = new.cli("restore", "--from", "mirror", check=False)
    assert done.returncode == 0, done.stderr
    assert "rebuilt from catalog/snapshot-" in done.stdout
    assert "restored and verified: 9 instance(s)" in done.stdout
    new.start()

    assert _answers(new.port) == before
    assert _get_all(new.port, study_uids, files) == sent
    assert new.status()["instances"] == 9
    # Replicating again, the new appliance sends no pack the mirror holds,
    # and its first snapshot and journal take names of their own.
    _wait_for_snapshot(new)
    status = json.loads(new.cli("replication", "status", "--json").stdout)
    assert status["queued_instances"] == 0 and status["last_error"] is None
    assert sorted(mirror_root.rglob("*.pack")) == packs


def test_the_restored_appliance_serves_while_the_data_comes_back(
    sshd: Sshd, tmp_path: Path, appliance_factory
) -> None:
    """The catalog first, then the service: it answers C-FIND for the whole
    archive, stores new studies, and gives a study not restored yet at
    once, from the mirror, while the background restore is held at
    ``pause``; let go, the restore finishes in the background."""
    mirror_root = tmp_path / "mirror"
    mirror_root.mkdir()
    settings = _settings(sshd, mirror_root)
    lost = appliance_factory(settings, name="lost").start()
    files: list[Path] = []
    for label, date in (("bg-one", "20260105"), ("bg-two", "20260310")):
        files += study_files(
            tmp_path / label, label, 3, study_date=date, patient_id=f"PID-{label}"
        )
    assert set(client.store_files(lost.port, files).values()) == {0}
    _wait_until_replicated(lost)
    before = _answers(lost.port)
    study_uids = sorted({row["StudyInstanceUID"] for row in before[0]})
    sent = {_uid(path): client.dataset_bytes(path) for path in files}
    escrow = tmp_path / "escrow.txt"
    escrow.write_text(lost.cli("keys", "export").stdout)
    lost.stop()
    shutil.rmtree(lost.data_dir)

    paused = {**settings, "restore": {"timetable": "pause"}}
    new = appliance_factory(paused, name="new")
    new.write_config()
    new.cli("keys", "import", str(escrow))
    done = new.cli("restore", "--from", "mirror", "--background", check=False)
    assert done.returncode == 0, done.stderr
    assert "restores in the background" in done.stdout
    new.start()

    assert _answers(new.port) == before
    deadline = time.monotonic() + 30
    while new.status()["restore"]["state"] != "paused":
        assert time.monotonic() < deadline, new.log()[-3000:]
        time.sleep(0.2)
    restore = new.status()["restore"]
    assert restore["pending"] and restore["bytes_done"] == 0
    assert restore["studies"] == 2 and restore["runner"] == "service"
    assert "paused by restore.timetable" in new.cli("restore", "status").stdout
    later = study_files(tmp_path / "bg-new", "bg-new", 2, patient_id="PID-bg-new")
    assert set(client.store_files(new.port, later).values()) == {0}
    got = _get_all(new.port, study_uids[:1], files)
    assert got == {uid: data for uid, data in sent.items() if uid in got}
    assert len(got) == 3
    assert "recalled: 3 instances staged online" in new.log()

    new.stop()
    new.settings = {**settings, "restore": {"timetable": "off"}}
    new.start()
    deadline = time.monotonic() + 60
    while new.status()["restore"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.5)
    restore = new.status()["restore"]
    assert not restore["pending"] and restore["state"] == "done", new.log()[-3000:]
    assert "finished" in new.cli("restore", "status").stdout
    assert _get_all(new.port, study_uids, files) == sent
    assert new.status()["instances"] == 8
    assert "restore over: 8 instances restored and verified" in new.log()


def _wait_for_snapshot(node: Appliance, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(node.cli("replication", "status", "--json").stdout)
        if status["last_snapshot"] is not None:
            return
        time.sleep(0.5)
    raise AssertionError(f"no snapshot: {status}\n{node.log()[-3000:]}")


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
