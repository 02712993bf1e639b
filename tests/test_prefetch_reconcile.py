"""Arriving studies compared with the RIS's orders."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.catalog.store import Catalog
from appliance.hl7 import acks, messages
from appliance.ingest import Ingest
from appliance.prefetch import appointments, reconcile
from appliance.storage.online import OnlineTier
from tests.datasets import study_files, uid
from tests.hl7_samples import orm, siu

Site = tuple[Catalog, Ingest, Path]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    ingest = Ingest(catalog, online, "refuse")
    try:
        yield catalog, ingest, tmp_path
    finally:
        ingest.close()
        catalog.close()


def receive(
    ingest: Ingest, folder: Path, label: str, patient: str, accession: str
) -> str:
    for path in study_files(
        folder / label, label, 2, patient_id=patient, accession=accession
    ):
        assert ingest.import_file(path, "test").ok
    return uid("study", label)


def book(catalog: Catalog, text: str) -> None:
    parsed = messages.parse(text.encode())
    appointments.apply(catalog, messages.read(parsed), acks.accept(parsed))


def test_without_appointments_nothing_is_queued(site: Site) -> None:
    catalog, ingest, folder = site

    receive(ingest, folder, "lonely", "PAT-1", "ACC1")

    with catalog.read() as txn:
        assert txn.stat(catalog.db["arrivals"])["entries"] == 0
    assert reconcile.reconcile(catalog) == []


def test_wrong_patient_and_unscheduled_studies_are_flagged(
    site,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    catalog, ingest, folder = site
    book(catalog, orm(patient="PAT-A^^^", accession="ACC1"))
    book(catalog, siu(patient="PAT-B^^^", control_id="S1"))

    matching = receive(ingest, folder, "matching", "PAT-A", "ACC1")
    swapped = receive(ingest, folder, "swapped", "PAT-Z", "ACC1")
    by_patient = receive(ingest, folder, "by-patient", "PAT-B", "ACC9")
    unscheduled = receive(ingest, folder, "unscheduled", "PAT-Q", "ACC8")
    with caplog.at_level(logging.WARNING, logger="appliance.prefetch.reconcile"):
        found = reconcile.reconcile(catalog)
    again = reconcile.reconcile(catalog)

    reasons = {m.study_uid: m.reason for m in found}
    assert set(reasons) == {swapped, unscheduled}
    assert matching not in reasons and by_patient not in reasons
    assert "accession ACC1 is scheduled for patient PAT-A" in reasons[swapped]
    assert (
        "matches no scheduled order (patient PAT-Q, accession ACC8)"
        in (reasons[unscheduled])
    )
    assert len(caplog.records) == 2
    assert not any("PAT-" in record.getMessage() for record in caplog.records)
    assert again == []
    assert {m.study_uid for m in reconcile.mismatches(catalog)} == {
        swapped,
        unscheduled,
    }


def test_the_mismatches_command_lists_and_forgets(site: Site) -> None:
    catalog, ingest, folder = site
    book(catalog, orm(patient="PAT-A^^^", accession="ACC1"))
    stray = receive(ingest, folder, "stray", "PAT-Q", "ACC8")
    reconcile.reconcile(catalog)
    program = [str(Path(sys.executable).parent / "appliance"), "prefetch", "mismatches"]
    where = ["--data-dir", str(folder)]

    listed = subprocess.run(
        [*program, *where, "--json"], capture_output=True, text=True, check=True
    )
    done = subprocess.run(
        [*program, *where, "--done", stray], capture_output=True, text=True, check=True
    )
    unknown = subprocess.run(
        [*program, *where, "--done", "1.2.3"], capture_output=True, text=True
    )

    assert [m["study_uid"] for m in json.loads(listed.stdout)] == [stray]
    assert done.stdout.strip() == "no mismatches"
    assert unknown.returncode == 1 and "not in the list" in unknown.stderr
