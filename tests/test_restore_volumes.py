"""``appliance restore --from volumes`` with the directory volume library:
an archive migrated to two volumes, then lost but for the library folder
and the escrowed keys, comes back on a new data directory with every
instance byte for byte, the same C-FIND answers and the same offline
copies; with a volume on the shelf until it is loaded; with a damaged pack."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest

from appliance import config as configuration
from appliance.catalog import requests
from appliance.catalog.store import Catalog
from appliance.cli_restore_volumes import restore_from_volumes
from appliance.hsm.migrator import Migrator
from appliance.hsm.tiers import OFFLINE, open_tiers
from appliance.ingest import Ingest
from appliance.restore.sources import merge_pack_file
from appliance.restore.volumedata import VolumeDataRestore
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.offline import OfflineTier
from appliance.storage.packs import PackReader
from appliance.storage.volumes import DirectoryLibrary
from tests.conftest import config_text
from tests.datasets import study_files
from tests.restore_site import answers, appliance, online_bytes

MB = 10**6


def _write_config(path: Path, data_dir: Path) -> Path:
    settings = {
        "storage": {"data_dir": str(data_dir), "reserved_bytes": 0},
        "volumes": {"kind": "directory"},
    }
    path.write_text(config_text(settings, []))
    return path


def _offline_copies(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """Each instance's offline copy: its pack's id, volume and position,
    size and SHA-256, as recall reads them."""
    found = {}
    with catalog.read() as txn:
        for uid, _data in catalog.all_records(txn, "instances"):
            record = catalog.instance(txn, uid)
            assert record is not None
            copy = record.copy_on(OFFLINE)
            assert copy is not None, uid
            pack_id, _, member = copy.location.partition("/")
            pack = catalog.get(txn, "packs", pack_id)
            assert pack is not None
            found[uid] = {
                "pack": pack_id,
                "member": member,
                "location": pack["location"],
                "size": pack["size"],
                "sha256": pack["sha256"],
            }
    return found


@dataclass
class Disaster:
    """What the lost appliance held, and what survived it."""

    folder: Path
    held: dict[str, bytes]
    found: dict[str, list[str]]
    offline: dict[str, dict[str, Any]]
    studies: dict[str, list[str]]


class _Origin:
    """The appliance before the disaster, driven in this process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = _write_config(folder / "origin.toml", folder / "origin")
        self.config = configuration.load(path)
        self.catalog = Catalog(self.config.catalog_path, 2**26)
        self.tiers = open_tiers(self.config, writer=True)
        offline = self.tiers.packs[OFFLINE]
        assert isinstance(offline, OfflineTier)
        self.library = offline.library
        self.ingest = Ingest(self.catalog, self.tiers.online, "replace")
        self.migrator = Migrator(self.catalog, self.tiers, min_copies=1)
        self.volumes = self.config.data_dir / "volumes"

    def store(self, label: str, count: int, **attributes: Any) -> list[str]:
        uids = []
        files = study_files(self.folder / "files" / label, label, count, **attributes)
        for path in files:
            assert self.ingest.import_file(path, "test").ok
            uids.append(str(pydicom.dcmread(path).SOPInstanceUID))
        return uids

    def copy(self, study_uid: str, volume: str) -> None:
        """Copy a study to the offline tier, onto ``volume``: the others
        are shelved meanwhile."""
        others = [v for v in ("L1", "L2") if v != volume]
        for other in others:
            shutil.move(self.volumes / other, self.folder / other)
        try:
            outcome = self.migrator.copy(study_uid, OFFLINE)
        finally:
            for other in others:
                shutil.move(self.folder / other, self.volumes / other)
        assert outcome.ok and outcome.instances, outcome.problem

    def study_of(self, uids: list[str]) -> str:
        with self.catalog.read() as txn:
            record = self.catalog.instance(txn, uids[0])
        assert record is not None
        return record.study_uid


