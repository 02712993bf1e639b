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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import config as configuration
from appliance.errors import ConfigError
from appliance.hsm import scheduler
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore import drill_job, drill_records
from appliance.restore.drill import DrillResult
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.packs import PackReader
from tests import datasets
from tests.conftest import Appliance
from tests.datasets import study_files, uid
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
    assert (
        "pack p-000000002 on the mirror differs from its record: another SHA-256"
        in done.stderr
    )
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
    # Once for the study, not once per instance: no one instance is at fault.
    assert [
        (f["study_uid"], f["sop_instance_uid"], f["what"]) for f in record["failures"]
    ] == [(_study("ct"), "", "study StudyDate: the catalog's answer differs")]
    assert f"study {_study('ct')}: study StudyDate" in done.stderr
    # The values themselves are left out (they may name the patient).
    assert "19991231" not in done.stderr + json.dumps(record)


def _store_mixed(site: Origin, label: str, values: list[dict[str, str]]) -> None:
    """One study whose instances hold other values at the patient, study
    and series levels (``values``, one dict per instance): the catalog
    keeps the first instance's."""
    study, series = uid("study", label), uid("series", label)
    for number, extra in enumerate(values, 1):
        dataset = datasets.instance(study, series, number, patient_id="P-MIXED")
        for keyword, value in extra.items():
            setattr(dataset, keyword, value)
        path = datasets.write(dataset, site.folder / "files" / label)
        assert site.ingest.import_file(path, "test").ok


