"""DCMTK's getscu against a study whose only copy is on an offline volume
that cannot be read: it gets the failure (0xA702, or 0xB000 when other
instances came) with its comment and the failed instances, then releases
the association cleanly, and the appliance serves the next caller.

getscu (DCMTK 3.6.7) reads only the command of a C-GET response; the
final response's identifier (the Failed SOP Instance UID List) used to
come in a PDU of its own, which getscu then took for the answer to its
A-RELEASE-RQ: "Association Release Failed: 0006:0316 DUL P-Data PDU
arrived", and an abort.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import dicom_client as client
from tests.conftest import Appliance, dcmtk, require_dcmtk
from tests.datasets import study_files, uid
from tests.read_only import read_only
from tests.test_recall_dicom import RULES, Archive

STUDY = "unreadable"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """A running appliance whose one study was moved to volume L00001; no
    mirror holds a copy."""
    require_dcmtk()
    directory = tmp_path / "node"
    directory.mkdir()
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "replication": {"enabled": False},
    }
    appliance = Appliance(directory, settings)
    appliance.start()
    try:
        archive = Archive(appliance, tmp_path)
        labelled = archive.cli("volumes", "label", "L00001", "--capacity", "1G")
        assert labelled.returncode == 0, labelled.stderr
        archive.store_study(STUDY)
        moved = archive.cli("migrate", "--now", rules=RULES["offline"])
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert archive.studies_on("online") == 0
        yield archive
    finally:
        appliance.stop()


def _getscu(archive: Archive, folder: Path, *keys: str) -> str:
    """getscu's log (debug, for the response's comment), once it exited 0."""
    folder.mkdir()
    arguments = ["-d", "+B", "-aec", "APPLIANCE", "-od", str(folder)]
    for key in keys:
        arguments += ["-k", key]
    done = dcmtk("getscu", *arguments, "127.0.0.1", str(archive.appliance.port))
    assert done.returncode == 0, done.stderr
    return done.stderr


def _released_cleanly(said: str) -> None:
    assert "I: Releasing Association" in said
    assert "Release Failed" not in said, said[-2000:]
    assert "Aborting Association" not in said


def _study_keys() -> tuple[str, ...]:
    return ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid('study', STUDY)}")


def test_a_pack_gone_from_its_volume_is_answered_and_released(
    archive: Archive, tmp_path: Path
) -> None:
    (pack,) = archive.volumes.glob("L00001/packs/*.pack")
    pack.unlink()

    said = _getscu(archive, tmp_path / "got", "-S", *_study_keys())

    assert "0xa702: Refused: Out of resources" in said
    assert "[no readable copy of these instances]" in said
    assert "Number of Failed Suboperations    : 4" in said
    _released_cleanly(said)
    assert client.echo(archive.appliance.port) == 0


def test_a_recall_that_fails_is_answered_and_released(
    archive: Archive, tmp_path: Path
) -> None:
    # The pack cannot be copied off its volume: its spool is read only.
    spool = archive.appliance.data_dir / "spool" / "read"
    with read_only(spool):
        said = _getscu(archive, tmp_path / "got", "-S", *_study_keys())

    assert "0xa702: Refused: Out of resources" in said
    assert "[recall failed; the archive's log says why]" in said
    _released_cleanly(said)
    assert client.echo(archive.appliance.port) == 0


def test_some_instances_failed_is_answered_and_released(
    archive: Archive, tmp_path: Path
) -> None:
    """The same patient's other study is online: it comes, the unreadable
    one is counted failed (0xB000)."""
    (pack,) = archive.volumes.glob("L00001/packs/*.pack")
    pack.unlink()
    files = study_files(tmp_path / "online", "online-too", 2, pixel_bytes=3000)
    assert set(client.store_files(archive.appliance.port, files).values()) == {0}

    said = _getscu(
        archive,
        tmp_path / "got",
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=TEST-0001",
    )

    assert "0xb000: Warning: Sub-operations complete" in said
    assert "Number of Completed Suboperations : 2" in said
    assert "Number of Failed Suboperations    : 4" in said
    assert len(list((tmp_path / "got").iterdir())) == 2
    _released_cleanly(said)
