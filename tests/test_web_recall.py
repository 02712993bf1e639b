"""WADO-RS of studies that are not online: recalled from nearline as a
C-MOVE would, byte for byte; a study on a shelved volume is answered 503
with Retry-After and an operator request, then served once it is loaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Appliance
from tests.test_recall_dicom import Archive, _wait_until_replicated
from tests.test_web_dicomweb import wado_rs_bytes
from tests.web_site import VIEWER, Site, accounts


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Archive, Site]]:
    directory = tmp_path / "node"
    directory.mkdir()
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "replication": {"batch_seconds": 1.0},
        "web": {"accounts": accounts()},
    }
    appliance = Appliance(directory, settings)
    appliance.start()
    try:
        yield Archive(appliance, tmp_path), Site(appliance)
    finally:
        appliance.stop()


def test_a_study_on_nearline_is_recalled_by_wado_rs(archive) -> None:
    node, site = archive
    study, _files = node.store_study("web-nearline")
    # C-STORE keeps the bytes as received (pynetdicom's file meta, the
    # sender's data set): those are what must come back.
    stored = sorted(wado_rs_bytes(site, f"/studies/{study}"))
    node.migrate("nearline")
    assert node.studies_on("online") == 0

    got = wado_rs_bytes(site, f"/studies/{study}")

    assert sorted(got) == stored
    assert len(stored) == 4
    assert node.studies_on("online") == 1


def test_a_shelved_volume_answers_503_until_it_is_loaded(archive, tmp_path) -> None:
    node, site = archive
    assert node.cli("volumes", "label", "L00009", "--capacity", "1G").returncode == 0
    study, _files = node.store_study("web-shelved")
    stored = sorted(wado_rs_bytes(site, f"/studies/{study}"))
    node.migrate("offline")
    _wait_until_replicated(node)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (node.volumes / "L00009").rename(shelf / "L00009")

    with site.client(VIEWER) as http:
        answer = http.get(f"/studies/{study}")
    assert answer.status_code == 503
    assert answer.headers["retry-after"].isdigit()
    assert "L00009" in answer.json()["error"]
    assert "load volume L00009" in node.cli("volumes", "requests").stdout

    (shelf / "L00009").rename(node.volumes / "L00009")
    assert node.cli("volumes", "loaded", "L00009").returncode == 0
    got = wado_rs_bytes(site, f"/studies/{study}")
    assert sorted(got) == stored
