"""The admin API against a running appliance: the same numbers as the
command line, the operator actions and their refusals, the audit lines,
and the recent-errors file; and, in-process, the history of counts and
the errors file's bounds."""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterator

import pytest

from appliance import error_log
from appliance.catalog.store import Catalog
from appliance.web import history
from appliance.web.accounts import OPERATOR as OPERATOR_ROLE
from appliance.web.accounts import VIEWER as VIEWER_ROLE
from appliance.web.app import routes
from appliance.web.auth import PUBLIC, role_of
from tests.admin_site import JSON, AdminSite, start_admin_site
from tests.web_site import OPERATOR, VIEWER, VIEWER_TOKEN


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminSite]:
    yield from start_admin_site(tmp_path_factory.mktemp("admin"))


# -- every route is guarded --------------------------------------------------------


def test_every_route_refuses_anonymous_and_viewer_callers_as_it_should(site):
    """Walks the application's routes, those added later too: anonymous
    callers get 401, viewers 403 on operator routes and an answer on the
    rest, and an operator's POST without a JSON body type gets 415."""
    with (
        site.client() as anonymous,
        site.client(VIEWER) as viewer,
        site.client(OPERATOR) as operator,
    ):
        for made in routes():
            role = role_of(made)
            assert role in (PUBLIC, VIEWER_ROLE, OPERATOR_ROLE), made.path
            if role == PUBLIC:
                continue
            path = made.path.replace("{", "").replace("}", "")
            for method in sorted(made.methods - {"HEAD"}):
                where = (method, made.path)
                assert anonymous.request(method, path).status_code == 401, where
                as_viewer = viewer.request(method, path, headers=JSON, content=b"{}")
                if role == OPERATOR_ROLE:
                    assert as_viewer.status_code == 403, where
                    refused = operator.request(method, path, content=b"{}")
                    assert refused.status_code == 415, where
                else:
                    assert as_viewer.status_code not in (401, 403), where


def test_a_bearer_token_reads_the_api(site):
    with site.client() as client:
        token = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
        assert client.get("/api/status", headers=token).status_code == 200


# -- the same numbers as the command line --------------------------------------------


def test_status_is_what_the_command_line_computes(site):
    with site.client(VIEWER) as client:
        answer = client.get("/api/status").json()
    printed = site.cli_json("status")
    tiers = site.cli_json("tiers")

    assert isinstance(printed, dict)
    for key in ("patients", "studies", "series", "instances", "scrub"):
        assert answer[key] == printed[key]
    for tier in ("nearline", "offline"):
        assert answer["tiers"][tier] == printed["tiers"][tier]
    # Tiers without a set capacity report their file system's usage, which
    # other programs change between the two calls; the rest is the catalog's.
    assert isinstance(tiers, list)
    assert _steady(answer["watermarks"]) == _steady(tiers)
    queues = answer["queues"]
    assert set(queues) == {"replication", "recall", "prefetch", "restore"}
    mirror = site.cli_json("replication", "status")
    assert isinstance(mirror, dict)
    assert queues["replication"]["instances"] == mirror["queued_instances"]


def _steady(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "used_bytes"} for row in rows]


def test_replication_rate_changes_as_the_command_does(site):
    with site.client(OPERATOR) as client:
        changed = client.post("/api/replication/rate", json={"rate": "5MB", "hours": 1})
        seen = client.get("/api/replication").json()
        printed = site.cli_json("replication", "status")
        bad = client.post("/api/replication/rate", json={"rate": "5 parsecs"})
        back = client.post("/api/replication/rate", json={"rate": "timetable"})
        after = client.get("/api/replication").json()

    assert changed.status_code == 200, changed.text
    assert "5 MB/s" in changed.json()["rate"]
    assert isinstance(printed, dict)
    assert seen["rate"] == printed["rate"] and "5 MB/s" in seen["rate"]
    assert bad.status_code == 400
    assert back.json() == {"rate": "the timetable is in force again"}
    assert "5 MB/s" not in after["rate"]
    assert set(seen["recovery_point"]) == {"instances", "bytes", "oldest", "seconds"}
    assert "basis" in seen["full_restore"]
    assert "operator action by uploader: replication rate" in site.appliance.log()
    shown = site.cli("audit", "show", "--event", "operator-action", "--json")
    actions = [json.loads(line) for line in shown.stdout.splitlines()]
    said = [a["description"] for a in actions]
    assert any("replication rate: mirror rate 5 MB/s" in d for d in said), said
    assert all("uploader@127.0.0.1" in a["users"] for a in actions)