@pytest.fixture(scope="module")
def disaster(tmp_path_factory: pytest.TempPathFactory) -> Disaster:
    """Four studies in six packs on volumes L1 and L2: one study copied to
    the volumes twice (released from them in between), one with an
    instance replaced after its first copy; then all lost but the volume
    library and the escrowed keys. Kept read-only: each test restores
    from a copy of the library."""
    folder = tmp_path_factory.mktemp("volumes-disaster")
    origin = _Origin(folder)
    for label in ("L1", "L2"):
        origin.library.label(label, 50 * MB)
    studies = {
        "ct-old": origin.store("ct-old", 3, study_date="20240105"),
        "mr-new": origin.store(
            "mr-new", 2, study_date="20260301", modality="MR", patient_id="P2"
        ),
        "us-late": origin.store("us-late", 2, study_date="20251201", modality="US"),
        "cr-last": origin.store("cr-last", 2, study_date="20260302", modality="CR"),
    }
    study = {label: origin.study_of(uids) for label, uids in studies.items()}
    origin.copy(study["ct-old"], "L1")
    origin.copy(study["mr-new"], "L1")
    origin.copy(study["us-late"], "L2")
    origin.copy(study["cr-last"], "L1")
    # Released from the volumes, then copied there again: a second pack.
    assert origin.migrator.release(study["ct-old"], OFFLINE).ok
    origin.copy(study["ct-old"], "L2")
    # Other bytes for a copied instance: a newer pack holds only it.
    studies["replaced"] = origin.store(
        "cr-last", 1, study_date="20260302", modality="CR", pixel_bytes=4096
    )
    origin.copy(study["cr-last"], "L2")
    packs = {v: len(origin.library.list_packs(v)) for v in ("L1", "L2")}
    assert packs == {"L1": 3, "L2": 3}

    keys = origin.tiers.keys
    assert keys is not None
    (folder / "escrow.txt").write_text(keys.export_escrow())
    origin.ingest.close()
    held = online_bytes(origin.catalog, origin.config.online_path)
    found = answers(origin.catalog)
    offline = _offline_copies(origin.catalog)
    origin.catalog.close()
    for path in origin.config.data_dir.iterdir():
        if path.name != "volumes":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return Disaster(folder, held, found, offline, studies)


@dataclass
class Site:
    """The new appliance: the same [volumes] section, an empty data
    directory but for the volume library, the master keys imported."""

    data_dir: Path
    config_path: Path

    @property
    def volumes(self) -> Path:
        return self.data_dir / "volumes"

    def restore(self) -> Any:
        return appliance("restore", "--from", "volumes", config=self.config_path)

    def catalog(self) -> Catalog:
        return Catalog(self.data_dir / "catalog", 2**26)

    def held(self) -> tuple[dict[str, bytes], dict[str, list[str]]]:
        catalog = self.catalog()
        try:
            return online_bytes(catalog, self.data_dir / "online"), answers(catalog)
        finally:
            catalog.close()

    def object_files(self) -> list[Path]:
        objects = self.data_dir / "online" / "objects"
        return [path for path in objects.rglob("*") if path.is_file()]

    def report(self) -> dict[str, Any]:
        reports = sorted((self.data_dir / "restore").glob("report-*.json"))
        return dict(json.loads(reports[-1].read_text()))


@pytest.fixture
def site(disaster: Disaster, tmp_path: Path) -> Iterator[Site]:
    data_dir = tmp_path / "restored"
    shutil.copytree(disaster.folder / "origin" / "volumes", data_dir / "volumes")
    config_path = _write_config(tmp_path / "restored.toml", data_dir)
    escrow = str(disaster.folder / "escrow.txt")
    done = appliance("keys", "import", escrow, config=config_path)
    assert done.returncode == 0, done.stderr
    yield Site(data_dir, config_path)


def test_restore_gives_back_every_instance_its_answers_and_copies(
    disaster: Disaster, site: Site
) -> None:
    before = sorted(p.relative_to(site.volumes) for p in site.volumes.rglob("*"))

    done = site.restore()

    assert done.returncode == 0, done.stderr
    assert "the manifests of the packs on L1, L2" in done.stdout
    assert site.held() == (disaster.held, disaster.found)
    catalog = site.catalog()
    try:
        # The copy in the newest pack that holds the instance's bytes, as
        # the lost appliance recorded it: recall reads the same pack.
        assert _offline_copies(catalog) == disaster.offline
    finally:
        catalog.close()
    report = site.report()
    assert sorted(report["restored"]) == sorted(disaster.held)
    assert report["missing"] == report["corrupt"] == report["waiting"] == []
    # A restore reads the volumes only.
    after = sorted(p.relative_to(site.volumes) for p in site.volumes.rglob("*"))
    assert after == before

    again = site.restore()

    assert again.returncode == 0, again.stderr
    assert "rebuilt by an earlier run" in again.stdout
    assert len(site.object_files()) == len(disaster.held)


