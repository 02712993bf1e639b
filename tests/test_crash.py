"""kill -9 during a stream of stores, and plain restarts: nothing acknowledged
is lost, nothing half-stored is counted, answers stay the same."""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import psutil
from pydicom.dataset import Dataset

from tests import datasets
from tests import dicom_client as client
from tests.conftest import incoming_files


def _sender(
    port: int,
    folder: Path,
    written: list[Path],
    acknowledged: list[Path],
    stop: threading.Event,
) -> None:
    """Store up to 300 instances of one study, one association per 20, until
    told to stop or killed. Each 20 are written just before they are sent:
    the kill lands after a few of them, and writing every file up front
    took a third of the test's time."""
    study, series = (
        datasets.uid("study", folder.name),
        datasets.uid("series", folder.name),
    )
    for start in range(0, 300, 20):
        if stop.is_set():
            return
        chunk = [
            datasets.write(
                datasets.instance(study, series, number, pixel_bytes=20000), folder
            )
            for number in range(start + 1, start + 21)
        ]
        written += chunk
        try:
            statuses = client.store_files(port, chunk)
        except Exception:
            # The appliance died under us; whatever was answered counts.
            return
        acknowledged += [path for path, status in statuses.items() if status == 0]


def _instances_in_catalog(port: int) -> set[str]:
    identifier = client.study_identifier("IMAGE", SOPInstanceUID="")
    identifier.StudyInstanceUID = ""
    matches, status = client.find(port, identifier)
    assert status == 0x0000
    return {str(m.SOPInstanceUID) for m in matches}


def test_kill_9_during_stores_loses_nothing_acknowledged(appliance_factory, tmp_path):
    appliance = appliance_factory(workers=2).start()
    written: list[Path] = []
    acknowledged: list[Path] = []
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_sender,
            args=(appliance.port, tmp_path / f"crash-{n}", written, acknowledged, stop),
        )
        for n in range(3)
    ]
    for thread in threads:
        thread.start()

    # Kill at a random instant once stores are flowing.
    deadline = time.monotonic() + 60
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    appliance.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(acknowledged) >= 40
    # The kill must have landed in the middle of the stream.
    assert len(acknowledged) < 3 * 300

    appliance.start()
    present = _instances_in_catalog(appliance.port)
    expected = {
        str(client.file_meta(path).MediaStorageSOPInstanceUID) for path in acknowledged
    }
    assert expected <= present, f"lost {len(expected - present)} acknowledged instances"

    # Everything counted is intact: fetch it all back and compare bytes.
    by_uid = {
        str(client.file_meta(path).MediaStorageSOPInstanceUID): path for path in written
    }
    identifier = client.study_identifier(
        "IMAGE", SOPInstanceUID="\\".join(sorted(present))
    )
    got, responses = client.get(
        appliance.port,
        identifier,
        [(datasets.CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])],
    )
    assert int(responses[-1].Status) == 0x0000
    assert set(got) == present
    for uid, raw in got.items():
        assert raw == client.dataset_bytes(by_uid[uid])

    # No half-received file survives, and every file on disk that the
    # catalog counts is there.
    online = appliance.data_dir / "online"
    assert not incoming_files(online)
    assert appliance.status()["instances"] == len(present)


def test_restart_gives_the_same_answers(appliance_factory, tmp_path):
    appliance = appliance_factory().start()
    paths = datasets.study_files(tmp_path / "a", "restart-a", 5, patient_id="TEST-0002")
    paths += datasets.study_files(
        tmp_path / "b", "restart-b", 3, patient_id="TEST-0003", modality="MR"
    )
    assert set(client.store_files(appliance.port, paths).values()) == {0}

    def answers() -> list[tuple[str, ...]]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        for keyword in (
            "StudyInstanceUID",
            "PatientID",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances",
            "StudyDate",
        ):
            setattr(identifier, keyword, "")
        matches, status = client.find(appliance.port, identifier)
        assert status == 0
        return sorted(
            tuple(
                str(m.get(k, ""))
                for k in (
                    "StudyInstanceUID",
                    "PatientID",
                    "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances",
                )
            )
            for m in matches
        )

    before = answers()
    assert len(before) == 2
    appliance.stop()
    appliance.start()
    assert answers() == before


def _workers(listener: psutil.Process) -> list[psutil.Process]:
    """The DICOM worker processes: the children that hold the online tier's
    workers.lock (not the replication process, nor multiprocessing's
    resource tracker) and listen on no port (the web server's child holds
    the lock too, for STOW-RS)."""
    found = []
    for child in listener.children():
        try:
            held = {Path(f.path).name for f in child.open_files()}
            listening = any(
                c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")
            )
            if "workers.lock" in held and not listening and child.is_running():
                found.append(child)
        except psutil.Error:
            continue
    return [p for p in found if p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_worker_is_replaced_and_service_goes_on(appliance_factory, tmp_path):
    appliance = appliance_factory(workers=2).start()
    listener = psutil.Process(appliance.process.pid)
    workers = _workers(listener)
    assert len(workers) == 2
    victim = workers[0]

    # What the victim was receiving when it died is dropped when it restarts.
    online = appliance.data_dir / "online"
    for folder in (online / "incoming").iterdir():
        (folder / "tmp-half-received.dcm").write_bytes(b"\0" * 1000)

    victim.kill()
    victim.wait(timeout=10)

    # The other worker serves meanwhile.
    paths = datasets.study_files(tmp_path / "w", "worker-killed", 5)
    assert set(client.store_files(appliance.port, paths).values()) == {0}

    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        alive = [p for p in _workers(listener) if p.pid != victim.pid]
        if len(alive) == 2:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker not replaced:\n{appliance.log()}")
    assert re.search(r"worker \d exited with status -9", appliance.log())
    assert len(incoming_files(online)) == 1  # the survivor's file is untouched
    for _ in range(4):
        assert client.echo(appliance.port) == 0
    assert appliance.status()["instances"] == 5


def test_a_second_appliance_on_the_same_tier_is_refused(appliance_factory, tmp_path):
    first = appliance_factory(name="first").start()
    # A store in progress: a half-received file in a worker's folder.
    in_progress = first.data_dir / "online" / "incoming" / "worker-0" / "tmpx.dcm"
    in_progress.write_bytes(b"\0" * 1000)

    second = appliance_factory(name="second")
    second.data_dir = first.data_dir
    second.write_config()
    result = second.cli("serve", check=False)

    assert result.returncode == 1
    assert "another appliance is already serving" in result.stderr
    assert in_progress.exists()
    assert client.echo(first.port) == 0
