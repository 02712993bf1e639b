"""``appliance restore --from mirror`` from a directory mirror: an archive
stored and replicated, then lost, comes back on a new data directory with
every instance byte for byte and the same C-FIND answers; from the
snapshot and journal, or from the pack manifests alone; interrupted and
run again; with a pack damaged or missing on the mirror."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from appliance.catalog import replication
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError, StorageError
from appliance.hsm.tiers import Tiers
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore import swap
from appliance.restore.cache import PackCache
from appliance.restore.data import DataRestore
from appliance.restore.mirror import Fetcher, survey
from appliance.restore.progress import is_pending, mark_pending
from appliance.restore.progress import read as read_progress
from appliance.restore.rebuild import rebuild_catalog
from appliance.restore.replay import replay_journal
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader
from tests.conftest import free_port
from tests.restore_site import Origin, Restored, answers, appliance, mirror_settings


def test_restore_gives_back_every_instance_and_the_same_answers(disaster, site) -> None:
    _folder, held, found, _studies = disaster
    restored, mirror = site
    before = sorted(p.relative_to(mirror) for p in mirror.rglob("*"))

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert "catalog/snapshot-" in done.stdout
    assert restored.held() == (held, found)
    assert len(restored.object_files()) == len(held)
    report = restored.report()
    assert sorted(report["restored"]) == sorted(held)
    assert report["missing"] == report["corrupt"] == report["waiting"] == []
    # The restore reads the mirror only.
    assert sorted(p.relative_to(mirror) for p in mirror.rglob("*")) == before


def test_after_a_restore_nothing_is_sent_again(site) -> None:
    restored, mirror = site
    assert restored.restore().returncode == 0
    packs = sorted(mirror.glob("packs/*/*.pack"))

    catalog = restored.catalog()
    try:
        assert replication.queue_state(catalog).instances == 0
        online = OnlineTier(restored.config.online_path)
        keys = KeyStore.load(key_store_path(restored.data_dir))
        replicator = Replicator(
            catalog,
            Tiers(online, {}, keys),
            DirectoryTransport(mirror),
            restored.data_dir / "spool",
            Settings(batch_seconds=0),
        )
        assert replicator.ready() == []
        assert replicator.send([]) is None
        # New journal segments and snapshots take names after the mirror's.
        assert replicator.send_journal() == 0
        replicator.send_snapshot()
        replicator.close()
    finally:
        catalog.close()
    assert sorted(mirror.glob("packs/*/*.pack")) == packs


def test_a_second_run_restores_nothing_twice(disaster, site) -> None:
    restored, _mirror = site
    assert restored.restore().returncode == 0

    again = restored.restore()

    assert again.returncode == 0, again.stdout + again.stderr
    assert "restored already" in again.stdout
    assert len(restored.object_files()) == len(disaster[1])
    assert restored.held() == (disaster[1], disaster[2])


@pytest.mark.parametrize("remove", ["nothing", "snapshot", "snapshot and journal"])
def test_scan_of_the_pack_manifests_gives_the_same_result(
    disaster, site, remove: str
) -> None:
    _folder, held, found, _studies = disaster
    restored, mirror = site
    if remove != "nothing":
        shutil.rmtree(mirror / "catalog")
    if remove == "snapshot and journal":
        shutil.rmtree(mirror / "journal")

    done = restored.restore("--scan") if remove == "nothing" else restored.restore()

    assert done.returncode == 0, done.stderr
    expected = "journal entries 1 to" if remove == "snapshot" else "manifests"
    assert expected in done.stdout
    assert restored.held() == (held, found)


def test_packs_the_journal_lacks_are_read(disaster, site) -> None:
    """The last journal segment never reached the mirror: the last pack
    is read as in a scan."""
    restored, mirror = site
    max(mirror.glob("journal/*")).unlink()

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert "1 pack(s) the journal lacks" in done.stdout
    assert restored.held() == (disaster[1], disaster[2])


def test_a_damaged_snapshot_falls_back_to_the_journal(disaster, site) -> None:
    restored, mirror = site
    (snapshot,) = mirror.glob("catalog/*")
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x40
    snapshot.write_bytes(bytes(data))

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert "journal entries 1 to" in done.stdout
    assert "no snapshot opened" in done.stdout
    assert restored.held() == (disaster[1], disaster[2])


def test_a_corrupted_pack_is_reported_by_uid(disaster, site) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    damaged = _damage_first_instance(mirror, restored, "p-000000003")

    done = restored.restore()

    assert done.returncode == 1
    assert damaged in done.stderr
    report = restored.report()
    assert [p["sop_instance_uid"] for p in report["corrupt"]] == [damaged]
    assert report["missing"] == report["waiting"] == []
    got = restored.held()[0]
    assert got == {uid: data for uid, data in held.items() if uid != damaged}
    assert damaged in studies["us-late"] + studies["ct-old"]


def test_a_pack_cut_short_gives_the_instances_before_the_cut(disaster, site) -> None:
    """The manifest sits at a pack's end: cut off, the members before the
    cut are taken out one by one and checked against the catalog."""
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    path = mirror / "packs" / "003" / "p-000000003.pack"
    keys = KeyStore.load(key_store_path(restored.data_dir))
    with PackReader.open(path, keys) as reader:
        entries = reader.manifest().instances
    assert len(entries) >= 2
    # Cut in the middle of the last instance's member.
    last = entries[-1]
    cut = last.data_offset + last.compressed_size // 2
    path.write_bytes(path.read_bytes()[:cut])
    before = {e.sop_instance_uid for e in entries[:-1]}

    done = restored.restore()

    assert done.returncode == 1, done.stdout + done.stderr
    report = restored.report()
    assert [p["sop_instance_uid"] for p in report["corrupt"]] == [last.sop_instance_uid]
    got = restored.held()[0]
    assert before <= set(got)
    assert got == {
        uid: data for uid, data in held.items() if uid != last.sop_instance_uid
    }


def test_a_missing_pack_is_reported_by_uid(disaster, site) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    (mirror / "packs" / "002" / "p-000000002.pack").unlink()

    done = restored.restore()

    assert done.returncode == 1
    report = restored.report()
    missing = {p["sop_instance_uid"] for p in report["missing"]}
    assert missing == set(studies["ct-mid"])
    assert all(uid in done.stderr for uid in missing)
    assert set(restored.held()[0]) == set(held) - missing


def test_a_restore_killed_half_way_continues(disaster, site) -> None:
    """kill -9 while the second pack is read (slowly, under a rate cap),
    then run again without the cap."""
    restored, _mirror = site
    command = [
        sys.executable,
        "-m",
        "appliance",
        "restore",
        "--from",
        "mirror",
        "--rate",
        "2KB",
        "--config",
        str(restored.config_path),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not restored.object_files() and time.monotonic() < deadline:
            assert process.poll() is None, "the restore ended before it was killed"
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert restored.object_files()

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert restored.held() == (disaster[1], disaster[2])
    assert len(restored.object_files()) == len(disaster[1])


def test_files_of_a_study_cut_short_are_removed(disaster, site) -> None:
    """A failure after a study's files are written, before they are
    recorded: the next run removes them and restores the study once."""
    restored, mirror = site
    with (
        mock.patch(
            "appliance.hsm.recall.copies.add_copies", side_effect=OSError("power cut")
        ),
        pytest.raises(OSError),
    ):
        _restore_in_process(restored, mirror)
    assert restored.object_files()  # written, never recorded

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert len(restored.object_files()) == len(disaster[1])
    assert restored.held() == (disaster[1], disaster[2])


def _restore_in_process(restored: Restored, mirror: Path) -> None:
    """What the command line does, in this process."""
    config = restored.config
    transport = DirectoryTransport(mirror)
    keys = KeyStore.load(key_store_path(config.data_dir))
    fetcher = Fetcher(transport)
    contents = survey(transport)
    folder = config.data_dir / "restore"
    cache = PackCache(folder / "packs", fetcher, 10**9)
    mark_pending(folder, "mirror")
    rebuild_catalog(
        config.catalog_path, 2**26, folder / "work", fetcher, contents, keys, cache
    )
    catalog = Catalog(config.catalog_path, 2**26)
    try:
        restorer = DataRestore(
            catalog, config.online_path, 0, keys, cache, contents, folder
        )
        restorer.run(restorer.plan())
    finally:
        catalog.close()


def test_an_archive_is_never_restored_over(site) -> None:
    restored, _mirror = site
    assert restored.restore().returncode == 0
    catalog_path = restored.config.catalog_path
    # The rebuilt mark gone: this is now an archive like any other.
    catalog = Catalog(catalog_path, 2**26)
    with catalog.env.begin(write=True, db=catalog.db["meta"]) as txn:
        txn.delete(b"restore.rebuilt")
    catalog.close()

    done = restored.restore()

    assert done.returncode == 1
    assert "rebuilds an empty appliance only" in done.stderr
    assert not is_pending(restored.data_dir / "restore")
    with pytest.raises(StorageError, match="empty appliance only"):
        swap.refuse_unless_empty(catalog_path)


def test_a_crash_between_the_renames_is_finished_by_the_next_run(
    disaster, site
) -> None:
    """An empty catalog was there (set aside, kept); the crash comes before
    the rebuilt one takes its name."""
    restored, mirror = site
    catalog_path = restored.config.catalog_path
    Catalog(catalog_path, 2**26).close()
    real_rename = Path.rename

    def crash_on_the_second(self: Path, target: Path) -> Path:
        if self == swap.rebuilt_path(catalog_path):
            raise OSError("power cut")
        return real_rename(self, target)

    with (
        mock.patch.object(Path, "rename", crash_on_the_second),
        pytest.raises(OSError, match="power cut"),
    ):
        _restore_in_process(restored, mirror)
    assert not catalog_path.exists()
    assert swap.note_of(swap.rebuilt_path(catalog_path)) is not None

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert restored.held() == (disaster[1], disaster[2])
    assert list(catalog_path.parent.glob("catalog.before-restore-*"))


@pytest.mark.parametrize(
    "where",
    [
        "appliance.restore.adopt._meta",  # inside its transaction
        # The copied catalog's instances rewritten, its studies not yet.
        "appliance.restore.adopt._Pass.studies",
        "appliance.restore.rebuild.check",  # written, not checked yet
        # Checked, but its pages not on the disk: not marked either.
        "appliance.restore.rebuild._flush",
    ],
)
def test_a_crash_while_the_catalog_is_loaded_starts_it_again(
    disaster, site, where: str
) -> None:
    restored, mirror = site
    catalog_path = restored.config.catalog_path

    with (
        mock.patch(where, side_effect=OSError("power cut")),
        pytest.raises(OSError, match="power cut"),
    ):
        _restore_in_process(restored, mirror)
    assert swap.note_of(swap.rebuilt_path(catalog_path)) is None
    assert not catalog_path.exists()

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert restored.held() == (disaster[1], disaster[2])


@pytest.mark.parametrize(
    "crash",
    [
        None,
        "appliance.catalog.bulk.BulkLoad._put_meta",  # inside its transaction
        # Instances written into the open transaction, their copies not yet.
        "appliance.catalog.bulk.BulkLoad.add_pack",
    ],
)
def test_a_copy_that_cannot_be_used_is_written_anew(
    disaster, site, crash: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy of the work catalog that fails (its check, here made to fail)
    gives way to one whose every record is written anew; a crash while
    that one is written starts the whole rebuild again."""
    restored, mirror = site
    catalog_path = restored.config.catalog_path
    refused = CatalogError("made to fail for the test")

    with mock.patch("appliance.restore.adopt._rewrite", side_effect=refused):
        if crash is None:
            _restore_in_process(restored, mirror)
        else:
            with (
                mock.patch(crash, side_effect=OSError("power cut")),
                pytest.raises(OSError, match="power cut"),
            ):
                _restore_in_process(restored, mirror)
            assert swap.note_of(swap.rebuilt_path(catalog_path)) is None
            assert not catalog_path.exists()
    assert "writing every record anew instead" in caplog.text

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert restored.held() == (disaster[1], disaster[2])


