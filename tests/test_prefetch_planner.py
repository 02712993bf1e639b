"""The prefetch planner on real tiers: priors chosen, pinned, recalled from
nearline and from an offline volume before the appointment; a shelved
volume asked for with the deadline; a cancellation drops everything."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from appliance import config as configuration
from appliance.catalog import copies, patients, pins, requests
from appliance.catalog.store import Catalog
from appliance.hl7 import acks, messages
from appliance.hsm import policy
from appliance.hsm.jobs import MigrationJob
from appliance.hsm.migrator import Migrator
from appliance.hsm.recall import Progress, Recaller, RecallResult
from appliance.hsm.tiers import Tiers
from appliance.ingest import Ingest
from appliance.prefetch import appointments, planner
from appliance.storage.keys import KeyStore
from appliance.storage.nearline import NearlineTier
from appliance.storage.offline import OfflineTier
from appliance.storage.online import OnlineTier
from appliance.storage.volumes import DirectoryLibrary
from tests.datasets import study_files, uid
from tests.hl7_samples import siu

DAY = 86400.0
NOW = time.time()
PATIENT = "PAT-0042"
SETTINGS = """
[prefetch]
lead_hours = 2.0
grace_hours = 24.0
priors = 3
max_prior_years = 3.0
match = "modality"

