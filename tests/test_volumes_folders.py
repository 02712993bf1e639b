"""What a directory volume's folder must hold to count as that volume: its
own label file and its packs folder. A folder put back under the wrong name
(the wrong LTFS tape mounted there, folders swapped on the way back from
the vault) or left damaged is not the volume, and takes none of its packs.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from appliance.errors import VolumeNotReachable
from appliance.storage.archive_id import read_archive_id
from appliance.storage.volumes import DirectoryLibrary
from appliance.storage.volumes.packfiles import location_from_name
from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files
from tests.tier_rules import MOVE_TO_OFFLINE


def swap_in(library: Path, wrong: str, right: str, shelf: Path) -> None:
    """Take ``right``'s folder to the shelf and put ``wrong``'s in its place."""
    shelf.mkdir(exist_ok=True)
    shutil.move(library / right, shelf / right)
    shutil.move(library / wrong, library / right)


def test_a_folder_labelled_for_another_volume_is_not_that_volume(
    tmp_path: Path,
) -> None:
    library = DirectoryLibrary(tmp_path / "library")
    library.label("VOL001", 10**7)
    library.label("VOL002", 10**7)
    kept = library.write_pack("VOL001", "p-000001", [b"on VOL001"])

    swap_in(tmp_path / "library", "VOL002", "VOL001", tmp_path / "shelf")

    assert not library.is_reachable("VOL001")
    assert {v.label: v.reachable for v in library.list_volumes()} == {
        "VOL001": False,
        "VOL002": False,
    }
    with pytest.raises(VolumeNotReachable, match="holds volume VOL002"):
        library.write_pack("VOL001", "p-000002", [b"meant for VOL001"])
    with pytest.raises(VolumeNotReachable, match="VOL001"):
        library.read_pack(kept)
    assert list((tmp_path / "library" / "VOL001" / "packs").iterdir()) == []

    shutil.move(tmp_path / "library" / "VOL001", tmp_path / "library" / "VOL002")
    shutil.move(tmp_path / "shelf" / "VOL001", tmp_path / "library" / "VOL001")
    assert b"".join(library.read_pack(kept)) == b"on VOL001"


def test_a_volume_folder_without_its_packs_folder_is_not_used(
    tmp_path: Path,
) -> None:
    library = DirectoryLibrary(tmp_path / "library")
    library.label("VOL001", 10**7)
    shutil.rmtree(tmp_path / "library" / "VOL001" / "packs")

    assert [v.reachable for v in library.list_volumes()] == [False]
    with pytest.raises(VolumeNotReachable, match="no packs folder"):
        library.list_packs("VOL001")
    with pytest.raises(VolumeNotReachable, match="no packs folder"):
        library.write_pack("VOL001", "p-000001", [b"pack"])


def cli_with_rules(appliance: Appliance, *args: str) -> CompletedProcess[str]:
    """The command line with the appliance's configuration and a rule that
    moves every study to the offline tier."""
    config = appliance.directory / "rules.toml"
    config.write_text(appliance.config_path.read_text() + MOVE_TO_OFFLINE)
    command = [sys.executable, "-m", "appliance", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture
def appliance(appliance_factory) -> Appliance:
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    return appliance_factory(settings).start()


def test_migration_writes_nothing_to_a_swapped_folder(
    appliance: Appliance, tmp_path: Path
) -> None:
    for label in ("TAPE01", "TAPE02"):
        appliance.cli("volumes", "label", label, "--capacity", "1G")
    library = appliance.data_dir / "volumes"
    swap_in(library, "TAPE02", "TAPE01", tmp_path / "shelf")
    files = study_files(tmp_path / "study", "swapped", 2, pixel_bytes=4000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}

    migrated = cli_with_rules(appliance, "migrate", "--now")

    assert migrated.returncode == 1
    assert "no reachable volume" in migrated.stdout + migrated.stderr
    assert list((library / "TAPE01" / "packs").iterdir()) == []
    listed = appliance.cli("volumes", "list")
    assert "Traceback" not in listed.stderr
    assert "holds volume TAPE02" in listed.stderr


def test_volumes_list_and_verify_name_a_missing_packs_folder(
    appliance: Appliance,
) -> None:
    appliance.cli("volumes", "label", "TAPE03", "--capacity", "1G")
    shutil.rmtree(appliance.data_dir / "volumes" / "TAPE03" / "packs")

    listed = appliance.cli("volumes", "list")
    verified = appliance.cli("volumes", "verify", "TAPE03", check=False)

    assert "TAPE03" in listed.stdout
    assert "no packs folder" in listed.stderr
    assert verified.returncode == 1
    assert "Traceback" not in verified.stderr
    assert "no packs folder" in verified.stderr


# -- volumes verify: the packs found against the catalog's ---------------------


def migrated_volume(appliance: Appliance, tmp_path: Path) -> dict[int, Path]:
    """Three studies moved to a new volume L00001: its pack files by position."""
    appliance.cli("volumes", "label", "L00001", "--capacity", "1G")
    for name in ("first", "second", "third"):
        files = study_files(tmp_path / name, name, 2, pixel_bytes=4000)
        assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    migrated = cli_with_rules(appliance, "migrate", "--now")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr

    packs = appliance.data_dir / "volumes" / "L00001" / "packs"
    found = {int(path.name[:6]): path for path in sorted(packs.iterdir())}
    assert sorted(found) == [1, 2, 3]
    return found


def pack_of(path: Path) -> tuple[str, str]:
    """The id and SHA-256 a pack file's name gives."""
    location = location_from_name("L00001", path.name, path.stat().st_size)
    assert location is not None
    return location.pack_id, location.sha256


