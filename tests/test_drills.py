"""Restore drills: ``appliance dr drill`` restores a sample of replicated
studies from a directory mirror into a scratch folder and checks them
while the archive's catalog stays open for writing in this process (as
under ``appliance serve``); a tampered pack, a missing pack or a catalog
answer that differs from the data fails it; nothing of the archive
changes. ``appliance dr report`` shows the drills, the recovery point and
the estimated full restore; the service's scheduler runs the drill."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as configuration
from appliance.errors import ConfigError
from appliance.hsm import scheduler
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore import drill_job
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.packs import PackReader
from tests.restore_site import Origin, appliance


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    """Three studies replicated in two packs, a fourth still queued; the
    catalog open for writing in this process the whole time."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    site = Origin(tmp_path, DirectoryTransport(mirror), _mirror(mirror))
    site.store("ct", 3, study_date="20250105")
    site.store("mr", 2, modality="MR", patient_id="P2", patient_name="Roe^Max")
    site.replicate()
    site.store("us", 2, modality="US", accession="ACC0002")
    site.replicate()
    site.store("cr-queued", 1, modality="CR")
    yield site
    _close(site)


def _close(site: Origin) -> None:
    """Stop writing and close the catalog (again: closing twice is harmless)."""
    site.ingest.close()
    site.replicator.close()
    site.catalog.close()


def _mirror(folder: Path) -> dict[str, object]:
    return {"kind": "directory", "path": str(folder)}


def _with(origin: Origin, name: str, text: str) -> Path:
    """The origin's configuration with more sections."""
    path = origin.folder / name
    path.write_text(origin.config_path.read_text() + text)
    return path


def _study(label: str) -> str:
    from tests.datasets import uid

    return uid("study", label)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _archive(origin: Origin) -> tuple[dict[str, bytes], bytes, dict[str, bytes]]:
    """The online tier, the catalog's data and the mirror, byte for byte."""
    config = origin.config
    catalog = (config.catalog_path / "data.mdb").read_bytes()
    return _files(config.online_path), catalog, _files(origin.transport.root)


def _records(origin: Origin) -> list[dict]:
    folder = origin.config.data_dir / "drills"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("drill-*.json"))]