[[procedures]]
code = "CTHEAD"
modality = "CT"
body_part = "HEAD"
"""


def days_ago(days: float) -> str:
    return time.strftime("%Y%m%d", time.localtime(NOW - days * DAY))


def hl7_time(moment: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(moment))


class Spy(Recaller):
    """The real recaller, noting the order of the studies it was asked for."""

    def __init__(self, catalog: Catalog, tiers: Tiers) -> None:
        super().__init__(catalog, tiers)
        self.asked: list[str] = []

    def recall(
        self,
        study_uid: str,
        progress: Progress | None = None,
        why: str = "a study must be recalled",
    ) -> RecallResult:
        self.asked.append(study_uid)
        return super().recall(study_uid, progress, why=why)


@dataclass
class Site:
    catalog: Catalog
    tiers: Tiers
    library: DirectoryLibrary
    shelf: Path
    config: configuration.Config
    studies: dict[str, str] = field(default_factory=dict)
    clock: list[float] = field(default_factory=lambda: [NOW])

    def planner(self) -> tuple[planner.Planner, Spy]:
        spy = Spy(self.catalog, self.tiers)
        found = planner.Planner(
            self.catalog,
            spy,
            self.config,
            clock=lambda: self.clock[0],
            sleep=lambda s: None,
        )
        return found, spy

    def book(
        self, control_id: str, appointment: str, start: float, event: str = "S12"
    ) -> None:
        text = siu(
            event=event,
            control_id=control_id,
            appointment=appointment,
            patient=f"{PATIENT}^^^",
            sch11=f"^^30^{hl7_time(start)}",
        )
        parsed = messages.parse(text.encode())
        appointments.apply(self.catalog, messages.read(parsed), acks.accept(parsed))

    def online(self, name: str) -> bool:
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, self.studies[name])
        return found is not None and found.complete_on("online")

    def shelve(self, label: str) -> None:
        (self.library.path / label).rename(self.shelf / label)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    catalog = Catalog(tmp_path / "catalog", map_size=2**27)
    online = OnlineTier(tmp_path / "online")
    online.open()
    nearline = NearlineTier(tmp_path / "nearline")
    nearline.open()
    library = DirectoryLibrary(tmp_path / "volumes")
    offline = OfflineTier(library, tmp_path / "spool")
    offline.open()
    library.label("L00001", 50 * 2**20)
    keys = KeyStore.create_if_missing(tmp_path / "keys" / "master.keys")
    tiers = Tiers(online, {"nearline": nearline, "offline": offline}, keys)
    settings = tmp_path / "appliance.toml"
    settings.write_text(SETTINGS)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    found = Site(catalog, tiers, library, shelf, configuration.load(settings))
    ingest = Ingest(catalog, online, "refuse")
    try:
        studies = {
            # name: (modality, days before now, where it lives)
            "ct-old": ("CT", 400, "nearline"),
            "ct-recent": ("CT", 100, "offline"),
            "mr-recent": ("MR", 50, "nearline"),
            "ct-ancient": ("CT", 5 * 365, "nearline"),
        }
        migrator = Migrator(catalog, tiers, 1)
        for name, (modality, age, tier) in studies.items():
            files = study_files(
                tmp_path / "files" / name,
                name,
                3,
                patient_id=PATIENT,
                modality=modality,
                study_date=days_ago(age),
                pixel_bytes=4000,
            )
            for path in files:
                assert ingest.import_file(path, "test").ok
            found.studies[name] = uid("study", name)
            outcomes = migrator.move(found.studies[name], "online", tier)
            assert all(o.ok for o in outcomes), outcomes
        yield found
    finally:
        ingest.close()
        catalog.close()


def test_priors_of_tomorrows_ct_are_recalled_and_pinned(site: Site) -> None:
    start = NOW + DAY
    site.book("M1", "APT1", start)
    running, spy = site.planner()

    (plan,) = running.run()

    assert [p.study_uid for p in plan.priors] == [
        site.studies["ct-recent"],
        site.studies["ct-old"],
    ]
    assert plan.ready
    assert site.online("ct-recent") and site.online("ct-old")
    assert not site.online("mr-recent") and not site.online("ct-ancient")
    assert sorted(spy.asked) == sorted(
        [site.studies["ct-recent"], site.studies["ct-old"]]
    )
    held = pins.pinned(site.catalog, NOW)
    assert set(held) == {site.studies["ct-recent"], site.studies["ct-old"]}
    assert pins.pinned(site.catalog, start + 25 * 3600) == {}
    recorded = planner.recorded_plans(site.catalog)["appointment:APT1"]
    assert [p.state for p in recorded.priors] == ["online", "online"]


def test_a_pinned_prior_is_not_released(site: Site) -> None:
    site.book("M1", "APT1", NOW + DAY)
    running, _ = site.planner()
    running.run()
    study = site.studies["ct-old"]
    reason = pins.pinned(site.catalog, NOW)[study]
    facts = policy.StudyFacts(
        study_uid=study,
        instances=3,
        size_bytes=1,
        received=datetime.now(),
        verified={"online": 3, "nearline": 3},
        pinned_online=reason,
    )

    allowed, why = policy.may_release(facts, "online", 1)

    assert not allowed
    assert "prior for an appointment" in why


def test_a_shelved_volume_is_asked_for_with_the_deadline(site: Site) -> None:
    site.shelve("L00001")
    start = NOW + DAY
    site.book("M1", "APT1", start)
    running, _ = site.planner()

    (plan,) = running.run()

    states = {p.study_uid: (p.state, p.detail) for p in plan.priors}
    assert states[site.studies["ct-recent"]] == ("waiting for volume", "L00001")
    assert states[site.studies["ct-old"]][0] == "online"
    (request,) = requests.open_requests(site.catalog)
    assert request.volume == "L00001"
    deadline = time.strftime("%Y-%m-%d %H:%M", time.localtime(start - 2 * 3600))
    assert deadline in request.reason


def test_a_prior_still_missing_after_its_deadline_is_late(site: Site) -> None:
    site.shelve("L00001")
    site.book("M1", "APT1", NOW + 3600)  # deadline: an hour ago
    running, _ = site.planner()

    (plan,) = running.run()

    late = [p for p in plan.priors if p.state == "late"]
    assert [p.study_uid for p in late] == [site.studies["ct-recent"]]
    assert late[0].detail == "L00001"


def test_a_cancelled_appointment_recalls_nothing_and_unpins(site: Site) -> None:
    site.book("M1", "APT1", NOW + DAY)
    first, _ = site.planner()
    first.plan()
    assert pins.pinned(site.catalog, NOW)

    site.book("M2", "APT1", NOW + DAY, event="S15")
    running, spy = site.planner()
    plans = running.run()

    assert plans == [] and spy.asked == []
    assert pins.pinned(site.catalog, NOW) == {}
    assert not site.online("ct-recent")


def test_earliest_deadline_first_and_one_volume_read_once(site: Site) -> None:
    # Two patients' worth of appointments share the same priors; the
    # later appointment's prior on the same volume comes right after.
    site.book("M1", "LATER", NOW + 2 * DAY)
    site.book("M2", "SOONER", NOW + DAY)
    running, spy = site.planner()

    plans = running.run()

    assert {p.appointment_id for p in plans} == {
        "appointment:LATER",
        "appointment:SOONER",
    }
    # Each prior is recalled once, however many appointments want it.
    assert sorted(spy.asked) == sorted(
        [site.studies["ct-recent"], site.studies["ct-old"]]
    )
    assert all(plan.ready for plan in plans)


def test_grouping_puts_the_same_volume_together() -> None:
    def entry(deadline: float, study: str) -> tuple[planner.Plan, planner.Prior]:
        return planner.Plan(study, deadline + 7200, deadline), planner.Prior(
            study, "to recall"
        )

    waiting = [entry(1, "a"), entry(2, "b"), entry(3, "c"), entry(4, "d")]
    sources = {"a": "offline L1", "b": "offline L2", "c": "offline L1", "d": "nearline"}

    order = [prior.study_uid for _plan, prior in planner._grouped(waiting, sources)]

    assert order == ["a", "c", "b", "d"]


def test_prefetch_status_shows_each_prior_and_the_counts(
    site: Site, tmp_path: Path
) -> None:
    site.shelve("L00001")
    site.book("M1", "APT1", NOW + DAY)
    running, _ = site.planner()
    running.run()
    program = Path(sys.executable).parent / "appliance"

    shown = subprocess.run(
        [str(program), "prefetch", "status", "--data-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    table = subprocess.run(
        [str(program), "prefetch", "status", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    report = json.loads(shown.stdout)
    assert (report["ready"], report["waiting"], report["late"]) == (0, 1, 0)
    (row,) = report["appointments"]
    assert row["patients"] == [[PATIENT, ""]]
    assert [p["state"] for p in row["priors"]] == ["waiting for volume", "online"]
    assert "1 appointments: 0 ready, 1 priors waiting for a volume, 0 late" in (
        table.stdout
    )


def test_a_rescheduled_appointment_moves_its_deadline_and_pins(site: Site) -> None:
    site.book("M1", "APT1", NOW + 2 * DAY)
    first, _ = site.planner()
    (before,) = first.plan()

    site.book("M2", "APT1", NOW + DAY, event="S13")
    running, _ = site.planner()
    (after,) = running.run()

    assert before.start == pytest.approx(NOW + 2 * DAY, abs=1)
    assert after.start == pytest.approx(NOW + DAY, abs=1)
    assert after.deadline == pytest.approx(NOW + DAY - 2 * 3600, abs=1)
    study = site.studies["ct-old"]
    assert study in pins.pinned(site.catalog, NOW + DAY + 23 * 3600)
    assert study not in pins.pinned(site.catalog, NOW + DAY + 25 * 3600)


def test_many_appointments_are_served_earliest_deadline_first(site: Site) -> None:
    # The same patient's priors for appointments booked in reverse order:
    # the recalls follow the deadlines, not the order of the bookings.
    for number, days in enumerate((3.0, 2.5, 2.0, 1.5, 1.0)):
        site.book(f"M{number}", f"APT{number}", NOW + days * DAY)
    site.clock[0] = NOW
    running, spy = site.planner()

    plans = running.run()

    starts = [plan.start for plan in plans]
    assert starts == sorted(starts)
    assert len(plans) == 5 and all(plan.ready for plan in plans)
    # Each prior once, whatever the number of appointments wanting it.
    assert len(spy.asked) == len(set(spy.asked)) == 2


def test_first_retrievals_after_the_appointment_give_the_hit_rate(site: Site) -> None:
    site.shelve("L00001")
    start = NOW + DAY
    site.book("M1", "APT1", start)
    running, _ = site.planner()
    running.run()  # ct-old comes online; ct-recent waits for its volume
    old, recent = site.studies["ct-old"], site.studies["ct-recent"]

    pins.note_retrievals(site.catalog, {old}, set(), start - 600)  # too early
    pins.note_retrievals(site.catalog, {old, recent}, {recent}, start + 600)
    pins.note_retrievals(site.catalog, {old, recent}, set(), start + 900)  # again

    assert pins.hit_rate(site.catalog, since=NOW) == (1, 2)


def test_the_watermark_does_not_release_pinned_priors(
    site: Site, tmp_path: Path
) -> None:
    site.book("M1", "APT1", NOW + DAY)
    running, _ = site.planner()
    running.run()
    mr = site.studies["mr-recent"]
    Recaller(site.catalog, site.tiers).recall(mr)  # online, not a prior
    full = configuration.load(
        None,
        {
            "online.capacity_bytes": 1000,
            "migration.min_copies": 1,
            "storage.data_dir": str(tmp_path),
        },
    )
    job = MigrationJob(site.catalog, site.tiers, full)

    plan = job.plan(watermarks_only=True)

    released = {d.study_uid for d in plan.actions if d.action == "release"}
    assert mr in released
    assert site.studies["ct-old"] not in released
    assert site.studies["ct-recent"] not in released


def test_an_appointment_under_a_merged_id_gets_the_survivors_priors(
    site: Site,
) -> None:
    with site.catalog.env.begin(write=True) as txn:
        patients.merge(site.catalog, txn, ("PAT-NEW", ""), (PATIENT, ""), {}, "A40")
    site.book("M1", "APT1", NOW + DAY)
    running, _ = site.planner()

    (plan,) = running.run()

    assert [p.study_uid for p in plan.priors] == [
        site.studies["ct-recent"],
        site.studies["ct-old"],
    ]
