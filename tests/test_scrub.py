"""The scrub on real files: damage found on every tier and mended from
another copy (nearline, the mirror), the alarm when no copy is left,
orphans reported and kept, a killed pass resumed, the rate held."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from appliance import config as configuration
from appliance.catalog import copies, requests
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.hsm.migrator import Migrator
from appliance.hsm.tiers import Tiers, open_tiers
from appliance.ingest import Ingest
from appliance.replication.bandwidth import Limiter, parse_timetable
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports.directory import DirectoryTransport
from appliance.scrub import state
from appliance.scrub.job import run_in_child, share
from appliance.scrub.repair import Repairer
from appliance.scrub.scrubber import Scrubber
from appliance.storage import offline as offline_tier
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader
from tests.conftest import config_text
from tests.datasets import study_files, uid
from tests.dicom_client import store_files

PACKED = uid("study", "packed")  # online, nearline and the mirror
MIRRORED = uid("study", "mirrored")  # online and the mirror only


@dataclass
class Site:
    """An appliance's data directory driven in this process."""

    folder: Path
    config_path: Path
    config: configuration.Config
    catalog: Catalog
    tiers: Tiers
    originals: dict[str, bytes]  # SOP Instance UID -> the file's bytes

    def scrubber(self, rate: str = "off", grace: float = 0.0) -> Scrubber:
        repairer = Repairer(self.catalog, self.tiers, self.config.data_dir, 1)
        limiter = Limiter(parse_timetable(rate), purpose="scrub")
        return Scrubber(
            self.catalog,
            self.tiers,
            state.folder_of(self.config.data_dir),
            repairer,
            limiter,
            orphan_grace=grace,
        )

    def records(self, study: str) -> list[InstanceRecord]:
        return copies.instances_of(self.catalog, study)

    def online_file(self, record: InstanceRecord) -> Path:
        copy = record.copy_on("online")
        assert copy is not None
        return self.tiers.online.path_of(copy.location)

    def nearline_pack(self, study: str) -> Path:
        [pack] = [
            p for p in copies.packs_of(self.catalog, study) if p.tier == "nearline"
        ]
        return self.config.nearline_path / pack.location

    def where(self, study: str) -> dict[str, int]:
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, study)
        assert found is not None
        return found.copies

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                *args,
                "--config",
                str(self.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def write_config(folder: Path, rate: float = 1000.0) -> Path:
    path = folder / "appliance.toml"
    settings: dict[str, dict[str, object]] = {
        "storage": {"data_dir": str(folder / "data"), "reserved_bytes": 0},
        "mirror": {"kind": "directory", "path": str(folder / "mirror")},
        "migration": {"min_copies": 1},
        "scrub": {"rate_mb_per_s": rate},
    }
    path.write_text(config_text(settings, []))
    return path


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    (tmp_path / "mirror").mkdir()
    config_path = write_config(tmp_path)
    config = configuration.load(config_path)
    catalog = Catalog(config.catalog_path, 2**26)
    tiers = open_tiers(config, mirror=True)
    ingest = Ingest(catalog, tiers.online, "refuse")
    originals = {}
    try:
        for label, count in (("packed", 4), ("mirrored", 3)):
            files = tmp_path / "files" / label
            for path in study_files(files, label, count, pixel_bytes=20000):
                assert ingest.import_file(path, "test").ok
                sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                originals[str(sop)] = path.read_bytes()
        _replicate(catalog, tiers, config, tmp_path / "mirror")
        assert Migrator(catalog, tiers, 1).copy(PACKED, "nearline").ok
        yield Site(tmp_path, config_path, config, catalog, tiers, originals)
    finally:
        ingest.close()
        catalog.close()


def _replicate(catalog: Catalog, tiers: Tiers, config, mirror: Path) -> None:
    replicator = Replicator(
        catalog,
        Tiers(tiers.online, {}, tiers.keys),
        DirectoryTransport(mirror),
        config.data_dir / "spool",
        Settings(batch_seconds=0),
    )
    try:
        assert replicator.send(replicator.ready()) is not None
    finally:
        replicator.close()


def flip_byte(path: Path, offset: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_online_is_repaired_from_nearline(site: Site, caplog) -> None:
    record = site.records(PACKED)[1]
    path = site.online_file(record)
    flip_byte(path)

    with caplog.at_level(logging.INFO):
        report = site.scrubber().run_tier("online")

    assert (report.checked, report.bad, report.repaired) == (7, 1, 1)
    assert path.read_bytes() == site.originals[record.sop_instance_uid]
    assert site.where(PACKED)["online"] == 4
    assert f"instance {record.sop_instance_uid} repaired from nearline pack" in (
        caplog.text
    )


def test_online_repaired_from_the_mirror_when_nearline_lacks_it(site: Site) -> None:
    record = site.records(MIRRORED)[0]
    path = site.online_file(record)
    path.unlink()

    report = site.scrubber().run_tier("online")

    assert (report.bad, report.repaired) == (1, 1)
    assert path.read_bytes() == site.originals[record.sop_instance_uid]
    assert site.where(MIRRORED)["online"] == 3


def test_a_deleted_nearline_pack_is_packed_again(site: Site) -> None:
    old = site.nearline_pack(PACKED)
    old.unlink()

    report = site.scrubber().run_tier("nearline")

    # The new pack comes later in the catalog's order: checked in this pass.
    assert (report.checked, report.bad, report.repaired) == (2, 1, 1)
    new = site.nearline_pack(PACKED)
    assert new != old and new.exists()
    assert site.where(PACKED) == {"online": 4, "nearline": 4, "offsite": 4}
    for record in site.records(PACKED):
        assert [c.tier for c in record.copies].count("nearline") == 1
    # A second pass finds the new pack good.
    assert site.scrubber().run_tier("nearline").bad == 0


def test_a_flipped_byte_in_a_nearline_pack_replaces_the_pack(site: Site) -> None:
    old = site.nearline_pack(PACKED)
    flip_byte(old, offset=old.stat().st_size // 2)

    report = site.scrubber().run_tier("nearline")

    assert (report.bad, report.repaired) == (1, 1)
    assert not old.exists()  # nothing counts it any more
    assert site.where(PACKED)["nearline"] == 4
    assert site.scrubber().run_tier("nearline").bad == 0


def test_a_lost_pack_of_a_study_not_online_is_rebuilt_from_the_mirror(
    site: Site,
) -> None:
    assert Migrator(site.catalog, site.tiers, 1).release(PACKED, "online").ok
    site.nearline_pack(PACKED).unlink()

    report = site.scrubber().run_tier("nearline")

    assert report.repaired == 1
    # Packed again from copies recalled from the mirror; online freed again.
    assert site.where(PACKED) == {"nearline": 4, "offsite": 4}
    assert site.scrubber().run_tier("nearline").bad == 0


def test_a_lost_pack_is_packed_again_from_what_the_mirror_still_gives(
    site: Site, caplog
) -> None:
    assert Migrator(site.catalog, site.tiers, 1).release(PACKED, "online").ok
    site.nearline_pack(PACKED).unlink()
    [mirrored] = (site.folder / "mirror").rglob("*.pack")
    with PackReader.open(mirrored, site.tiers.keys) as reader:
        entries = reader.manifest().instances
    [first, *_] = [e for e in entries if e.meta.study_uid == PACKED]
    flip_byte(mirrored, offset=first.data_offset + 20)

    with caplog.at_level(logging.ERROR):
        report = site.scrubber().run_tier("nearline")

    # The instances the mirror could give are on nearline again; the one it
    # could not keeps only its damaged copies, and the alarm says so.
    assert report.repaired == 0
    assert site.where(PACKED)["nearline"] == 3
    assert site.where(PACKED).get("online", 0) == 0
    assert "cannot be repaired" in caplog.text
    assert "3 instance(s) packed again" in caplog.text


def test_one_bad_member_of_the_only_pack_loses_only_that_instance(
    site: Site, caplog
) -> None:
    """The pack is replaced whole, but its members that read good are still
    the instances' copies: the repair recalls them from it, and only the
    damaged one has no good copy left."""
    assert Migrator(site.catalog, site.tiers, 1).release(PACKED, "online").ok
    for mirrored in (site.folder / "mirror").rglob("*.pack"):
        with open(mirrored, "r+b") as cut:
            cut.truncate(4096)  # the mirror gives nothing back
    pack = site.nearline_pack(PACKED)
    with PackReader.open(pack, site.tiers.keys) as reader:
        entries = reader.manifest().instances
    damaged = entries[1]
    flip_byte(pack, offset=damaged.data_offset + 20)

    with caplog.at_level(logging.ERROR):
        report = site.scrubber().run_tier("nearline")

    lost = state.load(state.folder_of(site.config.data_dir)).lost
    assert set(lost) == {damaged.sop_instance_uid}
    assert site.where(PACKED)["nearline"] == 3
    assert site.where(PACKED).get("online", 0) == 0
    assert "3 instance(s) packed again" in caplog.text
    assert report.repaired == 0


def test_passes_over_a_pack_that_cannot_be_repaired_leave_the_study_off_online(
    site: Site,
) -> None:
    """Each pass recalls the study to try again; what it recalled goes
    back off the online tier even when nothing new could be packed."""
    assert Migrator(site.catalog, site.tiers, 1).release(PACKED, "online").ok
    site.nearline_pack(PACKED).unlink()
    [mirrored] = (site.folder / "mirror").rglob("*.pack")
    with PackReader.open(mirrored, site.tiers.keys) as reader:
        entries = reader.manifest().instances
    [first, *_] = [e for e in entries if e.meta.study_uid == PACKED]
    flip_byte(mirrored, offset=first.data_offset + 20)

    for _ in range(2):
        site.scrubber().run_tier("nearline")
        assert site.where(PACKED).get("online", 0) == 0
        assert site.where(PACKED)["nearline"] == 3

    online = [r for r in site.records(PACKED) if r.copy_on("online")]
    assert online == []


def test_every_copy_damaged_raises_the_alarm_and_deletes_nothing(
    site: Site, caplog
) -> None:
    record = site.records(PACKED)[2]
    online = site.online_file(record)
    flip_byte(online)
    pack = site.nearline_pack(PACKED)
    flip_byte(pack, offset=pack.stat().st_size // 2)
    for mirrored in (site.folder / "mirror").rglob("*.pack"):
        with open(mirrored, "r+b") as cut:
            cut.truncate(4096)  # the header only: no instance can be read
    files_before = sorted(site.config.online_path.rglob("*.dcm"))

    with caplog.at_level(logging.ERROR):
        scrubber = site.scrubber()
        scrubber.run_tier("online")
        scrubber.run_tier("nearline")

    uid_ = record.sop_instance_uid
    assert uid_ in state.load(state.folder_of(site.config.data_dir)).lost
    assert f"instance {uid_} of study {PACKED} has no good copy left" in caplog.text
    assert online.exists() and online.read_bytes() != site.originals[uid_]
    assert pack.exists()
    assert sorted(site.config.online_path.rglob("*.dcm")) == files_before
    still = [r for r in site.records(PACKED) if r.sop_instance_uid == uid_]
    assert still and not any(c.verified for c in still[0].copies)

    report = site.cli("scrub", "report")
    assert report.returncode == 1
    assert uid_ in report.stdout
    assert json.loads(site.cli("status", "--json").stdout)["scrub"]["lost"] == 1
    assert "ALARM: 1 instance(s) with no good copy" in site.cli("status").stdout


def test_orphans_are_reported_and_left_in_place(site: Site) -> None:
    stray = site.config.online_path / "objects" / "ab" / ("ab" + "0" * 30 + ".dcm")
    stray.write_bytes(b"not in the catalog")
    orphan_pack = site.config.nearline_path / "packs" / "99" / "p-000000099.pack"
    orphan_pack.parent.mkdir(parents=True, exist_ok=True)
    orphan_pack.write_bytes(site.nearline_pack(PACKED).read_bytes())
    # A copy of a recorded instance's file, put in the wrong folder by hand.
    recorded = sorted((site.config.online_path / "objects").glob("??/*.dcm"))[0]
    elsewhere = "ff" if recorded.parent.name != "ff" else "fe"
    misplaced = site.config.online_path / "objects" / elsewhere / recorded.name
    misplaced.parent.mkdir(exist_ok=True)
    misplaced.write_bytes(recorded.read_bytes())
    hour_ago = time.time() - 7200
    for path in (stray, orphan_pack, misplaced):
        os.utime(path, (hour_ago, hour_ago))

    scrubber = site.scrubber(grace=3600)
    assert scrubber.run_tier("online").finished
    assert scrubber.run_tier("nearline").finished

    found = state.load(state.folder_of(site.config.data_dir)).orphans
    assert found["online"] == sorted(
        str(path.relative_to(site.config.online_path)) for path in (stray, misplaced)
    )
    assert found["nearline"] == ["packs/99/p-000000099.pack"]
    assert stray.exists() and orphan_pack.exists() and misplaced.exists()
    # The keys sorted on disk for the search are gone with it.
    assert not (state.folder_of(site.config.data_dir) / "online-keys").exists()
    # Gone before the other tests' passes: they expect the stray only.
    misplaced.unlink()


def test_the_rate_cap_holds(site: Site) -> None:
    rate = 100_000  # bytes/s; the online tier holds about 140 KB
    started = time.monotonic()
    report = site.scrubber(rate="100KB").run_tier("online")
    elapsed = time.monotonic() - started

    assert report.bytes_read > 120_000
    # One second of the rate may go at once (the limiter's burst); loosely.
    assert report.bytes_read <= rate * (elapsed + 1.0) * 1.2
    assert elapsed >= 0.2


def test_a_killed_scrub_resumes_from_its_cursor(site: Site) -> None:
    write_config(site.folder, rate=0.02)  # 20 KB/s: about a second a file
    folder = state.folder_of(site.config.data_dir)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    command = ["scrub", "run", "--tier", "online", "--config", str(site.config_path)]
    run = subprocess.Popen(
        [sys.executable, "-m", "appliance", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            saved = state.load(folder).tiers.get("online")
            if saved is not None and saved.pass_checked >= 3:
                break
            time.sleep(0.1)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    saved = state.load(folder).tier("online")
    assert 3 <= saved.pass_checked < 7 and saved.cursor

    write_config(site.folder, rate=1000.0)
    again = site.cli("scrub", "run", "--tier", "online")

    assert again.returncode == 0, again.stderr
    checked = json.loads(site.cli("scrub", "status", "--json").stdout)
    online = checked["tiers"]["online"]
    # The rest of the pass only: the copies before the cursor are not read.
    assert online["checked"] >= 7 and online["last_full_pass"] > 0
    assert f"online: {7 - saved.pass_checked} copies checked" in again.stdout


def test_status_counts_each_tier_its_own_packs(site: Site) -> None:
    # One nearline pack, none offline; the mirror's packs are in the
    # catalog too, and belong to neither tier's pass.
    with site.catalog.read() as txn:
        assert txn.stat(site.catalog.db["packs"])["entries"] > 1

    done = site.cli("scrub", "status", "--json")

    assert done.returncode == 0, done.stderr
    tiers = json.loads(done.stdout)["tiers"]
    entries = {tier: found["catalog_entries"] for tier, found in tiers.items()}
    assert entries == {"online": 7, "nearline": 1, "offline": 0}
    assert "0 of ~0" in site.cli("scrub", "status").stdout


def test_a_scheduled_run_checks_its_share_in_a_child(site: Site) -> None:
    # Hourly runs over 90 days: one copy each (at least one).
    assert share(site.config, site.catalog, "online") == 1
    site.catalog.close()  # the child opens it, as in the service

    assert run_in_child(site.config) == 0

    saved = state.load(state.folder_of(site.config.data_dir))
    assert saved.tier("online").pass_checked == 1
    assert saved.tier("nearline").pass_checked == 1
    assert saved.tier("online").cursor and not saved.tier("online").last_full_pass


def test_a_damaged_copy_is_kept_until_another_replaces_it(site: Site) -> None:
    [pack] = [p for p in copies.packs_of(site.catalog, PACKED) if p.tier == "nearline"]
    first = sorted(pack.members)[0]
    location = f"{pack.pack_id}/{pack.members[first]}"
    assert copies.mark_unverified(site.catalog, pack.pack_id, [first]) == 1

    # No other nearline copy of it: the pack and the copy stay listed.
    assert copies.drop_replaced(site.catalog, pack.pack_id) is None
    [record] = [r for r in site.records(PACKED) if r.sop_instance_uid == first]
    assert [
        (c.location, c.verified) for c in record.copies if c.tier == "nearline"
    ] == [(location, False)]
    assert site.where(PACKED)["nearline"] == 3

    assert copies.set_copy_verified(site.catalog, first, "nearline", location, True)
    assert site.where(PACKED)["nearline"] == 4
    assert not copies.set_copy_verified(site.catalog, first, "nearline", "p-9/x", True)


@pytest.fixture
def volume(site: Site) -> Path:
    """PACKED copied onto the volume L00001 of a directory library."""
    site.tiers.packs["offline"].library.label("L00001", 10**9)
    assert Migrator(site.catalog, site.tiers, 1).copy(PACKED, "offline").ok
    return site.config.data_dir / "volumes" / "L00001"


def test_a_damaged_pack_on_a_volume_is_written_again(site: Site, volume: Path) -> None:
    [old] = list((volume / "packs").iterdir())
    flip_byte(old, offset=old.stat().st_size // 2)

    report = site.scrubber().run_tier("offline")

    assert (report.bad, report.repaired) == (1, 1)
    assert site.where(PACKED)["offline"] == 4
    [pack] = [p for p in copies.packs_of(site.catalog, PACKED) if p.tier == "offline"]
    assert pack.pack_id not in old.name
    assert old.exists()  # a volume is written once
    assert site.scrubber().run_tier("offline").bad == 0


class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.file = open(*args, **kwargs)  # noqa: SIM115

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def test_a_full_spool_leaves_a_volume_pack_for_later_not_bad(
    site: Site, volume: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    # The offline tier copies a pack off its volume into the spool first.
    monkeypatch.setattr(offline_tier, "open", _FullDisk, raising=False)
    with caplog.at_level(logging.ERROR):
        report = site.scrubber().run_tier("offline")

    assert (report.checked, report.bad, report.repaired) == (0, 0, 0)
    assert site.where(PACKED)["offline"] == 4
    assert "not checked" in caplog.text and "no space left" in caplog.text

    monkeypatch.undo()
    report = site.scrubber().run_tier("offline")
    assert report.checked >= 1 and report.bad == 0


def test_a_shelved_volume_is_asked_for_and_checked_once_loaded(
    site: Site, volume: Path
) -> None:
    shelf = volume.with_name("shelf")
    volume.rename(shelf)
    scrubber = site.scrubber()
    scrubber.overdue = 0.0  # due at once

    assert scrubber.run_tier("offline").checked == 0
    assert [r.volume for r in requests.open_requests(site.catalog)] == ["L00001"]
    assert set(scrubber.state.waiting.values()) == {"L00001"}

    shelf.rename(volume)
    report = site.scrubber().run_tier("offline")

    assert report.checked >= 1 and report.bad == 0
    saved = state.load(state.folder_of(site.config.data_dir))
    assert not saved.waiting and "L00001" in saved.volumes


def test_a_copy_marked_bad_that_reads_good_counts_again(site: Site) -> None:
    [pack] = [p for p in copies.packs_of(site.catalog, PACKED) if p.tier == "nearline"]
    copies.mark_unverified(site.catalog, pack.pack_id, sorted(pack.members)[:1])
    record = site.records(MIRRORED)[0]
    online = record.copy_on("online")
    assert online is not None
    uid_ = record.sop_instance_uid
    copies.set_copy_verified(site.catalog, uid_, "online", online.location, False)
    assert (site.where(PACKED)["nearline"], site.where(MIRRORED)["online"]) == (3, 2)

    scrubber = site.scrubber()
    assert scrubber.run_tier("online").bad == 0
    assert scrubber.run_tier("nearline").bad == 0

    assert (site.where(PACKED)["nearline"], site.where(MIRRORED)["online"]) == (4, 3)


def test_the_rate_holds_while_instances_are_stored(
    appliance_factory, tmp_path: Path
) -> None:
    rate = 100_000  # bytes/s
    app = appliance_factory(
        settings={"scrub": {"rate_mb_per_s": rate / 1e6, "schedule": ""}}
    ).start()
    first = study_files(tmp_path / "first", "stream-a", 8, pixel_bytes=30000)
    assert set(store_files(app.port, first).values()) == {0}
    size = first[0].stat().st_size

    started = time.monotonic()
    command = ["scrub", "run", "--tier", "online", "--config", str(app.config_path)]
    scrub = subprocess.Popen(
        [sys.executable, "-m", "appliance", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = study_files(tmp_path / "second", "stream-b", 8, pixel_bytes=30000)
    statuses = store_files(app.port, second)
    stored = time.monotonic() - started
    out, err = scrub.communicate(timeout=120)
    elapsed = time.monotonic() - started

    assert set(statuses.values()) == {0} and scrub.returncode == 0, err
    checked = int(out.split("online: ")[1].split(" copies")[0])
    assert checked >= 8
    # Stores go on at their own pace; the scrub keeps to the rate (one
    # second of it may go at once), measured loosely.
    assert stored < elapsed
    assert elapsed >= (checked * size - rate) / rate * 0.8


def test_scrub_run_of_one_study_leaves_the_cursor(site: Site) -> None:
    record = site.records(PACKED)[3]
    path = site.online_file(record)
    flip_byte(path)

    done = site.cli("scrub", "run", "--study", PACKED)

    assert done.returncode == 0, done.stderr
    assert "online: 4 copies checked" in done.stdout
    assert "nearline: 1 copies checked" in done.stdout
    assert path.read_bytes() == site.originals[record.sop_instance_uid]
    saved = state.load(state.folder_of(site.config.data_dir)).tier("online")
    assert (saved.cursor, saved.bad, saved.repaired) == ("", 1, 1)


def test_the_service_schedules_the_scrub(site: Site) -> None:
    from appliance.hsm import scheduler

    config = configuration.load(
        site.config_path,
        {
            "migration.enabled": False,
            "prefetch.enabled": False,
            "drills.schedule": "",
            "scrub.schedule": "5 * * * *",
        },
    )
    started = scheduler.start(config)
    assert started is not None
    try:
        [job] = started.get_jobs()
        assert job.id == "scrub" and job.next_run_time.minute == 5
    finally:
        started.shutdown(wait=False)


def _orphan(path: Path) -> None:
    """Old enough for the scrub to call ``path`` an orphan."""
    hour_ago = time.time() - 7200
    os.utime(path, (hour_ago, hour_ago))


def _listed(site: Site) -> dict[str, list[str]]:
    return state.load(state.folder_of(site.config.data_dir)).orphans


def test_adopt_records_a_valid_online_orphan_where_it_lies(site: Site) -> None:
    [lone] = study_files(site.folder / "lone", "lone", 1)
    key = "cd" + "1" * 30
    orphan = site.config.online_path / "objects" / "cd" / f"{key}.dcm"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(lone.read_bytes())
    junk = site.config.online_path / "objects" / "ef" / ("ef" + "2" * 30 + ".dcm")
    junk.parent.mkdir(exist_ok=True)
    junk.write_bytes(b"not a DICOM file")
    spare = site.config.online_path / "objects" / "aa" / ("aa" + "3" * 30 + ".dcm")
    spare.parent.mkdir(exist_ok=True)
    spare.write_bytes(site.online_file(site.records(MIRRORED)[0]).read_bytes())
    for path in (orphan, junk, spare):
        _orphan(path)
    assert site.scrubber(grace=3600).run_tier("online").finished
    assert len(_listed(site)["online"]) == 3

    unnamed = site.cli("scrub", "adopt")
    assert unnamed.returncode == 2 and "give --all" in unnamed.stderr
    adopted = site.cli("scrub", "adopt", "--all")

    assert adopted.returncode == 1, adopted.stdout + adopted.stderr
    assert f"objects/cd/{key}.dcm: adopted" in adopted.stdout
    assert "already archived" in adopted.stdout
    assert "refused" in adopted.stdout and "2 of 3 orphan(s)" in adopted.stdout
    sop = str(pydicom.dcmread(lone, stop_before_pixels=True).SOPInstanceUID)
    with site.catalog.read() as txn:
        record = site.catalog.instance(txn, sop)
    assert record is not None and record.copies[0].location == key
    assert orphan.read_bytes() == lone.read_bytes()
    # Nothing moved or deleted; only the adopted file left the list.
    assert junk.exists() and spare.exists()
    assert sorted(_listed(site)["online"]) == sorted(
        str(p.relative_to(site.config.online_path)) for p in (junk, spare)
    )
    assert site.scrubber(grace=3600).run_tier("online").bad == 0


def test_adopt_records_a_nearline_pack_the_catalog_never_heard_of(
    site: Site,
) -> None:
    # Another catalog (the same key store) packs a study this one lacks,
    # as a catalog restored from an older snapshot would.
    other = Catalog(site.folder / "other" / "catalog", 2**26)
    online = OnlineTier(site.folder / "other" / "online")
    online.open()
    ingest = Ingest(other, online, "refuse")
    lost = uid("study", "lost")
    try:
        files = study_files(site.folder / "lost", "lost", 2, pixel_bytes=5000)
        assert all(ingest.import_file(path, "test").ok for path in files)
        for _ in range(50):  # pack IDs this catalog has not used
            copies.next_pack_id(other)
        tiers = Tiers(online, site.tiers.packs, site.tiers.keys)
        assert Migrator(other, tiers, 1).copy(lost, "nearline").ok
        [pack] = copies.packs_of(other, lost)
    finally:
        ingest.close()
        other.close()
    pack_file = site.config.nearline_path / pack.location
    copy = site.config.nearline_path / "packs" / "98" / "p-000000098.pack"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(site.nearline_pack(PACKED).read_bytes())
    for path in (pack_file, copy):
        _orphan(path)
    assert site.scrubber(grace=3600).run_tier("nearline").finished

    adopted = site.cli("scrub", "adopt", "--tier", "nearline", pack.location)
    again = site.cli("scrub", "adopt", "packs/98/p-000000098.pack")

    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    assert "a copy of 2 of its 2 instance(s); 2 stored online" in adopted.stdout
    assert site.where(lost) == {"online": 2, "nearline": 2}
    assert again.returncode == 1 and "recorded at another location" in again.stdout
    assert copy.exists() and _listed(site)["nearline"] == ["packs/98/p-000000098.pack"]
    # The adopted pack now passes the scrub as a copy like any other.
    report = site.scrubber(grace=3600).run_study(lost, "nearline")
    assert (report.checked, report.bad) == (1, 0)
