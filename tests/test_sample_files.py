"""Every file that pydicom ships goes in; valid ones come back byte for byte.

pydicom's data folder holds about two hundred files: good instances in many
transfer syntaxes and character sets, and broken ones (no file meta,
truncated, missing UIDs, not DICOM at all). The oracle for "valid" is
pydicom's own reading plus the known truncated files, not the appliance's
code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests import dicom_client as client
from tests.conftest import (
    PYDICOM_DATA,
    Appliance,
    dcmtk,
    incoming_files,
    require_dcmtk,
)
from tests.datasets import study_files
from tests.ports import held_port, wait_listening

# pydicom reads these without complaint although their last element is cut
# short; pydicom's own tests use them as truncated files.
TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def sample_files() -> list[Path]:
    return sorted(
        path
        for path in PYDICOM_DATA.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    )


@contextmanager
def structural_warnings_fail() -> Iterator[None]:
    """pydicom warnings about a file's structure become errors; element
    values are not judged (an archive keeps them as they are), as in the
    appliance."""
    settings = pydicom.config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        settings.reading_validation_mode = previous


def read(path: Path, **options: object) -> pydicom.Dataset:
    """pydicom's reading of a file, failing on structural warnings."""
    with structural_warnings_fail():
        return pydicom.dcmread(path, **options)


def is_valid(path: Path) -> bool:
    """Whether pydicom sees a whole Part 10 instance with its four UIDs,
    without having to guess at its encoding."""
    if path.name in TRUNCATED:
        return False
    try:
        dataset = read(path)
        with structural_warnings_fail():
            for element in dataset.iterall():
                _ = element.value
    except Exception:
        return False
    if path.read_bytes()[128:132] != b"DICM":
        return False
    meta = dataset.file_meta
    if "TransferSyntaxUID" not in meta:
        return False
    # PS3.5 7.1.1: values, and so data sets, have even lengths.
    if len(client.dataset_bytes(path)) % 2:
        return False
    if not all(str(dataset.get(keyword, "")).strip() for keyword in REQUIRED):
        return False
    # PS3.10 7.1: the file meta names the same instance as the data set.
    return (
        meta.get("MediaStorageSOPInstanceUID"),
        meta.get("MediaStorageSOPClassUID"),
    ) == (
        dataset.SOPInstanceUID,
        dataset.SOPClassUID,
    )


def sendable(path: Path) -> bool:
    """Whether a client can send the file: its file meta names class and syntax."""
    try:
        meta = client.file_meta(path)
    except Exception:
        return False
    needed = (
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
    )
    return all(keyword in meta for keyword in needed)


def expected_outcomes(order: list[Path]) -> tuple[dict[Path, bool], dict[str, Path]]:
    """Which files must be stored, and which file each SOP Instance UID keeps.

    With the default duplicate policy (refuse), the first file with a SOP
    Instance UID wins; a later file with the same UID is accepted only if
    its data set bytes are identical.
    """
    accepted: dict[Path, bool] = {}
    kept: dict[str, Path] = {}
    for path in order:
        if not is_valid(path):
            accepted[path] = False
            continue
        uid = str(read(path, stop_before_pixels=True).SOPInstanceUID)
        if uid not in kept:
            kept[uid] = path
            accepted[path] = True
        else:
            first = client.dataset_bytes(kept[uid])
            accepted[path] = client.dataset_bytes(path) == first
    return accepted, kept


@dataclass
class Stored:
    """An appliance holding every sendable sample file, and the oracle."""

    appliance: Appliance
    statuses: dict[Path, int | None]
    accepted: dict[Path, bool]
    kept: dict[str, Path]
    # The C-MOVE destination the appliance knows, for a storescp to take.
    move_port: int


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """All sendable sample files stored over the network once for the
    module's tests, which only read them back."""
    # Held for the module: storescp listens there only in its test.
    destination = held_port()
    move_port = destination.port
    directory = tmp_path_factory.mktemp("samples")
    appliance = Appliance(
        directory, peers=[{"ae_title": "DEST", "host": "127.0.0.1", "port": move_port}]
    )
    appliance.start()
    try:
        paths = [path for path in sample_files() if sendable(path)]
        statuses = client.store_files(appliance.port, paths)
        accepted, kept = expected_outcomes(list(statuses))
        yield Stored(appliance, statuses, accepted, kept, move_port)
    finally:
        appliance.stop()
        destination.release()


def test_valid_files_stored_and_broken_ones_refused(stored: Stored) -> None:
    appliance, statuses, accepted, kept = (
        stored.appliance,
        stored.statuses,
        stored.accepted,
        stored.kept,
    )
    assert len(statuses) > 150
    wrong = {
        path.name: hex(status) if status is not None else None
        for path, status in statuses.items()
        if (status == 0x0000) != accepted[path]
    }
    assert not wrong, f"unexpected outcome for {wrong}"

    # One log line per refusal: a refused instance, a rejected presentation
    # context or an aborted association.
    log = appliance.log()
    refused = [status for status in statuses.values() if status not in (0, None)]
    assert log.count("refused instance") == len(refused)
    if None in statuses.values():
        assert "presentation context(s) rejected" in log
        assert ": undecodable DIMSE message" in log
    assert appliance.status()["instances"] == len(kept)
    objects = list((appliance.data_dir / "online" / "objects").rglob("*.dcm"))
    assert len(objects) == len(kept)
    assert not incoming_files(appliance.data_dir / "online")


