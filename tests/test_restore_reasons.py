"""The restore's report says what went wrong with each instance it could
not bring back: its pack is not on the mirror, does not open with the
master keys, is cut short before its member; its member is damaged (GCM
tag), decodes to other bytes than the catalog's SHA-256, or is not in the
pack's manifest. Each case is made on real packs on a directory mirror
(and one over SFTP to the test sshd), and the restore run end to end."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from appliance.hsm import failures
from appliance.hsm.failures import Failure
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore import report as report_module
from appliance.restore.mirror import survey
from appliance.restore.reasons import FailureLog
from appliance.restore.report import final_report
from appliance.storage.keys import DataKey, KeyStore, key_store_path
from appliance.storage.packs import PackReader
from appliance.storage.packs.manifest import InstanceMeta, PackedInstance
from appliance.storage.packs.writer import PackWriter
from tests.restore_site import Restored, appliance
from tests.sshd import Sshd
from tests.test_transports import sftp_settings

# (metadata, bytes) of each instance of a pack, in order.
Items = list[tuple[InstanceMeta, bytes]]


def _path(mirror: Path, pack_id: str) -> Path:
    return mirror / "packs" / pack_id[-3:] / f"{pack_id}.pack"


def _keys(restored: Restored) -> KeyStore:
    return KeyStore.load(key_store_path(restored.data_dir))


def _entries(path: Path, keys: KeyStore) -> list[PackedInstance]:
    with PackReader.open(path, keys) as reader:
        return list(reader.manifest().instances)


def _repack(
    path: Path,
    keys: KeyStore,
    change: Callable[[Items], Items],
    key: DataKey | None = None,
) -> None:
    """Write the pack at ``path`` again, whole and well formed, holding what
    ``change`` makes of its instances, under ``key`` (by default a new data
    key of the pack's own master keys)."""
    items: Items = []
    with PackReader.open(path, keys) as reader:
        study_uid = reader.manifest().study_uid
        for entry in reader.manifest().instances:
            out = io.BytesIO()
            reader.extract(entry, out)
            items.append((entry.meta, out.getvalue()))
    written = io.BytesIO()
    with PackWriter(written, path.stem, study_uid, key or keys.new_data_key()) as pack:
        for meta, data in change(items):
            pack.add(meta, io.BytesIO(data))
    path.write_bytes(written.getvalue())


def _same(items: Items) -> Items:
    return items


def _other_bytes(items: Items) -> Items:
    """The first instance with one byte of its pixel data changed."""
    meta, data = items[0]
    changed = bytearray(data)
    changed[-10] ^= 0x01
    other = replace(meta, sha256=hashlib.sha256(changed).hexdigest())
    return [(other, bytes(changed)), *items[1:]]


def _problems(report: dict, kind: str) -> dict[str, dict]:
    return {p["sop_instance_uid"]: p for p in report[kind]}


def _restore_fails(restored: Restored) -> dict:
    done = restored.restore()
    assert done.returncode == 1, done.stdout + done.stderr
    report = restored.report()
    # Every problem is printed with its instance's UID and its reason.
    for problem in report["missing"] + report["corrupt"]:
        line = f"instance {problem['sop_instance_uid']} "
        assert line in done.stderr
        assert problem["reason"] in done.stderr
    return report


def test_a_pack_not_on_the_mirror(disaster, site) -> None:
    _folder, held, _found, studies = disaster
    restored, mirror = site
    _path(mirror, "p-000000002").unlink()

    report = _restore_fails(restored)

    missing = _problems(report, "missing")
    assert set(missing) == set(studies["ct-mid"])
    assert {p["cause"] for p in missing.values()} == {report_module.PACK_NOT_THERE}
    assert {p["reason"] for p in missing.values()} == {"its pack is not on the mirror"}
    assert report["corrupt"] == []
    assert set(restored.held()[0]) == set(held) - set(missing)


def _held_by(mirror: Path, keys: KeyStore, pack_id: str) -> set[str]:
    """The instances whose copy is in ``pack_id``: those it holds that no
    later pack holds again."""
    number = int(pack_id[2:])
    held = {e.sop_instance_uid for e in _entries(_path(mirror, pack_id), keys)}
    for later in mirror.glob("packs/*/p-*.pack"):
        if int(later.stem[2:]) > number:
            held -= {e.sop_instance_uid for e in _entries(later, keys)}
    return held


def test_packs_that_do_not_open(disaster, site, tmp_path: Path) -> None:
    """Three packs whose instances cannot be decrypted: one sealed under a
    master key the key store lacks, one whose wrapped data key was altered
    (the GCM tag of the key wrap fails), one whose clear header was."""
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    keys = _keys(restored)
    expected = {p: _held_by(mirror, keys, p) for p in ("p-000000001", "p-000000002")}
    expected["p-000000003"] = _held_by(mirror, keys, "p-000000003")
    other = KeyStore.create_if_missing(tmp_path / "other.keys")
    _repack(_path(mirror, "p-000000002"), keys, _same, other.new_data_key())
    right = keys.new_data_key()
    wrapped = bytearray(right.wrapped)
    wrapped[20] ^= 0x01
    altered = DataKey(right.secret, right.master_key_id, bytes(wrapped))
    _repack(_path(mirror, "p-000000003"), keys, _same, altered)
    path = _path(mirror, "p-000000001")
    with PackReader.open(path, keys) as reader:
        assert reader.header.encryption is not None
        hexed = reader.header.encryption.wrapped_data_key.hex().encode()
    data = path.read_bytes()
    at = data.index(hexed) + 10
    flipped = b"0" if data[at : at + 1] != b"0" else b"1"
    path.write_bytes(data[:at] + flipped + data[at + 1 :])

    report = _restore_fails(restored)

    corrupt = _problems(report, "corrupt")
    details = {
        "p-000000001": "pack.json: its check value does not match",
        "p-000000002": f"master key {other.current_id} is not in the key store",
        "p-000000003": "does not open: the wrapped key or its key id was altered",
    }
    for pack_id, uids in expected.items():
        assert uids and uids <= set(corrupt)
        for uid in uids:
            problem = corrupt[uid]
            assert problem["cause"] == failures.PACK_UNOPENED
            assert problem["pack_id"] == pack_id
            reason = problem["reason"]
            assert reason.startswith("its pack does not open (not decrypted)")
            assert details[pack_id] in reason
    lost = set().union(*expected.values())
    assert set(corrupt) == lost
    assert report["missing"] == []
    assert set(restored.held()[0]) == set(held) - lost


def _damage_first_member(restored: Restored, mirror: Path) -> PackedInstance:
    """Flip a bit in the first member of p-000000003 (its GCM tag then
    fails); that member's manifest entry."""
    path = _path(mirror, "p-000000003")
    first = _entries(path, _keys(restored))[0]
    data = bytearray(path.read_bytes())
    data[first.data_offset + 20] ^= 0x01
    path.write_bytes(bytes(data))
    return first


def test_a_member_whose_gcm_tag_fails(disaster, site) -> None:
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    first = _damage_first_member(restored, mirror)

    report = _restore_fails(restored)

    (problem,) = report["corrupt"]
    assert problem["sop_instance_uid"] == first.sop_instance_uid
    assert problem["cause"] == failures.MEMBER_DAMAGED
    assert problem["reason"].startswith("its member in the pack is damaged")
    assert "GCM tag does not match" in problem["reason"]
    assert report["missing"] == []
    uid = first.sop_instance_uid
    assert restored.held()[0] == {k: v for k, v in held.items() if k != uid}


def test_a_recall_beside_a_pending_restore_notes_its_reasons(disaster, site) -> None:
    """A study recalled from the mirror (by the service, or here by
    ``appliance recall``) before the restore's data phase reaches it: the
    damaged member that recall met is in the restore's report with why."""
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    first = _damage_first_member(restored, mirror)
    background = restored.restore("--background")
    assert background.returncode == 0, background.stderr

    recalled = appliance("recall", first.meta.study_uid, config=restored.config_path)
    report = _restore_fails(restored)

    assert recalled.returncode == 1, recalled.stdout + recalled.stderr
    (problem,) = report["corrupt"]
    assert problem["sop_instance_uid"] == first.sop_instance_uid
    assert problem["cause"] == failures.MEMBER_DAMAGED
    assert "GCM tag does not match" in problem["reason"]
    uid = first.sop_instance_uid
    assert restored.held()[0] == {k: v for k, v in held.items() if k != uid}


def test_a_pack_cut_short_before_a_member(disaster, site) -> None:
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    path = _path(mirror, "p-000000003")
    entries = _entries(path, _keys(restored))
    last = entries[-1]
    whole = path.stat().st_size
    cut = last.data_offset + last.compressed_size // 2
    path.write_bytes(path.read_bytes()[:cut])

    report = _restore_fails(restored)

    (problem,) = report["corrupt"]
    assert problem["sop_instance_uid"] == last.sop_instance_uid
    assert problem["cause"] == failures.CUT_SHORT
    assert problem["reason"].startswith(
        "its pack is cut short before its member, and the manifest with it"
    )
    assert f"{cut} of its {whole} bytes are there" in problem["reason"]
    uid = last.sop_instance_uid
    assert restored.held()[0] == {k: v for k, v in held.items() if k != uid}


def test_a_member_that_decodes_to_other_bytes(disaster, site) -> None:
    """The pack is whole and opens, its manifest agrees with its member,
    but the bytes are not those the catalog recorded."""
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    path = _path(mirror, "p-000000003")
    first = _entries(path, _keys(restored))[0]
    _repack(path, _keys(restored), _other_bytes)

    report = _restore_fails(restored)

    (problem,) = report["corrupt"]
    assert problem["sop_instance_uid"] == first.sop_instance_uid
    assert problem["cause"] == failures.OTHER_BYTES
    assert problem["reason"].startswith(
        "its bytes in the pack differ from the catalog's SHA-256"
    )
    uid = first.sop_instance_uid
    assert restored.held()[0] == {k: v for k, v in held.items() if k != uid}


def test_an_instance_the_manifest_does_not_list(disaster, site) -> None:
    _folder, held, _found, _studies = disaster
    restored, mirror = site
    path = _path(mirror, "p-000000003")
    first = _entries(path, _keys(restored))[0]
    _repack(path, _keys(restored), lambda items: items[1:])

    report = _restore_fails(restored)

    (problem,) = report["corrupt"]
    assert problem["sop_instance_uid"] == first.sop_instance_uid
    assert problem["cause"] == failures.NOT_IN_MANIFEST
    assert problem["reason"] == "its pack's manifest does not list it"
    assert problem["pack_id"] == "p-000000003"
    uid = first.sop_instance_uid
    assert restored.held()[0] == {k: v for k, v in held.items() if k != uid}


def test_reasons_over_sftp(disaster, tmp_path: Path, sshd: Sshd) -> None:
    """The same reasons, each its own, when the packs come from the mirror
    over SFTP: one pack not there, one member damaged, one instance that
    decodes to other bytes, one not in its manifest."""
    folder, held, _found, studies = disaster
    mirror = tmp_path / "mirror"
    shutil.copytree(folder / "mirror", mirror)
    settings = {"kind": "sftp", **sftp_settings(sshd, mirror)}
    restored = Restored(tmp_path, settings, folder / "escrow.txt")
    keys = _keys(restored)
    _path(mirror, "p-000000002").unlink()
    path = _path(mirror, "p-000000001")
    # Its last instance: the first is in pack 4 again, with other bytes.
    damaged = _entries(path, keys)[-1]
    data = bytearray(path.read_bytes())
    data[damaged.data_offset + 20] ^= 0x01
    path.write_bytes(bytes(data))
    other = _entries(_path(mirror, "p-000000003"), keys)[0].sop_instance_uid
    _repack(_path(mirror, "p-000000003"), keys, _other_bytes)
    unlisted = _entries(_path(mirror, "p-000000004"), keys)[0].sop_instance_uid
    _repack(_path(mirror, "p-000000004"), keys, lambda items: items[1:])

    report = _restore_fails(restored)

    missing = _problems(report, "missing")
    assert set(missing) == set(studies["ct-mid"])
    assert {p["cause"] for p in missing.values()} == {report_module.PACK_NOT_THERE}
    causes = {p["sop_instance_uid"]: p["cause"] for p in report["corrupt"]}
    assert causes == {
        damaged.sop_instance_uid: failures.MEMBER_DAMAGED,
        other: failures.OTHER_BYTES,
        unlisted: failures.NOT_IN_MANIFEST,
    }
    assert len({p["reason"] for p in report["corrupt"]}) == 3
    lost = set(missing) | set(causes)
    assert set(restored.held()[0]) == set(held) - lost


def test_the_report_takes_the_last_reason_noted_for_the_pack_of_the_copy(
    site,
) -> None:
    """The reasons file is read as the report is written: the last line
    for an instance wins, a line cut short by a crash is skipped, a reason
    noted for another pack is not taken, and a pack that could not be read
    counts its instances missing."""
    restored, mirror = site
    first = _damage_first_member(restored, mirror)
    assert restored.restore().returncode == 1
    folder = restored.data_dir / "restore"
    log = FailureLog(folder)
    uid = first.sop_instance_uid
    noted = log.read()[uid]
    assert (noted.pack_id, noted.failure.kind) == (
        "p-000000003",
        failures.MEMBER_DAMAGED,
    )

    def report_now() -> tuple[list[dict], list[dict]]:
        catalog = restored.catalog()
        try:
            contents = survey(DirectoryTransport(mirror))
            found = final_report(catalog, contents, {}, (), log.read()).as_json()
        finally:
            catalog.close()
        return found["missing"], found["corrupt"]

    log.add("p-000000003", {uid: Failure(failures.PACK_UNREAD, "gone meanwhile")})
    with open(log.path, "a") as out:
        out.write('{"uid": "' + uid + '", "pack": "p-0000')  # a crash
    missing, corrupt = report_now()
    assert corrupt == []
    assert [(p["sop_instance_uid"], p["cause"]) for p in missing] == [
        (uid, failures.PACK_UNREAD)
    ]
    assert missing[0]["reason"] == "its pack could not be read: gone meanwhile"

    log.add("p-000000001", {uid: Failure(failures.OTHER_BYTES)})
    missing, corrupt = report_now()
    assert missing == []
    assert [(p["sop_instance_uid"], p["cause"]) for p in corrupt] == [
        (uid, report_module.UNNOTED)
    ]
    assert "no reason was noted" in corrupt[0]["reason"]
