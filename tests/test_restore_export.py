"""Which copy each instance keeps in a rebuilt catalog: the newest pack on
the mirror that holds it; failing that the newest pack not there, its copy
then not verified and reported; none for instances that never reached the
mirror."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord, NewInstance, patient_key
from appliance.catalog.replication import OFFSITE, Queued, mark_replicated
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.restore.check import check
from appliance.restore.export import export, finish
from appliance.restore.mirror import MirrorContents, RemoteFile

MAP_SIZE = 2**26
STUDY = "1.2.826.0.1.3680043.9.5.1"


def _item(name: str) -> NewInstance:
    record = InstanceRecord(
        sop_instance_uid=f"{STUDY}.1.{name}",
        series_uid=f"{STUDY}.1",
        study_uid=STUDY,
        patient=patient_key("EXPORT01", ""),
        transfer_syntax="1.2.840.10008.1.2.1",
        size=100 + len(name),
        sha256=f"{ord(name):064x}",
        content_sha256=f"{ord(name):064x}",
        received=1_700_000_000 + ord(name),
        attributes={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
        copies=[Copy("online", f"ab/{name}.dcm")],
    )
    patient = {"PatientID": "EXPORT01", "PatientName": "TESTER^EXPORT"}
    return NewInstance(record, patient, {"StudyDate": "20240105"}, {"Modality": "OT"})


def _replicated(work: Catalog, number: int, names: str) -> None:
    members = {f"{STUDY}.1.{n}": f"{i:07d}" for i, n in enumerate(names)}
    pack = PackRecord(
        f"p-{number:09d}", "", OFFSITE, f"packs/{number}", 1000, "0" * 64, members
    )
    with work.read() as txn:
        checksums = {uid: work.instance(txn, uid).sha256 for uid in members}
    sent = [Queued(0, uid, 0, 0.0) for uid in members]
    mark_replicated(work, pack, sent, checksums)


def test_each_instance_keeps_the_newest_copy_the_mirror_holds(tmp_path: Path) -> None:
    work = Catalog(tmp_path / "work", MAP_SIZE)
    final = Catalog(tmp_path / "final", MAP_SIZE)
    try:
        work.record([_item(name) for name in "abcde"], "keep_first")
        # a and b in pack 1; b sent again in pack 2 with c; d only in pack
        # 3, which the mirror lost; e never reached the mirror.
        _replicated(work, 1, "ab")
        _replicated(work, 2, "bc")
        _replicated(work, 3, "d")
        on_mirror = {f"p-{n:09d}": RemoteFile(f"packs/{n}", 1000) for n in (1, 2)}
        contents = MirrorContents(packs=on_mirror, highest_pack=3)

        exported = export(work, final, contents)
        finish(final, 0, 4)
        check(final, contents, exported.instances)

        with final.read() as txn:
            copies = {
                name: final.instance(txn, f"{STUDY}.1.{name}").copies for name in "abcd"
            }
            assert final.instance(txn, f"{STUDY}.1.e") is None
        assert copies == {
            "a": [Copy(OFFSITE, "p-000000001/0000000", True)],
            "b": [Copy(OFFSITE, "p-000000002/0000000", True)],
            "c": [Copy(OFFSITE, "p-000000002/0000001", True)],
            "d": [Copy(OFFSITE, "p-000000003/0000000", False)],
        }
        assert exported.instances == 4
        assert exported.missing == {"p-000000003": [f"{STUDY}.1.d"]}
        assert [lost["sop_instance_uid"] for lost in exported.lost] == [f"{STUDY}.1.e"]
        with final.read() as txn:
            study = final.get(txn, "studies", STUDY)
        # Only verified copies count in the study's tiers.
        assert study is not None and study["copies"] == {OFFSITE: 3}
    finally:
        work.close()
        final.close()


def _rebuilt(tmp_path: Path) -> tuple[Catalog, MirrorContents, int]:
    """A rebuilt catalog of four instances in packs 1 and 2, both there."""
    work = Catalog(tmp_path / "work", MAP_SIZE)
    final = Catalog(tmp_path / "final", MAP_SIZE)
    try:
        work.record([_item(name) for name in "abcd"], "keep_first")
        _replicated(work, 1, "ab")
        _replicated(work, 2, "cd")
        on_mirror = {f"p-{n:09d}": RemoteFile(f"packs/{n}", 1000) for n in (1, 2)}
        contents = MirrorContents(packs=on_mirror, highest_pack=2)
        exported = export(work, final, contents)
        finish(final, 0, 3)
    finally:
        work.close()
    return final, contents, exported.instances


def _change(
    catalog: Catalog, db: str, key: str, change: Callable[[dict], None]
) -> None:
    with catalog.env.begin(write=True) as txn:
        record = catalog.get(txn, db, key)
        assert record is not None
        change(record)
        catalog._put(txn, db, key, record)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (
            lambda c: _change(
                c,
                "instances",
                f"{STUDY}.1.a",
                lambda r: r["copies"].append(dict(r["copies"][0], tier="online")),
            ),
            "has copies",
        ),
        (
            lambda c: _change(
                c,
                "instances",
                f"{STUDY}.1.a",
                lambda r: r["copies"][0].update(location="p-000000002/0000000"),
            ),
            "does not list it",
        ),
        (
            lambda c: _change(c, "studies", STUDY, lambda r: r.update(instances=5)),
            "counts 5 instances, 4 found",
        ),
        (
            lambda c: _change(
                c, "patients", "EXPORT01\x00", lambda r: r.update(instances=1)
            ),
            "counts 1 instances, 4 found",
        ),
    ],
)
def test_the_check_finds_what_is_wrong(
    tmp_path: Path, damage: Callable[[Catalog], None], said: str
) -> None:
    final, contents, instances = _rebuilt(tmp_path)
    try:
        check(final, contents, instances)
        damage(final)
        with pytest.raises(CatalogError, match=said):
            check(final, contents, instances)
    finally:
        final.close()


def test_the_check_finds_a_verified_copy_in_a_pack_not_there(tmp_path: Path) -> None:
    final, contents, instances = _rebuilt(tmp_path)
    try:
        contents.packs.pop("p-000000002")
        with pytest.raises(
            CatalogError, match=r"p-000000002 of .* is not on the mirror"
        ):
            check(final, contents, instances)
    finally:
        final.close()