def test_without_the_master_keys_nothing_is_read(site, tmp_path: Path) -> None:
    restored, _mirror = site
    key_store_path(restored.data_dir).unlink()

    done = restored.restore()

    assert done.returncode == 1
    assert "no key store" in done.stderr
    assert not restored.config.catalog_path.exists()


def _damage_first_instance(mirror: Path, restored: Restored, pack_id: str) -> str:
    """Flip a byte in the first instance of a pack; its SOP Instance UID."""
    path = mirror / "packs" / pack_id[-3:] / f"{pack_id}.pack"
    keys = KeyStore.load(key_store_path(restored.data_dir))
    with PackReader.open(path, keys) as reader:
        entry = reader.manifest().instances[0]
    data = bytearray(path.read_bytes())
    data[entry.data_offset + 20] ^= 0x01
    path.write_bytes(bytes(data))
    return entry.sop_instance_uid


def test_instances_that_never_reached_the_mirror_are_reported(
    tmp_path: Path,
) -> None:
    """Stored, journalled, but the disaster came before their pack."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    origin = Origin(tmp_path, DirectoryTransport(mirror), mirror_settings(mirror))
    kept = origin.store("kept", 2)
    origin.replicate()
    late = origin.store("late", 1, study_date="20260401")
    assert origin.replicator.send_journal() == 1
    held, _found = origin.lose()
    restored = Restored(tmp_path, mirror_settings(mirror), origin.escrow())

    done = restored.restore()

    assert done.returncode == 1
    assert late[0] in done.stderr and "never reached the mirror" in done.stderr
    report = restored.report()
    assert [p["sop_instance_uid"] for p in report["missing"]] == late
    assert sorted(report["restored"]) == sorted(kept)
    assert restored.held()[0] == {uid: held[uid] for uid in kept}


def test_replaying_the_journal_again_changes_nothing(site, tmp_path: Path) -> None:
    """Segments may overlap the snapshot or each other: an entry applied
    twice leaves the catalog as it was."""
    entries = _journal_entries(*site, tmp_path)
    catalog = Catalog(tmp_path / "work", 2**26)
    try:
        replay_journal(catalog, entries)
        once = answers(catalog), _records(catalog)
        replay_journal(catalog, entries[len(entries) // 2 :])
        replay_journal(catalog, entries)
        assert (answers(catalog), _records(catalog)) == once
    finally:
        catalog.close()
    assert any(record["copies"] for record in once[1].values())


def test_an_instance_replaced_while_its_pack_was_on_the_way_gets_no_copy_there(
    site, tmp_path: Path
) -> None:
    """The journal says which bytes each pack holds: an instance whose new
    bytes were journaled before its pack was recorded does not count the
    pack's older bytes as its copy."""
    entries = _journal_entries(*site, tmp_path)
    at = next(n for n, e in enumerate(entries) if e["op"] == "replicated")
    replicated = entries[at]
    uid = sorted(replicated["pack"]["members"])[0]
    assert replicated["sha256"][uid]
    stored = next(
        e
        for e in entries[:at]
        if e["op"] in ("store", "replace") and e["instance"]["key"] == uid
    )
    # The same instance stored again, with other bytes, before the record.
    again = json.loads(json.dumps(stored))
    again["op"] = "replace"
    again["instance"]["sha256"] = again["instance"]["content_sha256"] = "0" * 64
    catalog = Catalog(tmp_path / "work", 2**26)
    try:
        replay_journal(catalog, [*entries[:at], again, *entries[at:]])
        records = _records(catalog)
    finally:
        catalog.close()

    pack_id = replicated["pack"]["pack_id"]
    in_pack = {
        member: [c for c in records[member]["copies"] if c["tier"] == "offsite"]
        for member in replicated["pack"]["members"]
    }
    later = [c["location"] for c in in_pack.pop(uid)]
    assert not any(location.startswith(pack_id) for location in later)
    # The pack's other instances keep their copies in it.
    assert any(
        copies and copies[0]["location"].startswith(pack_id)
        for copies in in_pack.values()
    )


