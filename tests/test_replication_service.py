"""Replication inside ``appliance serve``: stored instances reach the default
(directory) mirror by themselves; status and verify say so; a tampered
pack on the mirror is found and sent again; the service killed while
replicating loses nothing."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from appliance.storage.keys import KeyStore
from appliance.storage.packs import PackReader
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.datasets import study_files

SETTINGS = {
    "replication": {"batch_seconds": 1.0},
    "migration": {"enabled": False},
}


def _cli(appliance: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            *args,
            "--config",
            str(appliance.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _status(appliance: Appliance) -> dict:
    done = _cli(appliance, "replication", "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_until_replicated(appliance: Appliance, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(appliance)
        if status["queued_instances"] == 0:
            return status
        time.sleep(0.5)
    raise AssertionError(f"still queued: {status}\n{appliance.log()[-3000:]}")


def _store(appliance: Appliance, tmp_path: Path, label: str, count: int) -> dict:
    files = study_files(tmp_path / label, label, count, pixel_bytes=20_000)
    assert set(client.store_files(appliance.port, files).values()) == {0}
    return {_uid(path): client.dataset_bytes(path) for path in files}


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _mirror_instances(appliance: Appliance) -> dict[str, bytes]:
    """Every instance in the mirror's packs, decrypted with the appliance's keys."""
    keys = KeyStore.load(appliance.data_dir / "keys" / "master.keys")
    found: dict[str, bytes] = {}
    for path in (appliance.data_dir / "mirror").glob("packs/*/*.pack"):
        with PackReader.open(path, keys) as reader:
            for entry in reader.manifest().instances:
                out = io.BytesIO()
                reader.extract(entry, out)
                found[entry.sop_instance_uid] = _after_file_meta(out.getvalue())
    return found


def _after_file_meta(part10: bytes) -> bytes:
    """The data set of a Part 10 file: what the sender sent (the receiver
    writes its own file meta)."""
    handle = io.BytesIO(part10)
    pydicom.filereader.read_preamble(handle, False)
    pydicom.filereader._read_file_meta_info(handle)
    return handle.read()


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    directory = tmp_path / "node"
    directory.mkdir()
    node = Appliance(directory, SETTINGS)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_stored_instances_reach_the_mirror(
    appliance: Appliance, tmp_path: Path
) -> None:
    originals = _store(appliance, tmp_path, "mirror-service", 6)

    status = _wait_until_replicated(appliance)

    assert _mirror_instances(appliance) == originals
    assert status["offsite_instance_bytes"] >= sum(map(len, originals.values()))
    assert status["recovery_point_seconds"] == 0
    assert status["last_snapshot"] is not None
    assert status["last_error"] is None
    verified = _cli(appliance, "replication", "verify", "--all")
    assert verified.returncode == 0, verified.stderr
    assert "0 damaged or missing" in verified.stdout


def test_a_tampered_pack_is_found_and_sent_again(
    appliance: Appliance, tmp_path: Path
) -> None:
    originals = _store(appliance, tmp_path, "mirror-tamper", 4)
    _wait_until_replicated(appliance)
    [pack] = list((appliance.data_dir / "mirror").glob("packs/*/*.pack"))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))

    found = _cli(appliance, "replication", "verify", "--all")

    assert found.returncode == 1
    assert "1 damaged or missing" in found.stdout
    assert pack.name.removesuffix(".pack") in found.stderr
    _wait_until_replicated(appliance)
    packs = list((appliance.data_dir / "mirror").glob("packs/*/*.pack"))
    assert len(packs) == 2
    again = _cli(appliance, "replication", "verify", "--all")
    assert again.returncode == 0 and "1 pack(s) read back: 1 good" in again.stdout
    good = {
        uid: data for uid, data in _mirror_instances_skipping(appliance, pack).items()
    }
    assert good == originals


def _mirror_instances_skipping(appliance: Appliance, damaged: Path) -> dict:
    damaged.unlink()
    return _mirror_instances(appliance)


def test_killed_while_replicating_loses_nothing(
    appliance: Appliance, tmp_path: Path
) -> None:
    originals: dict[str, bytes] = {}
    for round_ in range(3):
        originals |= _store(appliance, tmp_path, f"kill-{round_}", 5)
        time.sleep(0.3 + 0.4 * round_)
        assert appliance.process is not None
        os.killpg(appliance.process.pid, signal.SIGKILL)
        appliance.process.wait()
        appliance.start()

    _wait_until_replicated(appliance)

    mirrored = _mirror_instances(appliance)
    assert {uid: mirrored.get(uid) for uid in originals} == originals


def test_the_rate_changes_at_runtime_and_comes_back(appliance: Appliance) -> None:
    assert (
        "no limit" in _status(appliance)["rate"]
        or "unlimited" in _status(appliance)["rate"]
    )

    changed = _cli(appliance, "replication", "rate", "5MB", "--for", "1")
    status = _status(appliance)
    back = _cli(appliance, "replication", "rate", "timetable")

    assert changed.returncode == 0, changed.stderr
    assert "5 MB/s" in status["rate"]
    assert back.returncode == 0
    assert "5 MB/s" not in _status(appliance)["rate"]
    refused = _cli(appliance, "replication", "rate", "5 parsecs")
    assert refused.returncode == 2


def test_a_refusing_mirror_is_said_once_shown_and_left_behind(tmp_path: Path) -> None:
    shared = tmp_path / "shared-mirror"
    shared.mkdir()
    settings = {
        **SETTINGS,
        "mirror": {"kind": "directory", "path": str(shared)},
        "logging": {"level": "DEBUG"},
    }
    first = Appliance(_folder(tmp_path, "first"), settings).start()
    try:
        _store(first, tmp_path, "first-archive", 2)
        _wait_until_replicated(first)
    finally:
        first.stop()
    # A second appliance pointed at the first one's mirror: refused.
    second = Appliance(_folder(tmp_path, "second"), settings).start()
    try:
        _store(second, tmp_path, "second-archive", 3)
        _wait_for_log(second, "replication: still stopped", times=3)
        refused = _status(second)
        printed = _cli(second, "replication", "status").stdout
        overview = _cli(second, "status").stdout

        # The administrator empties the mirror, its identity marker last.
        for folder in ("packs", "journal", "catalog"):
            shutil.rmtree(shared / folder, ignore_errors=True)
        (shared / "mirror" / "identity").unlink()
        _wait_until_replicated(second, timeout=120)
        _wait_for_log(second, "replication resumed")
        resumed = _status(second)
        log = second.log()
    finally:
        second.stop()

    assert refused["state"] == "refused" and refused["queued_instances"] == 3
    assert "another master key" in refused["trouble"]["cause"]
    assert "state:           stopped: the mirror refuses us since" in printed
    assert "another master key" in printed and "up to date" not in printed
    assert "mirror: stopped: the mirror refuses us since" in overview
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "the mirror refuses us" in errors[0], errors
    assert log.count("replication resumed") == 1
    assert resumed["state"] == "up to date" and resumed["trouble"] is None
    assert resumed["queued_instances"] == 0


def _folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def _wait_for_log(appliance: Appliance, text: str, times: int = 1) -> None:
    deadline = time.monotonic() + 120
    while appliance.log().count(text) < times:
        assert time.monotonic() < deadline, appliance.log()[-3000:]
        time.sleep(0.2)
