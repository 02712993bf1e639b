"""A rebuilt catalog made from a copy of the work catalog holds, database by
database and byte for byte, what the bulk export writes from it: generated
work catalogs (written by the catalog's writer, with duplicates, instances
that do not fit the tree, packs on the mirror and on volumes, overlapping,
some missing, some copies unverified) restored from the mirror and from
volumes, with instances, series, studies and patients that never reached
the tier and must go."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

from appliance.catalog import codec, patients
from appliance.catalog.records import Copy
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import POINTERS_BY_TARGET, Catalog
from appliance.prefetch.appointments import Seen, remember
from appliance.restore.adopt import adopt
from appliance.restore.check import check
from appliance.restore.export import Exported, export, finish
from appliance.restore.mirror import MirrorContents, RemoteFile
from tests.test_catalog_bulk import _by_writer, _instances, _packs

MAP_SIZE = 2**28


def _contents(catalog: Catalog) -> dict[str, list[tuple[bytes, bytes]]]:
    found = {}
    with catalog.env.begin() as txn:
        for name, db in catalog.db.items():
            found[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
        # The named databases themselves: nothing left over.
        found[""] = [(bytes(k), b"") for k, _ in txn.cursor()]
    return found


def _answers(work: Catalog, rng: random.Random) -> set[bytes]:
    """ACKs remembered as the HL7 intake remembers them, some of them as
    kept before the message type was (the ACK's MSH-9 tells it then); the
    keys of those a restore keeps."""
    events = [("ADT", "A08"), ("ADT", "A40"), ("SIU", "S12"), ("ORM", "O01")]
    kept = set()
    for n in range(rng.randint(5, 40)):
        kind, event = rng.choice(events)
        control_id = f"C{n:04d}"
        ack = (
            f"MSH|^~\\&|PACS|H|RIS|H|20261205||ACK^{event}^ACK|A{n}|P|2.5\r"
            f"MSA|AA|{control_id}"
        ).encode()
        seen = Seen(f"RIS^H{n % 3}", control_id, f"{kind}^{event}")
        remember(work, seen, ack, f"digest-{n}", lambda txn: None)
        if kind == "ADT":
            kept.add(f"{seen.sender}|{control_id}".encode())
    with work.env.begin(write=True) as txn:
        for key, data in list(work.all_records(txn, "hl7")):
            if rng.random() < 0.3:
                del data["type"]
                txn.put(key.encode(), codec.dumps(data), db=work.db["hl7"])
    return kept


def _merges(work: Catalog, rng: random.Random) -> None:
    """Pointers of merged patients, some moved on by a later merge, as the
    HL7 intake leaves them (the patients they name are not held)."""
    with work.env.begin(write=True) as txn:
        for n in range(rng.randint(1, 6)):
            into = ("MERGED-INTO", "") if n % 2 else (f"MERGED-{n}", "")
            patients.merge(work, txn, into, (f"RETIRED-{n}", ""), {}, "A40")
        patients.merge(work, txn, ("MERGED-LAST", ""), ("MERGED-0", ""), {}, "A47")


def _work(
    folder: Path, seed: int, count: int, tier: str
) -> tuple[Catalog, MirrorContents, set[bytes]]:
    rng = random.Random(seed)
    items = _instances(rng, count)
    for n, item in enumerate(items):
        # As on the lost appliance: each instance has its online copy.
        item.record.copies = [Copy("online", f"{n % 256:02x}/{n}.dcm")]
    packs = _packs(rng, items)
    work = Catalog(folder / "work", MAP_SIZE)
    _by_writer(work, items, packs, seed)
    # Some studies were retrieved since: the export starts every study's
    # last access anew, and a copy must too.
    retrieved = {item.record.study_uid for item in items if rng.random() < 0.3}
    work.touch_studies(retrieved)
    answered = _answers(work, rng)
    _merges(work, rng)
    # Most packs of the tier are there; the others were lost with it.
    there = {
        pack.pack_id: RemoteFile(pack.location, pack.size)
        for pack in packs
        if pack.tier == tier and rng.random() < 0.8
    }
    contents = MirrorContents(packs=there, highest_pack=len(packs), tier=tier)
    return work, contents, answered


def _modalities_as_listed(
    work: Catalog,
    want: dict[str, list[tuple[bytes, bytes]]],
    got: dict[str, list[tuple[bytes, bytes]]],
    exported: Exported,
) -> None:
    """A study that lost nothing keeps the modalities the lost appliance
    listed, as each instance came; the export counts them again from the
    series records, which keep their first instance's Modality, and can
    list fewer. Checked here, then set aside for the comparison."""
    with work.read() as txn:
        listed = {key: data for key, data in work.all_records(txn, "studies")}
    losing = {lost["study"] for lost in exported.lost}
    for records in (want["studies"], got["studies"]):
        for index, (key, raw) in enumerate(records):
            record = codec.loads(raw)
            if records is got["studies"] and record["key"] not in losing:
                assert record["modalities"] == listed[record["key"]]["modalities"]
            del record["modalities"]
            records[index] = (key, codec.dumps(record))


def _exported(
    exported: Exported,
) -> tuple[int, list[dict[str, str]], dict[str, list[str]]]:
    return exported.instances, exported.lost, exported.missing


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tier", [OFFSITE, "offline"])
def test_a_copied_work_catalog_is_what_the_bulk_export_writes(
    tmp_path: Path, seed: int, tier: str
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    work, contents, answered = _work(folder, seed, 150, tier)
    bulk = Catalog(folder / "bulk", MAP_SIZE)
    try:
        by_bulk = export(work, bulk, contents)
        finish(bulk, 7, 99)
        adopted, by_adopt = adopt(work, folder / "adopted", MAP_SIZE, contents)
        try:
            finish(adopted, 7, 99)
            assert _exported(by_adopt) == _exported(by_bulk)
            assert by_bulk.lost, "the generated catalog loses nothing"
            want, got = _contents(bulk), _contents(adopted)
            _modalities_as_listed(work, want, got, by_bulk)
            for name in want:
                assert got[name] == want[name], name
            assert {key for key, _ in got["hl7"]} == answered
            # Every pointer of a merged patient is in the index of pointers.
            assert len(got[POINTERS_BY_TARGET]) == len(got["merged"]) > 0
            # Both pass the check a rebuilt catalog must pass, or both fail.
            outcomes = []
            for catalog in (bulk, adopted):
                try:
                    check(catalog, contents, by_bulk.instances)
                    outcomes.append("passed")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            assert outcomes[0] == outcomes[1]
        finally:
            adopted.close()
    finally:
        bulk.close()
        work.close()