def put_other_volume(
    appliance: Appliance, tmp_path: Path, packs: list[tuple[str, bytes]]
) -> None:
    """Put in L00001's place another volume L00001 of the same archive that
    holds ``packs`` (id, bytes), as one of the archive's other libraries
    (a standby appliance's, say) would have written them."""
    archive = read_archive_id(appliance.data_dir)
    other = DirectoryLibrary(tmp_path / "other", archive=archive)
    other.label("L00001", 10**9)
    for pack_id, data in packs:
        other.write_pack("L00001", pack_id, [data])

    library = appliance.data_dir / "volumes"
    (tmp_path / "shelf").mkdir()
    shutil.move(library / "L00001", tmp_path / "shelf" / "L00001")
    shutil.move(tmp_path / "other" / "L00001", library / "L00001")


def test_verify_reports_a_swapped_volume_with_other_packs(
    appliance: Appliance, tmp_path: Path
) -> None:
    files = migrated_volume(appliance, tmp_path)
    before = appliance.cli("volumes", "verify", "L00001")
    (first, sha1), (second, sha2), (third, sha3) = map(pack_of, files.values())
    # Two of the archive's own packs, at positions that hold others in the
    # catalog: each reads back good on its own.
    put_other_volume(
        appliance,
        tmp_path,
        [(second, files[2].read_bytes()), (third, files[3].read_bytes())],
    )

    verified = appliance.cli("volumes", "verify", "L00001", check=False)

    assert "volume L00001: 3 pack(s) read, 0 bad, 0 missing" in before.stdout
    assert verified.returncode == 1
    assert "Traceback" not in verified.stderr
    assert (
        f"volume L00001 position 1: the catalog expects pack {first} (SHA-256 "
        f"{sha1}); the volume holds pack {second} (SHA-256 {sha2})"
    ) in verified.stderr
    assert (
        f"volume L00001 position 2: the catalog expects pack {second} (SHA-256 "
        f"{sha2}); the volume holds pack {third} (SHA-256 {sha3})"
    ) in verified.stderr
    assert (
        f"volume L00001 position 3: the catalog expects pack {third} (SHA-256 "
        f"{sha3}); the volume holds no pack there"
    ) in verified.stderr
    assert "volume L00001: 2 pack(s) read, 2 bad, 1 missing" in verified.stdout


def test_verify_reports_a_pack_of_the_same_id_with_other_bytes(
    appliance: Appliance, tmp_path: Path
) -> None:
    files = migrated_volume(appliance, tmp_path)
    (first, sha1), (second, _), (third, _) = map(pack_of, files.values())
    other_bytes = files[2].read_bytes()
    # The catalog's three packs in place, under their ids, but the first
    # holds other bytes; and a fourth pack that the catalog does not record.
    put_other_volume(
        appliance,
        tmp_path,
        [
            (first, other_bytes),
            (second, files[2].read_bytes()),
            (third, files[3].read_bytes()),
            (first, files[1].read_bytes()),
        ],
    )
    other_sha = hashlib.sha256(other_bytes).hexdigest()

    verified = appliance.cli("volumes", "verify", "L00001", check=False)

    assert verified.returncode == 1
    assert (
        f"volume L00001 position 1: the catalog expects pack {first} (SHA-256 "
        f"{sha1}); the volume holds pack {first} (SHA-256 {other_sha})"
    ) in verified.stderr
    assert verified.stdout.strip().endswith(
        "volume L00001: 3 pack(s) read, 1 bad, 0 missing; 1 other pack(s) on the "
        "volume that the catalog does not record there, not read"
    )


def test_verify_reads_the_bytes_under_the_catalogs_name_and_goes_on(
    appliance: Appliance, tmp_path: Path
) -> None:
    files = migrated_volume(appliance, tmp_path)
    first, sha1 = pack_of(files[1])
    # Other bytes under the file name of the catalog's pack: only reading
    # them back tells.
    files[1].write_bytes(files[2].read_bytes())

    verified = appliance.cli("volumes", "verify", "L00001", check=False)

    assert verified.returncode == 1
    assert "Traceback" not in verified.stderr
    assert (
        f"volume L00001 position 1: the catalog expects pack {first} (SHA-256 "
        f"{sha1}); pack {first} on volume L00001 (position 1) reads back as "
    ) in verified.stderr
    assert "volume L00001: 3 pack(s) read, 1 bad, 0 missing" in verified.stdout
