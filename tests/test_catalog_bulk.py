"""A bulk-loaded catalog holds, database by database and byte for byte,
what the catalog's writer and the copy recording leave: records, counts,
indexes, copies, the ``meta`` totals and counters (journal and queue
aside: a rebuilt catalog drops those). Generated catalogs with several
series and senders per study, duplicates, instances that do not fit the
patient/study/series tree, packs on the mirror and on volumes, packs that
overlap, packs missing, and members whose bytes changed."""

from __future__ import annotations

import random
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.catalog import copies
from appliance.catalog.bulk import HELD, BulkLoad
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord, NewInstance, patient_key
from appliance.catalog.replication import OFFSITE, Queued, mark_replicated
from appliance.catalog.store import Catalog, Outcome
from appliance.errors import CatalogError

MAP_SIZE = 2**28
NAMES = ("DOE^JANE", "Roe^Richard=ロウ^リチャード", "", "MUSTER^ERIKA^^DR")


def _instances(rng: random.Random, count: int) -> list[NewInstance]:
    """Made-up instances, some naming UIDs already used (the same bytes or
    other bytes, another study or patient)."""
    made: list[NewInstance] = []
    for n in range(count):
        if made and rng.random() < 0.15:
            made.append(_clash(rng, rng.choice(made), n))
            continue
        number = rng.randrange(max(1, count // 3))
        study = f"1.2.826.0.1.3680043.9.9.{number}"
        # A study belongs to one patient; a patient has about two studies.
        patient_id = f"P{number // 2:04d}"
        issuer = "HOSP" if number % 3 == 0 else ""
        series = f"{study}.{rng.randrange(3)}"
        record = InstanceRecord(
            sop_instance_uid=f"{series}.{n}",
            series_uid=series,
            study_uid=study,
            patient=patient_key(patient_id, issuer),
            transfer_syntax="1.2.840.10008.1.2.1",
            size=rng.randrange(100, 5000),
            sha256=f"{rng.getrandbits(64):016x}",
            content_sha256=f"{rng.getrandbits(64):016x}",
            received=1_700_000_000 + n + rng.random(),
            attributes={"SOPClassUID": rng.choice(("1.2.3.4", "1.2.3.5"))},
        )
        if rng.random() < 0.05:
            # Longer than LMDB keys may be: filed under its hash.
            record.sop_instance_uid += "." + "9" * 420
        patient = {"PatientID": patient_id, "PatientName": rng.choice(NAMES)}
        if issuer:
            patient["IssuerOfPatientID"] = issuer
        levels = {"AccessionNumber": rng.choice(("", f"A{n}")), "StudyDate": ""}
        levels["StudyDate"] = rng.choice(("", "20240105", "2023.11.30"))
        made.append(
            NewInstance(
                record,
                patient,
                {k: v for k, v in levels.items() if v},
                {"Modality": rng.choice(("CT", "MR", ""))},
                rng.choice(("", "MODALITY1", "PACS")),
            )
        )
    return made


def _clash(rng: random.Random, earlier: NewInstance, n: int) -> NewInstance:
    """An instance whose UIDs clash with ``earlier``'s in one way or another."""
    record = InstanceRecord.from_json(
        earlier.record.sop_instance_uid, earlier.record.as_json()
    )
    way = rng.choice(("same", "other bytes", "series elsewhere", "other patient"))
    if way == "other bytes":
        record.content_sha256 = f"changed{n}"
    elif way == "series elsewhere":
        record.sop_instance_uid += f".x{n}"
        record.study_uid += ".other"
    elif way == "other patient":
        record.sop_instance_uid += f".y{n}"
        record.series_uid += f".y{n}"
        record.patient = patient_key(f"Q{n}", "")
    return NewInstance(
        record, dict(earlier.patient), dict(earlier.study), dict(earlier.series)
    )


def _packs(rng: random.Random, items: list[NewInstance]) -> list[PackRecord]:
    """Packs holding instances in overlapping groups, some on volumes, some
    naming an instance the catalog lacks."""
    uids = [item.record.sop_instance_uid for item in items]
    packs = []
    for number in range(1, max(2, len(uids) // 3)):
        members = rng.sample(uids, min(len(uids), rng.randrange(1, 6)))
        if rng.random() < 0.2:
            members.append(f"9.9.unknown.{number}")
        tier = OFFSITE if rng.random() < 0.7 else "offline"
        packs.append(
            PackRecord(
                pack_id=f"p-{number:09d}",
                study_uid="" if tier == OFFSITE else f"1.2.study.{number}",
                tier=tier,
                location=f"packs/p-{number:09d}.pack",
                size=rng.randrange(1000, 90000),
                sha256=f"{number:064x}",
                members={uid: f"m{i}" for i, uid in enumerate(members)},
                created=1.5,
                verified=2.5,
            )
        )
    return packs


def _checksums(
    rng: random.Random, missing: dict[str, str], number: int
) -> dict[str, str]:
    """The SHA-256 a pack's manifest gives, now and then not the catalog's."""
    return {
        uid: (sha if rng.random() < 0.9 else f"stale{number}")
        for uid, sha in missing.items()
    }


def _by_writer(
    catalog: Catalog, items: list[NewInstance], packs: list[PackRecord], seed: int
) -> list[Outcome]:
    """The catalog as the writer and the copy recording leave it."""
    outcomes = [r.outcome for r in catalog.record(_fresh(items), "keep_first")]
    rng = random.Random(seed)
    for pack in packs:
        missing = {}
        with catalog.read() as txn:
            for uid in pack.members:
                record = catalog.instance(txn, uid)
                if record is not None and record.copy_on(pack.tier) is None:
                    missing[uid] = record.sha256
        checksums = _checksums(rng, missing, len(missing))
        if pack.tier == OFFSITE:
            sent = [Queued(0, uid, 0, 0.0) for uid in pack.members]
            mark_replicated(catalog, pack, sent, checksums)
        else:
            copies.record_pack(catalog, pack, checksums)
        if rng.random() < 0.3:
            copies.mark_unverified(catalog, pack.pack_id, list(checksums))
    return outcomes


def _with_copies(
    rng: random.Random, items: list[NewInstance], packs: list[PackRecord]
) -> list[NewInstance]:
    """The items, each with a copy in the first pack that lists it (now and
    then not verified), as a rebuilt catalog's export hands them in."""
    places: dict[str, Copy] = {}
    for pack in packs:
        for uid, member in pack.members.items():
            verified = rng.random() < 0.8
            places.setdefault(
                uid, Copy(pack.tier, f"{pack.pack_id}/{member}", verified)
            )
    handed = _fresh(items)
    for item in handed:
        place = places.get(item.record.sop_instance_uid)
        item.record.copies = (
            [Copy(place.tier, place.location, place.verified)] if place else []
        )
    return handed


def _handed_to_writer(
    catalog: Catalog, items: list[NewInstance], packs: list[PackRecord]
) -> list[Outcome]:
    """The writer given the instances with their copies, then the packs
    recorded with no copy to add."""
    outcomes = [r.outcome for r in catalog.record(_fresh(items), "keep_first")]
    for pack in packs:
        if pack.tier == OFFSITE:
            mark_replicated(catalog, pack, [], {})
        else:
            copies.record_pack(catalog, pack, {})
    return outcomes


def _by_bulk(
    catalog: Catalog,
    items: list[NewInstance],
    packs: list[PackRecord],
    held: int = HELD,
) -> list[Outcome]:
    load = BulkLoad(catalog, held)
    outcomes = [load.add(item) for item in _fresh(items)]
    for pack in packs:
        load.add_pack(pack)
    load.commit()
    return outcomes


def _fresh(items: list[NewInstance]) -> list[NewInstance]:
    """Copies of the items: a writer may change what it is handed."""
    return [
        NewInstance(
            InstanceRecord.from_json(
                item.record.sop_instance_uid, item.record.as_json()
            ),
            dict(item.patient),
            dict(item.study),
            dict(item.series),
            item.calling_ae,
        )
        for item in items
    ]


def _contents(catalog: Catalog) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every database but the journal and the queue, as stored, and
    ``meta`` without the journal's counter."""
    found = {}
    with catalog.env.begin() as txn:
        for name, db in catalog.db.items():
            if name in ("journal", "replication"):
                continue
            pairs = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
            if name == "meta":
                pairs = [p for p in pairs if p[0] != b"journal.next"]
            found[name] = pairs
    return found


def _compare(tmp_path: Path, seed: int, count: int, held: int = HELD) -> None:
    rng = random.Random(seed)
    items = _instances(rng, count)
    packs = _packs(rng, items)
    items = _with_copies(rng, items, packs)
    # Hypothesis calls this many times with one tmp_path.
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    written = Catalog(folder / "writer", MAP_SIZE)
    loaded = Catalog(folder / "bulk", MAP_SIZE)
    try:
        expected = _handed_to_writer(written, items, packs)
        assert _by_bulk(loaded, items, packs, held) == expected
        want, got = _contents(written), _contents(loaded)
        for name in want:
            assert got[name] == want[name], name
        assert loaded.counts() == written.counts()
    finally:
        written.close()
        loaded.close()


@pytest.mark.parametrize("seed", range(6))
def test_a_bulk_load_writes_what_the_writer_writes(tmp_path: Path, seed: int) -> None:
    _compare(tmp_path, seed, 120)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("held", [4, 9])
def test_patients_studies_and_series_let_go_come_back_as_they_were(
    tmp_path: Path, seed: int, held: int
) -> None:
    """Held a few at a time, the others written and read back as needed."""
    _compare(tmp_path, seed, 150, held)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 40),
    held=st.sampled_from((4, 7, HELD)),
)
def test_any_generated_catalog_loads_as_written(
    tmp_path: Path, seed: int, count: int, held: int
) -> None:
    _compare(tmp_path, seed, count, held)


def test_the_generated_data_covers_every_case(tmp_path: Path) -> None:
    """The comparison is worth something only if the data reaches each rule."""
    rng = random.Random(3)
    items = _instances(rng, 400)
    packs = _packs(rng, items)
    items = _with_copies(rng, items, packs)
    catalog = Catalog(tmp_path / "cases", MAP_SIZE)
    try:
        outcomes = set(_by_bulk(catalog, items, packs))
        with catalog.read() as txn:
            studies = [s for _k, s in catalog.all_records(txn, "studies")]
            records = [r for _k, r in catalog.all_records(txn, "instances")]
    finally:
        catalog.close()
    assert outcomes == set(Outcome) - {Outcome.REFUSED, Outcome.REPLACED}
    assert any(len(s["modalities"]) > 1 for s in studies)
    assert any(len(s["calling_aes"]) > 1 for s in studies)
    assert any(s["series"] > 1 for s in studies)
    kinds = [tuple(sorted(c["verified"] for c in r["copies"])) for r in records]
    assert {(), (True,), (False,)} <= set(kinds)


def test_a_catalog_holding_instances_is_not_bulk_loaded(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "held", MAP_SIZE)
    try:
        item = _instances(random.Random(1), 1)[0]
        catalog.record([item], "keep_first")
        with pytest.raises(CatalogError, match="not empty"):
            BulkLoad(catalog)
    finally:
        catalog.close()


def test_copies_handed_in_are_counted(tmp_path: Path) -> None:
    """An instance recorded with a copy already counts it, as the writer does."""
    item = _instances(random.Random(2), 1)[0]
    item.record.copies = [Copy("online", "ab/cd.dcm"), Copy("offsite", "p/x", False)]
    written = Catalog(tmp_path / "writer", MAP_SIZE)
    loaded = Catalog(tmp_path / "bulk", MAP_SIZE)
    try:
        _by_writer(written, [item], [], 0)
        _by_bulk(loaded, [item], [])
        assert _contents(loaded) == _contents(written)
    finally:
        written.close()
        loaded.close()


def _study_instances(count: int, studies: int) -> Iterator[NewInstance]:
    """``count`` made-up instances spread over a fixed number of studies,
    made one at a time so that only the load holds anything."""
    for n in range(count):
        study = f"1.2.826.0.1.3680043.9.7.{n % studies}"
        series = f"{study}.{n % 3}"
        record = InstanceRecord(
            sop_instance_uid=f"{series}.{n}",
            series_uid=series,
            study_uid=study,
            patient=patient_key(f"P{n % studies:04d}", ""),
            transfer_syntax="1.2.840.10008.1.2.1",
            size=1000 + n,
            sha256=f"{n:064x}",
            content_sha256=f"{n:064x}",
            received=1_700_000_000 + n,
            attributes={"SOPClassUID": "1.2.3.4", "InstanceNumber": str(n)},
            # In the pack on the mirror of every 50 (see _load_peak).
            copies=[Copy(OFFSITE, f"p-{n // 50 * 50:09d}/m{n}")],
        )
        patient = {"PatientID": f"P{n % studies:04d}", "PatientName": "DOE^JANE"}
        yield NewInstance(record, patient, {"StudyDate": "20240105"}, {})


def _load_peak(tmp_path: Path, count: int) -> int:
    """The most memory a bulk load of ``count`` instances, five to a study,
    with a pack on the mirror per 50 of them, held at once."""
    catalog = Catalog(tmp_path / f"peak-{count}", 2**30)
    studies = count // 5
    tracemalloc.start()
    try:
        load = BulkLoad(catalog, held=100)
        for item in _study_instances(count, studies):
            assert load.add(item) is Outcome.STORED
        for first in range(0, count, 50):
            members = {
                f"1.2.826.0.1.3680043.9.7.{n % studies}.{n % 3}.{n}": f"m{n}"
                for n in range(first, min(count, first + 50))
            }
            pack = PackRecord(
                f"p-{first:09d}", "", OFFSITE, "packs", 1, "0" * 64, members
            )
            load.add_pack(pack)
        load.commit()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        catalog.close()


def test_a_bulk_load_holds_no_more_for_a_larger_archive(tmp_path: Path) -> None:
    """Four times the instances in four times the studies: the load's
    memory (LMDB's own pages aside, which it writes out past a bound)
    barely grows, where holding each instance or study would take four
    times as much."""
    small = _load_peak(tmp_path, 2000)
    large = _load_peak(tmp_path, 8000)
    assert large < 1.3 * small, (small, large)

    catalog = Catalog(tmp_path / "peak-8000", 2**30)
    try:
        counts = catalog.counts()
    finally:
        catalog.close()
    assert (counts["instances"], counts["studies"]) == (8000, 1600)
    assert counts["bytes.offsite"] == sum(range(1000, 9000))