def _journal_entries(restored: Restored, mirror: Path, tmp_path: Path) -> list[dict]:
    """Every entry of the journal segments on the mirror, in order."""
    transport = DirectoryTransport(mirror)
    keys = KeyStore.load(key_store_path(restored.data_dir))
    entries = []
    for segment in survey(transport).segments:
        text = tmp_path / "segment"
        Fetcher(transport).fetch_sealed(segment.file, text, keys, tmp_path)
        entries += [json.loads(line) for line in text.read_text().splitlines()]
    return entries


def _records(catalog: Catalog) -> dict[str, dict]:
    with catalog.read() as txn:
        return dict(catalog.all_records(txn, "instances"))


@pytest.mark.parametrize("rate", ["pause", "0", "fast"])
def test_a_rate_that_cannot_restore_is_refused(site, rate: str) -> None:
    restored, _mirror = site

    done = restored.restore("--rate", rate)

    assert done.returncode == 2
    assert "--rate" in done.stderr


def test_the_rate_cap_holds_the_restore_back(disaster, site) -> None:
    """At a fifth of the packs' size per second, reading them takes at
    least four seconds (one second's worth may go at once)."""
    restored, mirror = site
    rate = sum(path.stat().st_size for path in mirror.glob("packs/*/*")) / 5

    started = time.monotonic()
    done = restored.restore("--rate", f"{rate / 1000:.3f}KB")

    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 4.0
    assert restored.held() == (disaster[1], disaster[2])