def test_a_volume_on_the_shelf_is_asked_for_then_read_once_loaded(
    disaster: Disaster, site: Site, tmp_path: Path
) -> None:
    shutil.move(site.volumes / "L2", tmp_path / "L2")

    first = site.restore()

    assert first.returncode == 1
    assert "load volume L2 into the library" in first.stderr
    report = site.report()
    (unread,) = [p for p in report["waiting"] if p["sop_instance_uid"] == "(unknown)"]
    assert "volume L2 was not read" in unread["reason"]
    catalog = site.catalog()
    try:
        assert [r.volume for r in requests.open_requests(catalog)] == ["L2"]
    finally:
        catalog.close()
    # What L1 holds is back already; the study only L2 holds is not known,
    # and the replaced instance is back in the bytes L1 has of it.
    restored, _found = site.held()
    assert set(restored) == set(disaster.held) - set(disaster.studies["us-late"])
    (replaced,) = disaster.studies["replaced"]
    assert restored[replaced] != disaster.held[replaced]
    files = set(site.object_files())

    shutil.move(tmp_path / "L2", site.volumes / "L2")
    second = site.restore()

    assert second.returncode == 0, second.stderr
    assert site.held() == (disaster.held, disaster.found)
    # The older bytes of the replaced instance, restored from L1 first,
    # are gone; nothing else was restored twice.
    assert len(site.object_files()) == len(disaster.held)
    assert len(files & set(site.object_files())) == len(restored) - 1
    assert not (site.data_dir / "restore" / "work").exists()
    catalog = site.catalog()
    try:
        assert _offline_copies(catalog) == disaster.offline
        assert requests.open_requests(catalog) == []
    finally:
        catalog.close()