def test_valid_files_come_back_byte_identical_by_c_get(stored: Stored) -> None:
    appliance, kept = stored.appliance, stored.kept
    storage = client.storage_contexts_for(list(kept.values()))
    studies = {
        str(read(path, stop_before_pixels=True).StudyInstanceUID)
        for path in kept.values()
    }
    received: dict[str, bytes] = {}
    for study in sorted(studies):
        identifier = client.study_identifier("STUDY", StudyInstanceUID=study)
        got, responses = client.get(appliance.port, identifier, storage)
        assert int(responses[-1].Status) == 0x0000, study
        received.update(got)

    assert set(received) == set(kept)
    for uid, path in kept.items():
        assert received[uid] == client.dataset_bytes(path), path.name


def test_valid_files_come_back_byte_identical_by_c_move(
    stored: Stored, tmp_path: Path
) -> None:
    require_dcmtk()
    appliance, kept, port = stored.appliance, stored.kept, stored.move_port
    received_dir = tmp_path / "received"
    received_dir.mkdir()

    # storescp +B writes the data set exactly as it arrived.
    receiver = subprocess.Popen(
        [
            "storescp",
            "-aet",
            "DEST",
            "+B",
            "-pm",
            "+xa",
            "-od",
            str(received_dir),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(receiver, port)
        studies = {
            str(read(path, stop_before_pixels=True).StudyInstanceUID)
            for path in kept.values()
        }
        for study in sorted(studies):
            identifier = client.study_identifier("STUDY", StudyInstanceUID=study)
            responses = client.move(appliance.port, identifier, "DEST")
            assert int(responses[-1].Status) == 0x0000, (study, appliance.log()[-2000:])
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)

    received = {
        str(client.file_meta(path).MediaStorageSOPInstanceUID): path
        for path in received_dir.iterdir()
    }
    assert set(received) == set(kept)
    for uid, path in kept.items():
        assert client.dataset_bytes(received[uid]) == client.dataset_bytes(path)


def test_import_stores_valid_files_and_refuses_the_rest(appliance_factory) -> None:
    appliance = appliance_factory()
    appliance.write_config()
    files = sample_files()
    result = appliance.cli("import", *map(str, files), check=False)

    accepted, kept = expected_outcomes(files)
    refused = [path for path, ok in accepted.items() if not ok]
    assert result.returncode == 1, result.stderr
    assert f"{len(files)} file(s)" in result.stdout
    assert f"{len(refused)} refused" in result.stdout
    for path in refused:
        assert f"refused {path}:" in result.stdout
    assert appliance.status()["instances"] == len(kept)


def test_import_counts_every_entry_once_and_never_opens_a_fifo(
    appliance_factory, tmp_path: Path
) -> None:
    appliance = appliance_factory()
    appliance.write_config()
    folder = tmp_path / "cd"
    study_files(folder, "odd-entries", 3, pixel_bytes=2000)
    outside = tmp_path / "notes.txt"
    outside.write_text("not DICOM\n")
    (folder / "readme.txt").write_text("not DICOM either\n")
    (folder / "notes").symlink_to(outside)
    (folder / "gone").symlink_to(tmp_path / "missing")
    (folder / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    # Opened for reading, a FIFO with no writer would block the import.
    os.mkfifo(folder / "pipe")

    command = ["import", str(folder), "--config", str(appliance.config_path)]
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1, result.stderr
    # 8 entries: 5 files read (3 stored, 2 refused), 3 skipped unread.
    assert (
        "5 file(s) read: 3 stored, 0 already there, 0 duplicates resolved by "
        "policy, 2 refused; 3 skipped, not read"
    ) in result.stdout
    assert f"refused {folder / 'notes'}:" in result.stdout
    assert f"skipped {folder / 'pipe'}: not a regular file" in result.stdout
    assert f"skipped {folder / 'gone'}: broken symbolic link" in result.stdout
    assert f"skipped {folder / 'elsewhere'}: symbolic link to a folder" in (
        result.stdout
    )
    assert appliance.status()["instances"] == 3


def test_dcmtk_round_trip(appliance, tmp_path: Path) -> None:
    """storescu in, findscu finds, getscu brings the files back."""
    require_dcmtk()
    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]
    paths = [PYDICOM_DATA / "test_files" / name for name in names]
    port = str(appliance.port)

    echo = dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", port)
    assert echo.returncode == 0, echo.stderr
    stored = dcmtk(
        "storescu", "-R", "-aec", "APPLIANCE", "127.0.0.1", port, *map(str, paths)
    )
    assert stored.returncode == 0, stored.stderr

    found = dcmtk(
        "findscu",
        "-v",
        "-S",
        "-aec",
        "APPLIANCE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientID",
        "127.0.0.1",
        port,
    )
    assert found.returncode == 0, found.stderr
    assert found.stderr.count("(Pending)") == len(paths), found.stderr

    out = tmp_path / "got"
    out.mkdir()
    for path in paths:
        study = str(read(path, stop_before_pixels=True).StudyInstanceUID)
        got = dcmtk(
            "getscu",
            "-S",
            "-aec",
            "APPLIANCE",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            port,
        )
        assert got.returncode == 0, got.stderr
    received = {
        str(client.file_meta(p).MediaStorageSOPInstanceUID) for p in out.iterdir()
    }
    expected = {str(read(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert received == expected
