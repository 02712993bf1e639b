"""Copies on the tiers below online, in the catalog: packs, releases, and the
per-study counts that migration policies read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.catalog import copies
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord, NewInstance
from appliance.catalog.store import Catalog

STUDY = "1.2.826.0.1.3680043.10.1009.77.1"


def new_instance(study: str, number: int, sha: str = "") -> NewInstance:
    sop_uid = f"{study}.{number}"
    digest = sha or f"{number:064x}"
    record = InstanceRecord(
        sop_instance_uid=sop_uid,
        series_uid=f"{study}.0",
        study_uid=study,
        patient="CP-0001\x00",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=1000,
        sha256=digest,
        content_sha256=digest,
        received=time.time(),
        attributes={"SOPInstanceUID": sop_uid},
        copies=[Copy("online", f"key-{study}-{number}")],
    )
    return NewInstance(
        record=record,
        patient={"PatientID": "CP-0001", "PatientName": "TESTER^ANNA"},
        study={"StudyInstanceUID": study, "StudyDate": "20250102"},
        series={"SeriesInstanceUID": f"{study}.0", "Modality": "CT"},
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    catalog.record([new_instance(STUDY, n) for n in range(1, 4)], "refuse")
    yield catalog
    catalog.close()


def a_pack(catalog: Catalog, tier: str = "nearline", numbers=(1, 2, 3)) -> PackRecord:
    pack_id = copies.next_pack_id(catalog)
    return PackRecord(
        pack_id=pack_id,
        study_uid=STUDY,
        tier=tier,
        location=f"{pack_id}.tar",
        size=2500,
        sha256="ab" * 32,
        members={f"{STUDY}.{n}": f"instances/{n:06d}.dcm.zst" for n in numbers},
    )


def checksums(numbers=(1, 2, 3)) -> dict[str, str]:
    return {f"{STUDY}.{n}": f"{n:064x}" for n in numbers}


def where(catalog: Catalog) -> dict[str, int]:
    with catalog.read() as txn:
        found = copies.study_copies(catalog, txn, STUDY)
    assert found is not None
    return found.copies


def test_stored_study_is_counted_online(catalog: Catalog) -> None:
    assert where(catalog) == {"online": 3}


def test_pack_ids_are_new_every_time(catalog: Catalog) -> None:
    first, second = copies.next_pack_id(catalog), copies.next_pack_id(catalog)

    assert first != second
    assert first.startswith("p-") and STUDY not in first


def test_recorded_pack_adds_a_copy_to_each_instance(catalog: Catalog) -> None:
    pack = a_pack(catalog)

    added = copies.record_pack(catalog, pack, checksums())

    assert added == 3
    assert where(catalog) == {"online": 3, "nearline": 3}
    assert [p.pack_id for p in copies.packs_of(catalog, STUDY)] == [pack.pack_id]
    record = copies.instances_of(catalog, STUDY)[0]
    nearline = record.copy_on("nearline")
    assert nearline is not None and nearline.location.startswith(pack.pack_id + "/")
    assert catalog.counts()["bytes.nearline"] == 3000


def test_pack_of_changed_instance_does_not_count_for_it(catalog: Catalog) -> None:
    stale = checksums() | {f"{STUDY}.2": "ff" * 32}

    added = copies.record_pack(catalog, a_pack(catalog), stale)

    assert added == 2
    assert where(catalog) == {"online": 3, "nearline": 2}


def test_release_needs_other_verified_copies(catalog: Catalog) -> None:
    result = copies.release(catalog, STUDY, "online", min_copies=1)

    assert result.removed == []
    assert "would keep 0 verified copies" in result.refused
    assert where(catalog) == {"online": 3}


def test_release_with_a_pack_elsewhere(catalog: Catalog) -> None:
    copies.record_pack(catalog, a_pack(catalog), checksums())

    result = copies.release(catalog, STUDY, "online", min_copies=1)

    assert result.refused == ""
    assert sorted(result.removed) == [("online", f"key-{STUDY}-{n}") for n in (1, 2, 3)]
    assert where(catalog) == {"nearline": 3}
    assert (
        "bytes.online" not in catalog.counts() or catalog.counts()["bytes.online"] == 0
    )


def test_release_respects_min_copies(catalog: Catalog) -> None:
    copies.record_pack(catalog, a_pack(catalog), checksums())

    result = copies.release(catalog, STUDY, "online", min_copies=2)

    assert result.removed == [] and "2 required" in result.refused
    copies.record_pack(catalog, a_pack(catalog, "offline"), checksums())
    assert copies.release(catalog, STUDY, "online", min_copies=2).removed


def test_release_is_all_or_nothing(catalog: Catalog) -> None:
    copies.record_pack(catalog, a_pack(catalog, numbers=(1, 2)), checksums((1, 2)))

    result = copies.release(catalog, STUDY, "online", min_copies=1)

    assert result.removed == []
    assert where(catalog) == {"online": 3, "nearline": 2}


def test_release_of_a_pack_tier_forgets_its_packs(catalog: Catalog) -> None:
    pack = a_pack(catalog)
    copies.record_pack(catalog, pack, checksums())

    result = copies.release(catalog, STUDY, "nearline", min_copies=1)

    assert [p.pack_id for p in result.packs] == [pack.pack_id]
    assert copies.packs_of(catalog, STUDY) == []
    assert where(catalog) == {"online": 3}
    assert catalog.counts()["packbytes.nearline"] == 0


def test_staged_copies_are_added_once(catalog: Catalog) -> None:
    copies.record_pack(catalog, a_pack(catalog), checksums())
    copies.release(catalog, STUDY, "online", min_copies=1)
    staged = {uid: (f"new-{uid}", sha) for uid, sha in checksums().items()}

    unused = copies.add_copies(catalog, "online", staged)
    again = copies.add_copies(catalog, "online", staged)

    assert unused == []
    assert len(again) == 3
    assert where(catalog) == {"online": 3, "nearline": 3}


OPERATIONS = st.lists(
    st.sampled_from(["pack-nearline", "pack-offline", "release-online"])
    | st.sampled_from(["release-nearline", "release-offline", "stage"]),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(operations=OPERATIONS, min_copies=st.integers(0, 3))
def test_no_sequence_leaves_an_instance_without_a_copy(
    tmp_path_factory: pytest.TempPathFactory, operations: list[str], min_copies: int
) -> None:
    catalog = Catalog(tmp_path_factory.mktemp("seq") / "catalog", map_size=2**24)
    try:
        catalog.record([new_instance(STUDY, n) for n in range(1, 4)], "refuse")
        for operation in operations:
            action, tier = operation.partition("-")[::2]
            if action == "pack":
                copies.record_pack(catalog, a_pack(catalog, tier), checksums())
            elif action == "release":
                copies.release(catalog, STUDY, tier, min_copies)
            else:
                staged = {
                    u: (f"s-{u}-{time.time()}", s) for u, s in checksums().items()
                }
                copies.add_copies(catalog, "online", staged)

            for record in copies.instances_of(catalog, STUDY):
                assert [c for c in record.copies if c.verified]
            counts = where(catalog)
            for tier_name, count in counts.items():
                on_tier = [
                    r
                    for r in copies.instances_of(catalog, STUDY)
                    if r.copy_on(tier_name)
                ]
                assert len(on_tier) == count
    finally:
        catalog.close()