def test_instances_of_one_study_that_disagree_pass(tmp_path: Path) -> None:
    """Two modalities name the institution differently, the first instance
    alone has a study description, another spells the patient's name its
    own way: the catalog answers with the first instance's values, which
    one restored instance holds, so the catalog is right."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    site = Origin(tmp_path, DirectoryTransport(mirror), _mirror(mirror))
    _store_mixed(
        site,
        "mixed",
        [
            {"InstitutionName": "St. Elsewhere", "StudyDescription": "Chest"},
            {"InstitutionName": "General Hospital", "PatientName": "Doe^Janet"},
            {"InstitutionName": "General Hospital", "SeriesDescription": "Late"},
        ],
    )
    site.replicate()
    _close(site)

    done = _drill(site.config_path)

    assert done.returncode == 0, done.stderr
    assert "restore drill passed: 1 studies, 3 instances" in done.stdout


def test_a_patients_answer_is_judged_when_the_sample_holds_all_their_studies(
    tmp_path: Path,
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    site = Origin(tmp_path, DirectoryTransport(mirror), _mirror(mirror))
    _store_mixed(site, "first", [{}, {}])
    _store_mixed(site, "second", [{}])
    site.replicate()
    catalog = site.catalog
    with catalog.env.begin(write=True) as txn:
        [(key, patient)] = list(catalog.all_records(txn, "patients"))
        assert patient["studies"] == 2
        patient["attrs"]["PatientName"] = "Nobody^Else"
        catalog._put(txn, "patients", key, patient)
    _close(site)

    # One of the two studies: the patient's answer may come from the other.
    assert _drill(site.config_path, "--studies", "1").returncode == 0
    done = _drill(site.config_path, "--studies", "2")

    assert done.returncode == 1
    failures = _records(site)[-1]["failures"]
    assert [(f["sop_instance_uid"], f["what"]) for f in failures] == [
        ("", "patient PatientName: the catalog's answer differs")
    ]
    assert "Nobody" not in done.stderr


def test_an_instance_whose_checksum_differs_from_the_catalog_fails(
    origin: Origin,
) -> None:
    """The pack gives back intact bytes, but not the bytes the catalog
    recorded for the instance."""
    catalog = origin.catalog
    with catalog.read() as txn:
        [uid, *_] = [
            key
            for key, data in catalog.all_records(txn, "instances")
            if data["study"] == _study("mr")
        ]
    with catalog.env.begin(write=True) as txn:
        data = catalog.get(txn, "instances", uid)
        assert data is not None
        data["sha256"] = "0" * 64
        catalog._put(txn, "instances", uid, data)

    done = _drill(origin.config_path)

    assert done.returncode == 1
    assert f"instance {uid}: SHA-256 differs from the catalog's" in done.stderr
    [record] = _records(origin)
    assert [(f["study_uid"], f["sop_instance_uid"]) for f in record["failures"]] == [
        (_study("mr"), uid)
    ]


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


def test_a_mirror_that_cannot_be_read_is_a_failed_drill(origin: Origin) -> None:
    # The mirror's folder gone: the drill cannot reach it, as in a disaster
    # whose mirror is lost too. The report must not keep the last pass.
    passed = _drill(origin.config_path)
    origin.transport.root.rename(origin.folder / "mirror-gone")

    failed = _drill(origin.config_path)
    report = appliance("dr", "report", config=origin.config_path)

    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert failed.returncode == 1
    assert "the mirror cannot be read" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    first, last = _records(origin)
    assert first["ok"] and not last["ok"]
    assert len(last["failures"]) == 3
    [row] = [line for line in report.stdout.splitlines() if "FAILED" in line]
    assert " 0 " in row and "FAILED (3)" in row


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

    [path] = sorted(origin.transport.root.glob("packs/*/p-000000002.pack"))
    path.write_bytes(path.read_bytes()[:-4096])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="appliance.restore.drill_job"):
        assert drill_job.scheduled_drill(config) is False
    [line] = [r for r in caplog.records if r.name == "appliance.restore.drill_job"]
    assert line.levelno == logging.ERROR
    assert "restore drill FAILED" in line.getMessage()
    assert f"first: study {_study('us')}" in line.getMessage()


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
        '[drills]\nschedule = ""\n[scrub]\nschedule = ""\n'
        "[migration]\nenabled = false\n[prefetch]\nenabled = false\n",
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


def test_a_drill_runs_while_the_appliance_serves(
    appliance_factory: Callable[..., Appliance], tmp_path: Path
) -> None:
    """No lock of the service's is taken; the service keeps serving and its
    tiers do not change."""
    node = appliance_factory(
        {
            "replication": {"batch_seconds": 1.0},
            "migration": {"enabled": False},
            "prefetch": {"enabled": False},
        }
    ).start()
    for label in ("a", "b"):
        study_files(tmp_path / "files" / label, label, 2)
    node.cli("import", str(tmp_path / "files"))
    _wait_until_replicated(node)
    online = node.data_dir / "online"
    before = _files(online / "objects")

    done = node.cli("dr", "drill", check=False)

    assert done.returncode == 0, done.stderr
    assert "restore drill passed: 2 studies, 4 instances" in done.stdout
    assert node.process is not None and node.process.poll() is None
    assert _files(online / "objects") == before
    assert node.cli("status", "--json").returncode == 0


def _wait_until_replicated(node: Appliance, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(node.cli("replication", "status", "--json").stdout)
        if status["queued_instances"] == 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"still queued: {status}\n{node.log()[-3000:]}")


def test_records_are_listed_in_time_order(tmp_path: Path) -> None:
    stamp = 1_780_000_000.0
    for started, failures in ((stamp, 0), (stamp, 1), (stamp - 60, 0)):
        result = DrillResult(started, ["1.2.3"], instances=1, bytes=10, seconds=1.0)
        if failures:
            result.fail("1.2.3", "1.2.3.4", "SHA-256 differs from the catalog's")
        drill_records.save(tmp_path, result)
    (tmp_path / "drill-20000101T000000Z.json").write_text("not JSON")

    found = drill_records.recent(tmp_path, 10)

    assert [r.path.name for r in found] == [
        "drill-20260528T202540Z.json",
        "drill-20260528T202640Z.json",
        "drill-20260528T202640Z-2.json",
    ]
    assert [(r.ok, r.failures) for r in found] == [(True, 0), (True, 0), (False, 1)]
    assert drill_records.recent(tmp_path, 1) == found[-1:]
