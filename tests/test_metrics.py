"""Metrics: a real ``appliance serve`` stores, answers C-FIND and C-GET and
replicates; ``appliance metrics`` (the body GET /metrics serves) counts
exactly that, across worker processes and a worker's restart, reads the
tiers and queues as the catalog has them, and puts no UID or patient
data in any label."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from appliance import config as configuration
from appliance.catalog import requests
from appliance.catalog.store import Catalog
from appliance.metrics import events, exposition
from appliance.metrics.folder import ENVIRONMENT
from appliance.prefetch import readiness
from appliance.prefetch.planner import LATE, ONLINE_STATE, WAITING, Plan, Prior
from appliance.restore import drill_records, progress
from appliance.restore.drill import DrillResult, Failure
from appliance.scrub import state as scrub_state
from tests import dicom_client as client
from tests import web_site
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.test_crash import _workers
from tests.test_recall_dicom import Archive

PATIENT_ID = "METRICS-0042"
PATIENT_NAME = "Metric^Mary"
QUIET = {"replication": {"enabled": False}, "migration": {"enabled": False}}
# A UID: at least three dot-separated numbers.
_UID_LIKE = re.compile(r"\d+\.\d+\.\d+")


def _samples(text: str) -> list[Sample]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _scrape(appliance: Appliance) -> list[Sample]:
    """What GET /metrics would answer now (``appliance metrics`` prints the
    same: see the test of labels)."""
    body, _content_type = exposition(configuration.load(appliance.config_path))
    return _samples(body.decode())


def _names(samples: list[Sample]) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for s in samples}


def _value(samples: list[Sample], name: str, **labels: str) -> float | None:
    for sample in samples:
        if sample.name == name and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            return sample.value
    return None


def _wait_for(check, what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _files(tmp_path: Path, label: str, count: int) -> list[Path]:
    return study_files(
        tmp_path / label,
        label,
        count,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        pixel_bytes=20_000,
    )


def test_counts_and_state_match_what_was_done(appliance_factory, tmp_path):
    appliance = appliance_factory(QUIET, workers=2).start()
    files = _files(tmp_path, "counted", 3)

    # Three new instances and one sent again, on one association.
    statuses = client.store_files(appliance.port, [*files, files[0]])
    assert set(statuses.values()) == {0}
    identifier = client.study_identifier(StudyInstanceUID="", PatientID=PATIENT_ID)
    matches, final = client.find(appliance.port, identifier)
    assert len(matches) == 1 and final == 0
    study = str(matches[0].StudyInstanceUID)
    received, _ = client.get(
        appliance.port,
        client.study_identifier(StudyInstanceUID=study),
        client.storage_contexts_for(files),
    )
    assert len(received) == 3
    with client.associate(appliance.port, [(client.Verification, [])], called="WRONG"):
        pass
    with client.associate(appliance.port, [(client.Verification, [])]) as assoc:
        assoc.abort()
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=30) as raw:
        raw.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        while raw.recv(4096):
            pass

    associations = "appliance_dicom_associations_total"
    _wait_for(
        lambda: _value(_scrape(appliance), associations, outcome="aborted") == 1,
        "the aborted association to close",
    )
    samples = _scrape(appliance)
    assert _value(samples, "appliance_dicom_connections_refused_total") == 1
    received_total = "appliance_instances_received_total"
    assert _value(samples, received_total, outcome="stored") == 3
    assert _value(samples, received_total, outcome="duplicate") == 1
    assert _value(samples, received_total, outcome="rejected") is None
    assert _value(samples, associations, outcome="accepted") == 4
    assert _value(samples, associations, outcome="rejected") == 1
    assert _value(samples, associations, outcome="aborted") == 1
    requests_count = "appliance_dicom_request_duration_seconds_count"
    assert _value(samples, requests_count, operation="find") == 1
    assert _value(samples, requests_count, operation="get") == 1
    assert _value(samples, requests_count, operation="move") is None

    status = appliance.status()
    online_bytes = status["tiers"]["online"]["instance_bytes"]
    assert online_bytes > 3 * 20_000
    assert _value(samples, "appliance_tier_instance_bytes", tier="online") == (
        online_bytes
    )
    assert _value(samples, "appliance_tier_studies", tier="online") == 1
    assert _value(samples, "appliance_tier_studies", tier="nearline") == 0
    assert _value(samples, "appliance_catalog_records", level="instances") == 3
    # Replication is off: everything stored waits for the mirror.
    assert _value(samples, "appliance_replication_queue_instances") == 3
    assert _value(samples, "appliance_replication_queue_bytes") == online_bytes
    assert _value(samples, "appliance_scrub_instances_without_good_copy") == 0

    _wait_for(
        lambda: _value(_scrape(appliance), "appliance_dicom_associations_open") == 0,
        "the open associations to close",
    )


def test_no_label_holds_a_uid_or_patient_data(appliance_factory, tmp_path):
    appliance = appliance_factory(QUIET).start()
    files = _files(tmp_path, "labels", 2)
    assert set(client.store_files(appliance.port, files).values()) == {0}
    client.find(appliance.port, client.study_identifier(PatientID=PATIENT_ID))

    text = appliance.cli("metrics").stdout
    assert _names(_samples(text)) == _names(_scrape(appliance))
    families = list(text_string_to_metric_families(text))
    assert families
    values = {v for f in families for s in f.samples for v in s.labels.values()}
    assert values, "some metric has labels"
    for value in values:
        assert not _UID_LIKE.search(value), value
        assert PATIENT_ID not in value and "Metric" not in value, value
    for family in families:
        assert family.name.startswith("appliance_"), family.name
        assert family.documentation.strip(), family.name
    assert PATIENT_ID not in text and PATIENT_NAME not in text
    assert "APPLIANCE" not in text and client.CLIENT_AE not in text


def test_a_restarted_worker_loses_and_doubles_nothing(appliance_factory, tmp_path):
    appliance = appliance_factory(QUIET, workers=1).start()
    files = _files(tmp_path, "restart", 3)
    assert set(client.store_files(appliance.port, files[:2]).values()) == {0}
    listener = psutil.Process(appliance.process.pid)
    (victim,) = _workers(listener)

    with client.associate(appliance.port, [(client.Verification, [])]) as held:
        assert held.is_established
        samples = _scrape(appliance)
        assert _value(samples, "appliance_dicom_associations_open") == 1
        victim.kill()
        victim.wait(timeout=10)
        _wait_for(
            lambda: [p.pid for p in _workers(listener)] not in ([], [victim.pid]),
            "the worker to be started again",
        )

    folder = appliance.data_dir / "run" / "metrics"
    assert (folder / f"counter_{victim.pid}.db").exists()
    assert not (folder / f"gauge_livesum_{victim.pid}.db").exists()
    samples = _scrape(appliance)
    # What the dead worker counted stays; what it held open is forgotten.
    received = "appliance_instances_received_total"
    assert _value(samples, received, outcome="stored") == 2
    assert _value(samples, "appliance_dicom_associations_open") == 0
    assert set(client.store_files(appliance.port, files[2:]).values()) == {0}
    samples = _scrape(appliance)
    assert _value(samples, received, outcome="stored") == 3
    assert (
        _value(samples, "appliance_dicom_associations_total", outcome="accepted") == 3
    )


def test_replication_queue_and_lag_before_and_after(appliance_factory, tmp_path):
    appliance = appliance_factory(QUIET)
    appliance.start()
    before = time.time()
    files = _files(tmp_path, "replicated", 4)
    assert set(client.store_files(appliance.port, files).values()) == {0}

    samples = _scrape(appliance)
    lag = _value(samples, "appliance_replication_lag_seconds")
    after = time.time()
    online_bytes = _value(samples, "appliance_tier_instance_bytes", tier="online")
    assert _value(samples, "appliance_replication_queue_instances") == 4
    assert _value(samples, "appliance_replication_queue_bytes") == online_bytes
    assert lag is not None and 0 < lag <= after - before
    assert _value(samples, "appliance_replication_uploaded_bytes_total") is None

    appliance.stop()
    appliance.settings = {
        "replication": {"enabled": True, "batch_seconds": 1.0},
        "migration": {"enabled": False},
    }
    appliance.start()
    _wait_for(
        lambda: (
            _value(_scrape(appliance), "appliance_replication_queue_instances") == 0
        ),
        "the queue to empty",
        timeout=90,
    )
    # The journal segment of those instances goes up after their pack.
    uploaded = "appliance_replication_uploaded_bytes_total"
    _wait_for(
        lambda: (_value(_scrape(appliance), uploaded, kind="journal") or 0) > 0,
        "the journal to be sent",
        timeout=90,
    )

    samples = _scrape(appliance)
    assert _value(samples, "appliance_replication_lag_seconds") == 0
    assert _value(samples, "appliance_replication_queue_bytes") == 0
    assert (
        _value(samples, "appliance_tier_instance_bytes", tier="offsite") == online_bytes
    )
    assert _value(samples, uploaded, kind="pack") == _value(
        samples, "appliance_tier_pack_bytes", tier="offsite"
    )


def test_a_recall_by_c_get_is_timed_by_its_source(appliance_factory, tmp_path):
    settings = {**QUIET, "migration": {"enabled": False, "min_copies": 1}}
    appliance = appliance_factory(settings).start()
    archive = Archive(appliance, tmp_path)
    study, files = archive.store_study("recalled", 3)
    archive.migrate("nearline")

    samples = _scrape(appliance)
    assert _value(samples, "appliance_tier_studies", tier="online") == 0
    assert _value(samples, "appliance_tier_studies", tier="nearline") == 1
    assert _value(samples, "appliance_tier_pack_bytes", tier="nearline") > 0
    assert _value(samples, "appliance_recall_duration_seconds_count") is None

    received, _ = client.get(
        appliance.port,
        client.study_identifier(StudyInstanceUID=study),
        client.storage_contexts_for(files),
    )
    assert len(received) == 3
    samples = _scrape(appliance)
    recalls = "appliance_recall_duration_seconds_count"
    assert _value(samples, recalls, source="nearline") == 1
    assert _value(samples, recalls, source="offsite") is None
    assert _value(samples, "appliance_tier_studies", tier="online") == 1


def test_state_files_and_requests_are_read_at_each_scrape(tmp_path):
    config = configuration.load(None, {"storage.data_dir": str(tmp_path / "data")})
    catalog = Catalog(config.catalog_path)
    try:
        requests.request_volume(catalog, "L00042", "a recall", uid("study", 1))
        requests.request_volume(catalog, "L00043", "a recall", uid("study", 2))
        body, content_type = exposition(config, catalog)
    finally:
        catalog.close()
    samples = _samples(body.decode())
    assert content_type.startswith("text/plain")
    pending = "appliance_operator_requests_pending"
    assert _value(samples, pending, kind="load_volume") == 2
    assert _value(samples, "appliance_restore_pending") == 0
    assert _value(samples, "appliance_drill_last_success") is None

    lost = {uid("lost", n): "every copy damaged" for n in range(3)}
    saved = scrub_state.ScrubState(lost=lost)
    saved.tier("online").pass_checked = 1
    saved.tier("online").bad = 2
    scrub_state.save(scrub_state.folder_of(config.data_dir), saved)
    drill = DrillResult(started=1_764_900_000.0, studies=[uid("s")], instances=5)
    drill.failures.append(Failure(uid("s"), uid("i"), "SHA-256 differs"))
    drill_records.save(config.data_dir / "drills", drill)
    restore = config.data_dir / "restore"
    progress.mark_pending(restore, "mirror")

    samples = _samples(exposition(config)[0].decode())
    assert _value(samples, "appliance_scrub_instances_without_good_copy") == 3
    assert _value(samples, "appliance_scrub_bad_total", tier="online") == 2
    assert _value(samples, "appliance_drill_last_timestamp_seconds") == 1_764_900_000
    assert _value(samples, "appliance_drill_last_success") == 0
    assert _value(samples, "appliance_drill_last_failures") == 1
    assert _value(samples, "appliance_restore_pending") == 1
    assert _value(samples, "appliance_state_unreadable", part="drills") == 0

    # A part that does not read is said so; the others are still there.
    record = next((config.data_dir / "drills").glob("drill-*.json"))
    record.write_text(record.read_text().replace("2025-12-05T", "Friday "))
    samples = _samples(exposition(config)[0].decode())
    assert _value(samples, "appliance_state_unreadable", part="drills") == 1
    assert _value(samples, "appliance_drill_last_success") is None
    assert _value(samples, "appliance_state_unreadable", part="scrub") == 0
    assert _value(samples, "appliance_scrub_instances_without_good_copy") == 3


def test_prefetch_readiness_counts_as_prefetch_status():
    plans = [
        Plan("a", 0.0, 0.0, [Prior("s1", ONLINE_STATE), Prior("s2", ONLINE_STATE)]),
        Plan("b", 0.0, 0.0, [Prior("s3", LATE), Prior("s4", WAITING)]),
        Plan("c", 0.0, 0.0, [Prior("s5", WAITING)]),
    ]
    counted = readiness.tally(plans)
    assert (counted.appointments, counted.ready, counted.late, counted.waiting) == (
        3,
        1,
        1,
        2,
    )


def test_events_are_a_no_op_without_the_folder(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    monkeypatch.setattr(events._State, "decided", False)
    monkeypatch.setattr(events._State, "metrics", None)
    events.instance_received("stored")
    with events.timed("find"):
        pass
    assert events._State.decided and events._State.metrics is None


_CHILD = """
import os, sys
{early}
os.environ["{env}"] = sys.argv[1]
from appliance.metrics import events
events.instance_received("stored")
events.instance_received("stored")
events.uploaded("pack", 1000)
"""


@pytest.mark.parametrize("early", [False, True])
def test_a_process_counts_only_with_the_folder_set_before_the_import(tmp_path, early):
    folder = tmp_path / "metrics"
    folder.mkdir()
    code = _CHILD.format(
        early="import prometheus_client" if early else "", env=ENVIRONMENT
    )
    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr

    config = configuration.load(None, {"storage.data_dir": str(tmp_path)})
    (tmp_path / "run").mkdir()
    folder.rename(tmp_path / "run" / "metrics")
    samples = _samples(exposition(config)[0].decode())
    stored = _value(samples, "appliance_instances_received_total", outcome="stored")
    if early:
        # Counted in its own memory, never scraped: refused, and said so.
        assert stored is None
        assert "imported before" in done.stderr
    else:
        assert stored == 2
        assert (
            _value(samples, "appliance_replication_uploaded_bytes_total", kind="pack")
            == 1000
        )


def test_get_metrics_answers_viewers_with_what_the_command_prints(
    appliance_factory, tmp_path
):
    site = web_site.start(appliance_factory, QUIET)
    files = _files(tmp_path, "http", 2)
    assert set(client.store_files(site.appliance.port, files).values()) == {0}

    with site.client(web_site.VIEWER) as viewer:
        scraped = viewer.get("/metrics")
    with site.client() as anonymous:
        refused = anonymous.get("/metrics")
    with site.client() as token:
        bearer = token.get(
            "/metrics", headers={"Authorization": f"Bearer {web_site.VIEWER_TOKEN}"}
        )

    assert scraped.status_code == 200, scraped.text
    assert scraped.headers["content-type"].startswith("text/plain")
    assert refused.status_code == 401 and bearer.status_code == 200
    samples = _samples(scraped.text)
    assert _names(samples) == _names(_samples(site.appliance.cli("metrics").stdout))
    received = "appliance_instances_received_total"
    assert _value(samples, received, outcome="stored") == 2