def _drill(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return appliance("dr", "drill", *options, config=config)


def test_a_healthy_mirror_passes_and_is_recorded(origin: Origin) -> None:
    before = _archive(origin)

    done = _drill(origin.config_path, "--studies", "10")

    assert done.returncode == 0, done.stderr
    assert "restore drill passed: 3 studies, 7 instances" in done.stdout
    [record] = _records(origin)
    assert record["ok"] is True
    assert record["failures"] == []
    assert sorted(record["sample"]) == sorted(map(_study, ("ct", "mr", "us")))
    assert record["instances"] == 7
    with origin.catalog.read() as txn:
        sizes = [
            data["size"]
            for _uid, data in origin.catalog.all_records(txn, "instances")
            if data["study"] != _study("cr-queued")
        ]
    assert record["bytes"] == sum(sizes)
    assert record["mirror_bytes"] > 0 and record["seconds"] > 0
    # The scratch folder is gone; nothing of the archive changed.
    left = sorted(p.name for p in (origin.config.data_dir / "drills").iterdir())
    recorded = Path(done.stdout.split("record: ")[1].strip())
    assert left == sorted(["drill.lock", recorded.name])
    assert _archive(origin) == before


def test_the_sample_is_drawn_from_the_replicated_studies(origin: Origin) -> None:
    done = _drill(origin.config_path, "--studies", "2")

    assert done.returncode == 0, done.stderr
    [record] = _records(origin)
    assert len(record["sample"]) == 2
    assert set(record["sample"]) <= set(map(_study, ("ct", "mr", "us")))


def test_a_tampered_pack_fails_and_names_the_study(origin: Origin) -> None:
    mirror = origin.transport.root
    [path] = sorted(mirror.glob("packs/*/p-000000002.pack"))
    keys = KeyStore.load(key_store_path(origin.config.data_dir))
    with PackReader.open(path, keys) as reader:
        entry = reader.manifest().instances[0]
    data = bytearray(path.read_bytes())
    data[entry.data_offset + 20] ^= 0x01
    path.write_bytes(bytes(data))
    before = _archive(origin)

    done = _drill(origin.config_path)

    assert done.returncode == 1
    assert "FAILED" in done.stdout
    damaged = entry.sop_instance_uid
    assert f"study {_study('us')}, instance {damaged}" in done.stderr
    assert "pack p-000000002 on the mirror differs" in done.stderr
    [record] = _records(origin)
    assert record["ok"] is False
    assert {f["study_uid"] for f in record["failures"]} == {_study("us")}
    assert damaged in {f["sop_instance_uid"] for f in record["failures"]}
    assert "Traceback" not in done.stderr
    assert _archive(origin) == before


def test_a_missing_pack_fails_every_instance_in_it(origin: Origin) -> None:
    [path] = sorted(origin.transport.root.glob("packs/*/p-000000001.pack"))
    path.unlink()

    done = _drill(origin.config_path)

    assert done.returncode == 1
    [record] = _records(origin)
    missing = [f for f in record["failures"] if "not on the mirror" in f["what"]]
    assert {f["study_uid"] for f in missing} == {_study("ct"), _study("mr")}
    assert len(missing) == 5


def test_a_catalog_answer_that_differs_from_the_data_fails(origin: Origin) -> None:
    """The catalog says another study date than the instances hold: C-FIND
    would answer wrongly for that study."""
    catalog = origin.catalog
    with catalog.env.begin(write=True) as txn:
        study = catalog.get(txn, "studies", _study("ct"))
        assert study is not None
        study["attrs"]["StudyDate"] = "19991231"
        catalog._put(txn, "studies", _study("ct"), study)

    done = _drill(origin.config_path)

    assert done.returncode == 1
    [record] = _records(origin)
    assert {f["study_uid"] for f in record["failures"]} == {_study("ct")}
    assert {f["what"] for f in record["failures"]} == {
        "study StudyDate: the catalog's answer differs"
    }
    assert len(record["failures"]) == 3
    # The values themselves are left out (they may name the patient).
    assert "19991231" not in done.stderr + json.dumps(record)


def test_nothing_replicated_is_a_clear_message(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    site = Origin(tmp_path, DirectoryTransport(mirror), _mirror(mirror))
    site.store("ct", 1)
    _close(site)

    done = _drill(site.config_path)

    assert done.returncode == 1
    assert "no study has a verified copy on the mirror yet" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_mirror_fails_with_a_clear_message(origin: Origin) -> None:
    for path in origin.transport.root.glob("packs/*/*.pack"):
        path.unlink()

    done = _drill(origin.config_path)

    assert done.returncode == 1
    assert "the mirror holds no pack at all" in done.stderr
    assert "Traceback" not in done.stderr
    [record] = _records(origin)
    assert len(record["failures"]) == 3


def test_a_paused_restore_timetable_runs_no_drill(origin: Origin) -> None:
    config = _with(origin, "paused.toml", '[restore]\ntimetable = "pause"\n')

    done = _drill(config)

    assert done.returncode == 1
    assert "restore.timetable pauses reading the mirror now" in done.stderr
    assert _records(origin) == []


def test_report_shows_the_drills_the_recovery_point_and_the_estimate(
    origin: Origin,
) -> None:
    done = appliance("dr", "report", config=origin.config_path)
    assert done.returncode == 0, done.stderr
    assert "no restore drill yet" in done.stdout
    assert "no drill has measured a rate yet" in done.stdout

    assert _drill(origin.config_path).returncode == 0
    [record] = _records(origin)
    done = appliance("dr", "report", config=origin.config_path)

    assert done.returncode == 0, done.stderr
    assert record["date"] in done.stdout and "passed" in done.stdout
    # The queued study: one instance waiting, received seconds ago.
    assert "recovery point: " in done.stdout
    assert "(1 instance(s)" in done.stdout
    assert f"the drill of {record['date']} measured" in done.stdout
    assert "restore.timetable sets no limit" in done.stdout

    limited = _with(origin, "limited.toml", '[restore]\ntimetable = "10MB"\n')
    done = appliance("dr", "report", config=limited)
    assert "at 10 MB/s, the rate restore.timetable gives now" in done.stdout

    origin.replicate()
    done = appliance("dr", "report", config=origin.config_path)
    assert "recovery point: nothing waiting for the mirror" in done.stdout


def test_the_scheduled_drill_logs_one_line(
    origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    # The drill runs in this process now: LMDB allows one open environment
    # of the catalog per process.
    _close(origin)
    config = configuration.load(origin.config_path)
    with caplog.at_level(logging.INFO, logger="appliance.restore.drill_job"):
        assert drill_job.scheduled_drill(config) is True
    [line] = [r for r in caplog.records if r.name == "appliance.restore.drill_job"]
    assert line.getMessage().startswith("restore drill passed: 3 studies")
    assert len(_records(origin)) == 1


def test_the_service_schedules_the_drill_in_a_child(origin: Origin) -> None:
    path = _with(
        origin,
        "scheduled.toml",
        '[drills]\nschedule = "30 2 * * sun"\nstudies = 1\n'
        "[migration]\nenabled = false\n[prefetch]\nenabled = false\n",
    )
    config = configuration.load(path)
    jobs = scheduler.start(config)
    assert jobs is not None
    try:
        job = jobs.get_job("drill")
        trigger = {f.name: str(f) for f in job.trigger.fields}
        assert (trigger["minute"], trigger["hour"], trigger["day_of_week"]) == (
            "30",
            "2",
            "sun",
        )
        # What the scheduler runs at that time: the drill, in a child process.
        assert job.func(*job.args) == 0
    finally:
        jobs.shutdown(wait=False)
    [record] = _records(origin)
    assert record["ok"] is True and len(record["sample"]) == 1


def test_an_empty_schedule_turns_the_drills_off(origin: Origin) -> None:
    path = _with(
        origin,
        "off.toml",
        '[drills]\nschedule = ""\n[migration]\nenabled = false\n'
        "[prefetch]\nenabled = false\n",
    )
    assert scheduler.start(configuration.load(path)) is None


def test_the_drill_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[drills]\nschedule = "every month"\nstudies = 0\n')
    with pytest.raises(ConfigError) as raised:
        configuration.load(path)
    assert {key for key, _message in raised.value.problems} == {
        "drills.schedule",
        "drills.studies",
    }
    defaults = configuration.load()
    assert defaults.get("drills.schedule") == "0 4 1 * *"
    assert defaults.get("drills.studies") == 10