def test_migration_dry_run_plans_as_the_command_does(site):
    with site.client(OPERATOR) as client:
        answer = client.post("/api/migration/dry-run", json={})
    printed = site.cli("migrate", "--dry-run")

    assert answer.status_code == 200, answer.text
    planned = re.search(r"(\d+) step\(s\) planned", printed.stdout)
    assert planned is not None, printed.stdout
    assert answer.json()["steps"] == int(planned.group(1))
    assert {usage["tier"] for usage in answer.json()["usage"]} == {
        "online",
        "nearline",
    }


def test_recall_refuses_what_is_not_a_study(site):
    with site.client(OPERATOR) as client:
        unknown = client.post("/api/recall", json={"study_uid": "1.2.3.4.5"})
        garbled = client.post("/api/recall", json={"study_uid": "Doe^Jane"})
        missing = client.post("/api/recall", json={})
    assert unknown.status_code == 404
    assert garbled.status_code == 400
    assert missing.status_code == 400


def test_a_body_nested_deep_or_too_large_is_refused(site):
    deep = b'{"study_uid": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    with site.client(OPERATOR) as client:
        nested = client.post("/api/recall", content=deep, headers=JSON)
        large = client.post(
            "/api/recall", content=b" " * (1 << 20) + b"{}", headers=JSON
        )
        assert client.get("/health").status_code == 200
    assert nested.status_code == 400
    assert nested.json()["error"] == "the body is not JSON"
    assert large.status_code == 413
    assert "RecursionError" not in site.appliance.log()


def test_a_compressed_body_is_415_not_said_to_be_bad_json(site):
    """A body the client compressed is not read as if it were plain: the
    answer names the coding and says which the server takes."""
    body = gzip.compress(b'{"watermarks_only": true}')
    headers = {**JSON, "Content-Encoding": "gzip"}
    with site.client(OPERATOR) as client:
        answer = client.post("/api/migration/dry-run", content=body, headers=headers)
    assert answer.status_code == 415
    assert "gzip" in answer.json()["error"]
    assert answer.headers["accept-encoding"] == "identity"


def test_an_unknown_volume_is_404(site):
    with site.client(OPERATOR) as client:
        answer = client.post("/api/volumes/NOSUCH/loaded", json={})
    assert answer.status_code == 404
    assert "NOSUCH" in answer.json()["error"]


# -- a volume on the shelf, end to end -------------------------------------------------


def test_recall_from_a_shelved_volume_then_loaded(site):
    study, shelf = site.shelved_study("API001")
    with site.client(OPERATOR) as client:
        waiting = client.post("/api/recall", json={"study_uid": study})
        found = client.get("/api/volumes").json()
        not_yet = client.post("/api/volumes/API001/loaded", json={})
        (shelf / "API001").rename(site.volumes / "API001")
        loaded = client.post("/api/volumes/API001/loaded", json={})
        after = client.get("/api/volumes").json()
        errors = client.get("/api/errors", params={"last": 100}).json()["errors"]

    assert waiting.status_code == 200, waiting.text
    assert waiting.json()["ok"] is False
    assert waiting.json()["waiting_for"] == ["API001"]
    requests = {request["volume"]: request for request in found["requests"]}
    assert study in requests["API001"]["studies"]
    states = {volume["label"]: volume["reachable"] for volume in found["volumes"]}
    assert states["API001"] is False
    assert not_yet.status_code == 409
    assert "not reachable" in not_yet.json()["error"]

    assert loaded.status_code == 200, loaded.text
    assert [r["study_uid"] for r in loaded.json()["recalls"]] == [study]
    assert loaded.json()["recalls"][0]["ok"] is True
    assert "API001" not in {request["volume"] for request in after["requests"]}
    assert {v["label"]: v["reachable"] for v in after["volumes"]}["API001"]

    # The operator request was a warning of the web child: another process
    # than the one that answers, through the errors file.
    messages = [entry["message"] for entry in errors]
    assert any("load volume API001" in message for message in messages)
    log = site.appliance.log()
    assert "operator action by uploader: recall (study " in log
    assert "operator action by uploader: volume loaded (API001" in log
    kept = error_log.path_of(site.appliance.data_dir).read_text()
    assert "Doe^Jane" not in kept and "TEST-0001" not in kept


