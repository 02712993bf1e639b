"""What a directory volume's folder must hold to count as that volume: its
own label file and its packs folder. A folder put back under the wrong name
(the wrong LTFS tape mounted there, folders swapped on the way back from
the vault) or left damaged is not the volume, and takes none of its packs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from appliance.errors import VolumeNotReachable
from appliance.storage.volumes import DirectoryLibrary
from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files

MOVE_TO_OFFLINE = """
[[rules]]
name = "all-to-offline"
action = "move"
from = "online"
to = "offline"
"""


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
