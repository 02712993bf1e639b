"""Which studies a restore brings back first, and where it leaves old ones:
the order by appointments and age, the studies left on the mirror (and
recalled from it when asked for), and those packed onto nearline."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.catalog.records import patient_key
from appliance.catalog.store import Catalog
from appliance.hl7.messages import PatientIdentifier
from appliance.prefetch.appointments import APPOINTMENTS, Appointment
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore.cache import PackCache
from appliance.restore.data import DataRestore, Placement
from appliance.restore.mirror import Fetcher, survey
from appliance.restore.order import StudyFacts, order, upcoming_patients
from appliance.storage.keys import KeyStore, key_store_path
from tests.datasets import uid
from tests.restore_site import Restored, appliance, mirror_settings, online_bytes

NOW = time.mktime((2026, 12, 5, 12, 0, 0, 0, 0, -1))


def _facts(uid_: str, patient: str, date: str) -> StudyFacts:
    return StudyFacts(uid_, patient, date, received=NOW - 86400)


def test_patients_expected_soon_come_first_then_newest_first() -> None:
    facts = [
        _facts("old-a", "A", "20200101"),
        _facts("new-b", "B", "20261201"),
        _facts("mid-c", "C", "20250101"),
        _facts("new-a", "A", "20261101"),
        _facts("c-again", "C", "20240101"),
    ]
    expected = {"C": NOW + 7200, "A": NOW + 3600}

    chosen = order(facts, expected, online_days=0, older_studies="mirror", now=NOW)

    # A's appointment is the earlier one; newest first within each patient.
    assert chosen.studies == ["new-a", "old-a", "mid-c", "c-again", "new-b"]
    assert chosen.expected == 4
    assert not chosen.left_on_mirror and not chosen.to_nearline


def test_old_studies_are_left_on_the_mirror_or_sent_to_nearline() -> None:
    facts = [
        _facts("recent", "A", "20261001"),
        _facts("old", "A", "20200101"),
        _facts("old-expected", "B", "20190101"),
        _facts("no-date", "C", ""),  # received yesterday: recent
    ]
    expected = {"B": NOW + 3600}

    left = order(facts, expected, online_days=365, older_studies="mirror", now=NOW)
    packed = order(facts, expected, online_days=365, older_studies="nearline", now=NOW)

    assert left.studies == ["old-expected", "no-date", "recent"]
    assert left.left_on_mirror == ["old"]
    assert packed.studies == ["old-expected", "no-date", "recent", "old"]
    assert packed.to_nearline == {"old"}


def _book(catalog: Catalog, appointment_id: str, patient: str, start: float) -> None:
    appointment = Appointment(
        appointment_id, "booked", start, [PatientIdentifier(patient, "")]
    )
    with catalog.env.begin(write=True) as txn:
        catalog._put(txn, APPOINTMENTS, appointment_id, appointment.as_json())


def test_a_plan_puts_the_studies_of_a_booked_patient_first(disaster, site) -> None:
    _folder, _held, _found, studies = disaster
    restored, mirror = site
    done = restored.restore("--background")
    assert done.returncode == 0, done.stderr
    assert "restores in the background" in done.stdout

    catalog = restored.catalog()
    try:
        _book(catalog, "APPT-1", "P2", time.time() + 3600)
        _book(catalog, "APPT-GONE", "TEST-0001", time.time() - 86400)
        assert upcoming_patients(catalog) == {patient_key("P2", ""): _start(catalog)}
        plan = _data_restore(restored, mirror, catalog).plan()
    finally:
        catalog.close()

    first = uid("study", "mr-new")
    assert plan.studies[0] == first
    assert plan.expected == 1
    assert plan.studies[1] == uid("study", "cr-last")  # then the newest
    assert len(plan.studies) == len(studies)


def _start(catalog: Catalog) -> float:
    with catalog.read() as txn:
        data = catalog.get(txn, APPOINTMENTS, "APPT-1")
    assert data is not None
    return float(data["start"])


def _data_restore(restored: Restored, mirror: Path, catalog: Catalog) -> DataRestore:
    transport = DirectoryTransport(mirror)
    folder = restored.data_dir / "restore"
    return DataRestore(
        catalog,
        restored.config.online_path,
        0,
        KeyStore.load(key_store_path(restored.data_dir)),
        PackCache(folder / "packs", Fetcher(transport), 10**9),
        survey(transport),
        folder,
        Placement(),
    )


def test_old_studies_stay_on_the_mirror_until_asked_for(disaster, site) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    restored = Restored(
        restored.folder,
        mirror_settings(mirror),
        restored.escrow,
        {"restore": {"online_days": 365}},
    )

    done = restored.restore()

    assert done.returncode == 0, done.stdout + done.stderr
    assert "left on the mirror" in done.stdout
    report = restored.report()
    old = studies["ct-old"] + studies["ct-mid"] + studies["us-late"]
    assert sorted(report["left_on_mirror"]) == sorted(set(old))
    assert sorted(report["restored"]) == sorted(studies["mr-new"] + studies["cr-last"])
    status = appliance("restore", "status", config=restored.config_path)
    assert "finished" in status.stdout

    # Asked for, an old study comes back from the mirror, byte for byte.
    recalled = appliance("recall", uid("study", "ct-mid"), config=restored.config_path)
    assert recalled.returncode == 0, recalled.stderr
    catalog = restored.catalog()
    try:
        online = online_bytes(catalog, restored.config.online_path)
    finally:
        catalog.close()
    for instance in studies["ct-mid"]:
        assert online[instance] == held[instance]
    assert not list((restored.data_dir / "restore" / "recall").glob("recall-*"))


def test_old_studies_can_go_to_nearline(disaster, site) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    restored = Restored(
        restored.folder,
        mirror_settings(mirror),
        restored.escrow,
        {"restore": {"online_days": 365, "older_studies": "nearline"}},
    )

    done = restored.restore()

    assert done.returncode == 0, done.stdout + done.stderr
    old = set(studies["ct-old"] + studies["ct-mid"] + studies["us-late"])
    catalog = restored.catalog()
    try:
        with catalog.read() as txn:
            for instance in held:
                record = catalog.instance(txn, instance)
                assert record is not None
                on_nearline = record.copy_on("nearline") is not None
                online = record.copy_on("online") is not None
                assert (on_nearline, online) == (
                    (True, False) if instance in old else (False, True)
                ), instance
    finally:
        catalog.close()
    assert sorted(restored.report()["restored"]) == sorted(held)
