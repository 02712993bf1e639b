"""The ingest path and the catalog, in-process: records, counters, duplicates,
schema version, and what a failure between steps leaves behind."""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

import lmdb
import pydicom
import pytest

from appliance.catalog.query import Query, find
from appliance.catalog.store import Catalog, Outcome
from appliance.errors import CatalogError, SchemaVersionError
from appliance.ingest import Ingest
from appliance.storage.online import OnlineTier
from tests import datasets
from tests.conftest import incoming_files


@pytest.fixture
def archive(tmp_path: Path):
    online = OnlineTier(tmp_path / "online")
    online.open()
    catalog = Catalog(tmp_path / "catalog", map_size=2**28)
    ingest = Ingest(catalog, online, "refuse")
    yield ingest
    ingest.close()
    catalog.close()


def _import(ingest: Ingest, path: Path):
    return ingest.import_file(path, "test")


def _count(catalog: Catalog) -> dict[str, int]:
    return catalog.counts()


def test_counters_and_computed_attributes(archive, tmp_path):
    ct = datasets.study_files(tmp_path / "ct", "one", 3)
    study = str(pydicom.dcmread(ct[0]).StudyInstanceUID)
    mr = datasets.write(
        datasets.instance(study, datasets.uid("series", "mr"), 1, modality="MR"),
        tmp_path / "mr",
    )
    for path in [*ct, mr]:
        assert _import(archive, path).ok

    counts = _count(archive.catalog)
    assert (counts["patients"], counts["studies"], counts["series"]) == (1, 1, 2)
    assert counts["instances"] == 4

    rows = list(
        find(
            archive.catalog,
            Query("STUDY", {"StudyInstanceUID": study, "ModalitiesInStudy": ""}),
            lambda: False,
        )
    )
    assert len(rows) == 1
    assert rows[0]["ModalitiesInStudy"] == "CT\\MR"
    assert rows[0]["NumberOfStudyRelatedInstances"] == "4"
    assert rows[0]["NumberOfStudyRelatedSeries"] == "2"


def test_online_bytes_count_the_stored_files(archive, tmp_path):
    paths = datasets.study_files(tmp_path / "s", "bytes", 4)
    for path in paths:
        assert _import(archive, path).ok
    stored = list((archive.online.objects).rglob("*.dcm"))
    assert _count(archive.catalog)["bytes.online"] == sum(
        p.stat().st_size for p in stored
    )


def test_uid_longer_than_64_characters_is_kept_and_findable(archive, tmp_path):
    long_uid = "1.2.826.0.1.3680043.10.1009." + "7" * 500
    with datasets.unvalidated():
        dataset = datasets.instance(
            datasets.uid("study", "long"),
            datasets.uid("series", "long"),
            1,
            sop_instance_uid=long_uid,
        )
        path = datasets.write(dataset, tmp_path / "long")
    result = _import(archive, path)
    assert result.ok and result.sop_instance_uid == long_uid

    rows = list(
        find(
            archive.catalog, Query("IMAGE", {"SOPInstanceUID": long_uid}), lambda: False
        )
    )
    assert [row["SOPInstanceUID"] for row in rows] == [long_uid]


@pytest.mark.parametrize("odd_uid", ["1.2.3.abc", "..", "1.2.03.4"])
def test_non_conformant_uids_are_kept_on_import_under_safe_file_names(
    archive, tmp_path, odd_uid
):
    """Import keeps what an old archive holds; the file name comes from the
    catalog, never from the UID."""
    with datasets.unvalidated():
        dataset = datasets.instance(
            datasets.uid("study", "odd"),
            datasets.uid("series", "odd"),
            1,
            sop_instance_uid=odd_uid,
        )
        path = datasets.write(dataset, tmp_path / "odd")
    result = _import(archive, path)
    assert result.ok and result.sop_instance_uid == odd_uid

    rows = list(
        find(
            archive.catalog, Query("IMAGE", {"SOPInstanceUID": odd_uid}), lambda: False
        )
    )
    assert [row["SOPInstanceUID"] for row in rows] == [odd_uid]
    files = list(archive.online.objects.rglob("*.dcm"))
    assert len(files) == 1
    assert files[0].is_relative_to(archive.online.objects)
    assert re.fullmatch(r"[0-9a-f]{32}\.dcm", files[0].name)
    assert not list(tmp_path.rglob("passwd"))