def test_drills_and_errors_take_a_count(site):
    with site.client(VIEWER) as client:
        assert client.get("/api/drills", params={"last": "x"}).status_code == 400
        drills = client.get("/api/drills", params={"last": 3}).json()
        errors = client.get("/api/errors", params={"last": 1}).json()
    assert drills == {"drills": []}
    assert len(errors["errors"]) <= 1


def test_rates_come_from_the_sampled_history(site):
    with site.client(VIEWER) as client:
        answer = client.get("/api/rates").json()
    # The web child samples once when it starts.
    assert answer["samples"] >= 1
    assert len(answer["hours"]) == 24


# -- in process: the history and the errors file ---------------------------------


def test_hourly_rates_count_rises_in_the_hour_they_are_seen():
    now = 10 * history.HOUR + 120.0
    samples = [
        {"time": now - 2 * history.HOUR, "instances": 5, "offsite_bytes": 0},
        {"time": now - history.HOUR - 60, "instances": 15, "offsite_bytes": 100},
        # Studies deleted: a fall, counted as nothing.
        {"time": now - history.HOUR, "instances": 12, "offsite_bytes": 100},
        {"time": now - 60, "instances": 20, "offsite_bytes": 700},
        {"time": now, "instances": 21, "offsite_bytes": 700},
    ]
    hours = history.hourly(samples, now, hours=3)
    assert [h["hour"] for h in hours] == [
        8 * history.HOUR,
        9 * history.HOUR,
        10 * history.HOUR,
    ]
    # Each rise is counted in the hour of the later sample of its pair.
    assert [h["ingested_instances"] for h in hours] == [0, 10, 8 + 1]
    assert [h["replicated_bytes"] for h in hours] == [0, 100, 600]


def test_the_history_file_stays_bounded(tmp_path, monkeypatch):
    catalog = Catalog(tmp_path / "catalog", 2**24)
    path = tmp_path / "web" / history.FILE_NAME
    monkeypatch.setattr(history, "KEEP", 10 * history.INTERVAL)
    try:
        sampler = history.Sampler(catalog, path)
        path.parent.mkdir()
        for minute in range(100):
            sampler.sample_once(now=1000.0 + minute * history.INTERVAL)
    finally:
        catalog.close()
    kept = history.read(path)
    assert len(kept) <= 2 * 10 + 1
    assert kept[-1]["time"] == 1000.0 + 99 * history.INTERVAL
    assert kept[-1]["instances"] == 0


def test_the_errors_file_keeps_warnings_without_tracebacks_and_rotates(tmp_path):
    handler = error_log.ErrorFileHandler(error_log.path_of(tmp_path), max_bytes=2000)
    log = logging.getLogger("appliance.test_errors_file")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.info("not kept")
        try:
            raise OSError("disk on fire")
        except OSError:
            log.exception("copy failed")
        first = error_log.recent(tmp_path, 10)
        for number in range(100):
            log.warning("warning number %d", number)
    finally:
        log.removeHandler(handler)

    assert [entry["message"] for entry in first] == [
        "copy failed (OSError: disk on fire)"
    ]
    assert first[0]["level"] == "ERROR"
    assert first[0]["logger"] == "appliance.test_errors_file"
    entries = error_log.recent(tmp_path, 500)
    assert entries[-1]["message"] == "warning number 99"
    folder = error_log.path_of(tmp_path).parent
    assert sum(path.stat().st_size for path in folder.iterdir()) <= 2 * 2000
    last = error_log.recent(tmp_path, 3)
    assert [entry["message"] for entry in last] == [
        f"warning number {n}" for n in (97, 98, 99)
    ]