def test_a_damaged_pack_loses_only_the_instance_it_damaged(
    disaster: Disaster, site: Site
) -> None:
    first, second = disaster.studies["mr-new"]
    pack = _pack_file(site, disaster.offline[first]["pack"])
    keys = KeyStore.load(key_store_path(site.data_dir))
    with PackReader.open(pack, keys) as reader:
        entry = reader.manifest().instance(first)
    data = bytearray(pack.read_bytes())
    data[entry.data_offset + entry.member_size // 2] ^= 0x20
    pack.write_bytes(bytes(data))

    done = site.restore()

    assert done.returncode == 1
    report = site.report()
    assert [p["sop_instance_uid"] for p in report["corrupt"]] == [first]
    # What went wrong, as the recall found it.
    assert report["corrupt"][0]["cause"] == "member-damaged"
    assert "GCM tag does not match" in report["corrupt"][0]["reason"]
    assert first in done.stderr
    assert report["missing"] == report["waiting"] == []
    restored, _found = site.held()
    expected = {uid: disaster.held[uid] for uid in disaster.held if uid != first}
    assert restored == expected
    assert second in restored


def _pack_file(site: Site, pack_id: str) -> Path:
    library = DirectoryLibrary(site.volumes, recover=False)
    for volume in ("L1", "L2"):
        for location in library.list_packs(volume):
            if location.pack_id == pack_id:
                return next((site.volumes / volume / "packs").glob(f"*-{pack_id}-*"))
    raise AssertionError(f"no pack {pack_id}")


def test_a_catalog_phase_cut_short_reads_only_the_volumes_left(
    disaster: Disaster, site: Site
) -> None:
    """A failure while L2 is read: the next run reads L2 only."""
    merged: list[str] = []

    def merge(work: Any, pack_id: str, path: Path, remote: Any, *args: Any) -> bool:
        if remote.name.startswith("L2/"):
            raise OSError("power cut")
        merged.append(remote.name)
        return merge_pack_file(work, pack_id, path, remote, *args)

    config = configuration.load(site.config_path)
    with (
        mock.patch("appliance.restore.volumes.merge_pack_file", side_effect=merge),
        pytest.raises(OSError),
    ):
        restore_from_volumes(config)
    assert merged == ["L1/1", "L1/2", "L1/3"]
    assert not (site.data_dir / "catalog" / "data.mdb").exists()

    merged.clear()
    with mock.patch("appliance.restore.volumes.merge_pack_file") as counted:
        counted.side_effect = merge_pack_file
        assert restore_from_volumes(config)

    assert [call.args[3].name for call in counted.call_args_list] == [
        "L2/1",
        "L2/2",
        "L2/3",
    ]
    assert site.held() == (disaster.held, disaster.found)


def test_files_of_a_study_cut_short_are_removed(disaster: Disaster, site: Site) -> None:
    """A failure after a study's files are written, before they are
    recorded: the next run removes them and restores the study once."""
    config = configuration.load(site.config_path)
    with (
        mock.patch(
            "appliance.hsm.recall.copies.add_copies", side_effect=OSError("power cut")
        ),
        pytest.raises(OSError),
    ):
        restore_from_volumes(config)
    assert site.object_files()  # written, never recorded

    done = site.restore()

    assert done.returncode == 0, done.stderr
    assert len(site.object_files()) == len(disaster.held)
    assert site.held() == (disaster.held, disaster.found)


def test_with_the_wrong_master_keys_nothing_is_put_in_place(site: Site) -> None:
    right = key_store_path(site.data_dir)
    kept = right.with_name("right.keys")
    right.rename(kept)
    made = appliance("keys", "init", config=site.config_path)
    assert made.returncode == 0, made.stderr

    wrong = site.restore()
    kept.replace(right)
    again = site.restore()

    assert wrong.returncode == 1
    assert "nothing on the volumes opens with the master keys" in wrong.stderr
    # Every volume is read again with the right keys.
    assert again.returncode == 0, again.stderr
    assert "the manifests of the packs on L1, L2" in again.stdout


def test_a_volume_taken_out_before_its_studies_come_back_is_waited_for(
    disaster: Disaster, site: Site, tmp_path: Path
) -> None:
    """L2 read for the catalog, then shelved before the data phase: what
    only L2 gives waits for it, asked for by name."""
    plan = VolumeDataRestore.plan

    def shelve_then_plan(restorer: VolumeDataRestore) -> Any:
        shutil.move(site.volumes / "L2", tmp_path / "L2")
        return plan(restorer)

    config = configuration.load(site.config_path)
    with mock.patch.object(VolumeDataRestore, "plan", shelve_then_plan):
        assert not restore_from_volumes(config)

    on_l2 = {u for u, c in disaster.offline.items() if c["location"].startswith("L2/")}
    report = site.report()
    assert {p["sop_instance_uid"] for p in report["waiting"]} == on_l2
    assert {p["reason"] for p in report["waiting"]} == {
        "waiting for volume L2 to be loaded"
    }
    assert set(report["restored"]) == set(disaster.held) - on_l2
    catalog = site.catalog()
    try:
        assert [r.volume for r in requests.open_requests(catalog)] == ["L2"]
    finally:
        catalog.close()

    shutil.move(tmp_path / "L2", site.volumes / "L2")
    done = site.restore()

    assert done.returncode == 0, done.stderr
    assert site.held() == (disaster.held, disaster.found)
    catalog = site.catalog()
    try:
        assert requests.open_requests(catalog) == []
    finally:
        catalog.close()


def test_a_volume_copied_to_another_gives_each_pack_once(
    disaster: Disaster, site: Site
) -> None:
    """L1 copied to a volume labelled L3: the copy on L1 is used."""
    shutil.copytree(site.volumes / "L1", site.volumes / "L3")
    label = json.loads((site.volumes / "L3" / "VOLUME").read_text())
    (site.volumes / "L3" / "VOLUME").write_text(json.dumps({**label, "label": "L3"}))

    done = site.restore()

    assert done.returncode == 0, done.stderr
    assert "is on volume L1 and on L3" in done.stderr
    assert site.held() == (disaster.held, disaster.found)
    catalog = site.catalog()
    try:
        assert _offline_copies(catalog) == disaster.offline
    finally:
        catalog.close()