def test_same_instance_from_many_threads_is_recorded_once(archive, tmp_path):
    path = datasets.study_files(tmp_path / "race", "race", 1)[0]
    barrier = threading.Barrier(8)
    outcomes: list[Outcome | None] = []

    def store() -> None:
        barrier.wait()
        outcomes.append(_import(archive, path).outcome)

    threads = [threading.Thread(target=store) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(o.value for o in outcomes if o) == ["identical"] * 7 + ["stored"]
    assert len(list(archive.online.objects.rglob("*.dcm"))) == 1
    assert _count(archive.catalog)["instances"] == 1


def test_failed_commit_leaves_no_file_and_no_record(archive, tmp_path, monkeypatch):
    path = datasets.study_files(tmp_path / "fail", "fail", 1)[0]

    def broken(batch, policy):
        raise CatalogError("simulated: the catalog cannot be written")

    monkeypatch.setattr(archive.catalog, "record", broken)
    result = _import(archive, path)

    assert not result.ok and result.status == 0x0110
    assert not list(archive.online.objects.rglob("*.dcm"))
    assert not incoming_files(archive.online.root)


def test_file_placed_but_never_recorded_is_not_counted(archive, tmp_path):
    """What a crash between rename and commit leaves: a file no record names."""
    key = archive.online.new_key()
    orphan = archive.online.incoming / "orphan.dcm"
    orphan.write_bytes(
        datasets.study_files(tmp_path / "o", "orphan", 1)[0].read_bytes()
    )
    archive.online.adopt(orphan, key)

    assert archive.online.path_of(key).exists()
    assert _count(archive.catalog)["instances"] == 0
    rows = list(
        find(archive.catalog, Query("IMAGE", {"SOPInstanceUID": ""}), lambda: False)
    )
    assert rows == []


def test_an_orphan_refused_on_adoption_is_named_by_its_sop_instance_uid(
    archive, tmp_path, caplog
):
    path = datasets.study_files(tmp_path / "odd", "odd", 1)[0]
    dataset = pydicom.dcmread(path)
    dataset.StudyInstanceUID = "1.2.3?4"
    dataset.save_as(path)
    key = archive.online.new_key()
    orphan = archive.online.incoming / "orphan.dcm"
    orphan.write_bytes(path.read_bytes())
    archive.online.adopt(orphan, key)

    with caplog.at_level("WARNING", logger="appliance.ingest"):
        result = archive.record_in_place(key, "scrub adopt")

    assert result.status == 0xA900
    assert result.sop_instance_uid == dataset.SOPInstanceUID
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"refused instance {dataset.SOPInstanceUID} from scrub")
    assert _count(archive.catalog)["instances"] == 0


def test_catalog_from_another_schema_version_is_refused(tmp_path):
    Catalog(tmp_path / "catalog", map_size=2**24).close()
    env = lmdb.open(str(tmp_path / "catalog"), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        txn.put(b"schema_version", b"99")
    env.close()

    with pytest.raises(SchemaVersionError, match="schema version 99"):
        Catalog(tmp_path / "catalog", map_size=2**24)


def test_unknown_online_key_is_refused(tmp_path):
    online = OnlineTier(tmp_path)
    bad_keys = ("../../etc/passwd", "ABCDEF", "0" * 31, "g" * 32, "A" * 32)
    for bad in (*bad_keys, "0" * 33, "0" * 32 + "\n", "0" * 30 + "/0"):
        with pytest.raises(Exception, match="not an online tier key"):
            online.path_of(bad)


def test_a_stored_instance_records_the_sha256_of_its_file_and_of_its_data_set(
    archive, tmp_path
):
    # The two digests are taken in two pool threads while the file is
    # parsed: each must still be of the right bytes.
    path = datasets.study_files(tmp_path / "digests", "digests", 1)[0]
    data = path.read_bytes()
    result = _import(archive, path)
    assert result.ok

    with archive.catalog.read() as txn:
        record = archive.catalog.instance(txn, result.sop_instance_uid)
    stored = archive.online.path_of(record.copies[0].location).read_bytes()
    meta_end = _end_of_file_meta(stored)
    assert stored == data
    assert record.sha256 == hashlib.sha256(stored).hexdigest()
    assert record.content_sha256 == hashlib.sha256(stored[meta_end:]).hexdigest()


def _end_of_file_meta(data: bytes) -> int:
    """Where the data set starts: after the preamble, DICM and group 0002."""
    with pydicom.filebase.DicomBytesIO(data) as stream:
        pydicom.filereader.read_preamble(stream, False)
        pydicom.filereader._read_file_meta_info(stream)
        return stream.tell()
