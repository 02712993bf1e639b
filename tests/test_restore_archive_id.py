"""A restore brings the archive's id back. From the mirror: the new
appliance reads the lost one's volumes (their labels name that id), still
refuses another archive's volume of the same label, and replicates to the
same mirror again; from the snapshot, and from the pack manifests alone
(``--scan``: the id then comes from the mirror's identity marker). From
the volumes: the id their labels name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.catalog.archive import archive_id
from appliance.catalog.store import Catalog
from appliance.errors import VolumeNotReachable
from appliance.hsm.archive import archive_for_labels
from appliance.hsm.tiers import open_tiers
from appliance.replication.identity import check_mirror
from appliance.replication.transports.directory import DirectoryTransport
from appliance.storage.archive_id import ArchiveIdFile, read_archive_id
from appliance.storage.volumes import DirectoryLibrary
from tests.conftest import config_text
from tests.restore_site import Origin, Restored, appliance, mirror_settings
from tests.test_restore_volumes import MB
from tests.test_restore_volumes import _Origin as VolumeOrigin

# Another archive's id (made-up), as its volume labels name it.
ANOTHER_ARCHIVE = "5d0c7c1e-8f2a-4b3d-9e6f-0a1b2c3d4e5f"


def lost_appliance(folder: Path) -> tuple[str, Path, Path]:
    """An appliance that labelled volume VOL001 (its id made then), wrote
    a pack there, replicated with a catalog snapshot, and was lost but for
    its mirror, its escrow and its volumes; (its id, mirror, volumes)."""
    mirror = folder / "mirror"
    mirror.mkdir(parents=True)
    origin = Origin(folder, DirectoryTransport(mirror), mirror_settings(mirror))
    data_dir = origin.config.data_dir
    volumes = folder / "volumes"
    library = DirectoryLibrary(volumes, archive=ArchiveIdFile(data_dir))
    mine = archive_for_labels(data_dir, origin.catalog)
    library.label("VOL001", 64 << 20)
    library.write_pack("VOL001", "p-000000001", [b"the lost appliance's pack"])
    origin.store("kept", 2)
    origin.replicate()
    origin.replicator.send_snapshot()
    origin.escrow()
    origin.lose()
    shutil.rmtree(data_dir)
    return mine, mirror, volumes


@pytest.mark.parametrize("options", [(), ("--scan",)], ids=["snapshot", "scan"])
def test_the_restored_appliance_reads_its_own_volumes(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    mine, mirror, volumes = lost_appliance(tmp_path / "lost")
    settings = {"volumes": {"kind": "directory", "path": str(volumes)}}
    escrow = tmp_path / "lost" / "escrow.txt"
    restored = Restored(tmp_path, mirror_settings(mirror), escrow, settings)

    done = restored.restore(*options)

    assert done.returncode == 0, done.stderr
    assert read_archive_id(restored.data_dir) == mine
    catalog = restored.catalog()
    try:
        assert archive_id(catalog) == mine
        # The mirror is this archive's still: replication goes on.
        spool = tmp_path / "spool"
        spool.mkdir()
        keys = restored_keys(restored)
        assert check_mirror(catalog, DirectoryTransport(mirror), keys, spool) == mine
    finally:
        catalog.close()
    assert volume_state(restored, "VOL001") == ("loaded", "")
    library = open_tiers(restored.config).packs["offline"].library
    [pack] = library.list_packs("VOL001")
    assert b"".join(library.read_pack(pack)) == b"the lost appliance's pack"

    # Another archive's VOL001 in place of this one's is not the volume.
    DirectoryLibrary(tmp_path / "other", archive=ANOTHER_ARCHIVE).label(
        "VOL001", 64 << 20
    )
    shutil.move(volumes / "VOL001", tmp_path / "VOL001.own")
    shutil.move(tmp_path / "other" / "VOL001", volumes / "VOL001")
    state, said = volume_state(restored, "VOL001")
    assert state == "on the shelf"
    assert f"VOL001 of archive {ANOTHER_ARCHIVE}, not of this archive ({mine})" in (
        said
    )
    with pytest.raises(VolumeNotReachable, match="not of this archive"):
        library.read_pack(pack)


def volume_state(restored: Restored, label: str) -> tuple[str, str]:
    """What ``appliance volumes list`` says of volume ``label``: its state
    and what it printed on stderr."""
    listed = appliance("volumes", "list", config=restored.config_path)
    assert listed.returncode == 0, listed.stderr
    for line in listed.stdout.splitlines():
        if f" {label} " in line:
            state = "loaded" if "loaded" in line else "on the shelf"
            return state, listed.stderr
    raise AssertionError(f"{label} not listed: {listed.stdout}")


def restored_keys(restored: Restored):
    from appliance.storage.keys import KeyStore, key_store_path

    return KeyStore.load(key_store_path(restored.data_dir))


def test_a_restore_from_volumes_takes_the_id_their_labels_name(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "lost"
    folder.mkdir()
    origin = VolumeOrigin(folder)
    mine = archive_for_labels(origin.config.data_dir, origin.catalog)
    for label in ("L1", "L2"):
        origin.library.label(label, 50 * MB)
    origin.copy(origin.study_of(origin.store("kept", 2)), "L1")
    keys = origin.tiers.keys
    assert keys is not None
    (folder / "escrow.txt").write_text(keys.export_escrow())
    origin.ingest.close()
    origin.catalog.close()
    data_dir = tmp_path / "restored"
    shutil.copytree(origin.volumes, data_dir / "volumes")
    config = tmp_path / "restored.toml"
    config.write_text(config_text(volume_settings(data_dir), []))
    imported = appliance("keys", "import", str(folder / "escrow.txt"), config=config)
    assert imported.returncode == 0, imported.stderr

    done = appliance("restore", "--from", "volumes", config=config)

    assert done.returncode == 0, done.stderr
    assert read_archive_id(data_dir) == mine
    restored = Catalog(data_dir / "catalog", 2**26)
    try:
        assert archive_id(restored) == mine
    finally:
        restored.close()
    listed = appliance("volumes", "list", config=config)
    assert listed.returncode == 0 and "not of this archive" not in listed.stderr
    assert [line for line in listed.stdout.splitlines() if "loaded" in line]


def volume_settings(data_dir: Path) -> dict[str, dict[str, object]]:
    return {
        "storage": {"data_dir": str(data_dir), "reserved_bytes": 0},
        "volumes": {"kind": "directory"},
    }