def test_with_the_wrong_master_keys_nothing_is_put_in_place(site) -> None:
    restored, _mirror = site
    right = key_store_path(restored.data_dir)
    kept = right.with_name("right.keys")
    right.rename(kept)
    made = appliance("keys", "init", config=restored.config_path)
    assert made.returncode == 0, made.stderr

    wrong = restored.restore()
    pending_after_wrong = is_pending(restored.data_dir / "restore")
    kept.replace(right)
    again = restored.restore()

    assert wrong.returncode == 1
    assert "nothing on the mirror opens with the master keys" in wrong.stderr
    # Nothing waits for the service, which would serve an empty archive.
    assert not pending_after_wrong
    assert again.returncode == 0, again.stderr
    assert len(restored.report()["restored"]) > 0


_COMMAND = (sys.executable, "-m", "appliance")


def test_the_service_does_not_start_on_a_restore_cut_short(site) -> None:
    """Killed in its catalog phase, a restore leaves the data phase marked
    and no catalog: serving would answer with an empty archive."""
    restored, _mirror = site
    mark_pending(restored.data_dir / "restore", "mirror")

    started = subprocess.run(
        [
            *_COMMAND,
            "serve",
            "--port",
            str(free_port()),
            "--config",
            str(restored.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert started.returncode == 1
    assert "run appliance restore --from mirror again" in started.stderr


def test_ctrl_c_in_a_paused_restore_writes_the_report(site) -> None:
    """restore.timetable = pause holds the data phase; Ctrl-C still stops
    it, with the report of what is done and exit 1; the next run goes on."""
    restored, mirror = site
    paused = Restored(
        restored.folder,
        mirror_settings(mirror),
        restored.escrow,
        {"restore": {"timetable": "pause"}},
    )
    process = subprocess.Popen(
        [*_COMMAND, "restore", "--from", "mirror", "--config", str(paused.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Generous: under a loaded machine the catalog phase comes first.
        deadline = time.monotonic() + 120
        state = None
        while time.monotonic() < deadline and process.poll() is None:
            snapshot = read_progress(paused.data_dir / "restore")
            state = snapshot.state if snapshot is not None else None
            if state == "paused":
                break
            time.sleep(0.2)
        if state != "paused":
            process.kill()
            pytest.fail(f"no pause seen (state {state}): {process.communicate()}")
        status = appliance("restore", "status", config=paused.config_path)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert "paused by restore.timetable" in status.stdout
    assert process.returncode == 1, err
    assert "restore interrupted: " in err and "not tried yet" in err
    assert err.splitlines()[-1] == "run the same command again to continue"
    assert "not tried yet" not in out
    assert paused.report()["waiting"]
    # --rate stands in for the paused timetable.
    assert paused.restore("--rate", "1000").returncode == 0


def test_a_pack_whose_manifest_cannot_be_read_fails_the_scan(disaster, site) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    pack = mirror / "packs" / "002" / "p-000000002.pack"
    pack.write_bytes(pack.read_bytes()[:-5000])  # the manifest is at the end

    done = restored.restore("--scan")

    assert done.returncode == 1
    report = restored.report()
    (unreadable,) = [p for p in report["missing"] if p["pack_id"] == "p-000000002"]
    assert unreadable["reason"].startswith("pack unreadable")
    assert set(restored.held()[0]) == set(held) - set(studies["ct-mid"])


def test_instances_of_a_damaged_pack_are_queued_to_be_sent_again(
    disaster, site
) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    pack = mirror / "packs" / "002" / "p-000000002.pack"
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0x01  # the tar's closing padding: every member intact
    pack.write_bytes(bytes(data))

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert restored.held()[0] == held
    catalog = restored.catalog()
    try:
        queued = {entry.sop_instance_uid for entry in replication.queued(catalog)}
        with catalog.read() as txn:
            records = [catalog.instance(txn, uid) for uid in studies["ct-mid"]]
        offsite = [r.copy_on("offsite") if r else "no record" for r in records]
    finally:
        catalog.close()
    assert queued == set(studies["ct-mid"])
    assert offsite == [None] * len(studies["ct-mid"])
