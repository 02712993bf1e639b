"""Another archive's volume under one of this archive's labels (the
vault's two VOL001s swapped, a folder copied from another appliance) is
not this archive's volume, on every kind of library: ``volumes loaded``
refuses it with one line naming both archives, the recall waiting for the
volume keeps waiting (no copy counted as damaged), and this archive's own
volume put back serves it. The tape library is the simulated drive and
changer, behind the interfaces the real ones use. Optical discs:
tests/test_optical_wrong_disc.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.storage.volumes import DirectoryLibrary
from appliance.storage.volumes.tape import TapeLibrary
from appliance.storage.volumes.tapefake import FakeChanger, FakeTapeDrive
from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_OFFLINE, run

MiB = 1 << 20
RECORD_SIZE = 65536
# The id of another archive (made-up), as its volume labels name it.
ANOTHER_ARCHIVE = "c2d3e4f5-0a1b-4c2d-8e3f-4a5b6c7d8e9f"


class Directory:
    """Folders in the data directory's volumes folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def settings(self) -> dict[str, object]:
        return {"kind": "directory"}

    def prepare(self, appliance: Appliance) -> None:
        self.volumes = appliance.data_dir / "volumes"

    def swap_in_another_archives(self) -> None:
        other = DirectoryLibrary(self.tmp_path / "other", archive=ANOTHER_ARCHIVE)
        other.label("VOL001", 64 * MiB)
        other.write_pack("VOL001", "p-000000001", [b"another archive's pack"])
        shutil.move(self.volumes / "VOL001", self.tmp_path / "VOL001.own")
        shutil.copytree(self.tmp_path / "other" / "VOL001", self.volumes / "VOL001")

    def put_back(self) -> None:
        shutil.rmtree(self.volumes / "VOL001")
        shutil.move(self.tmp_path / "VOL001.own", self.volumes / "VOL001")


class Tape:
    """Cartridges in the simulated changer; swapping one is replacing the
    bytes of its cartridge, barcode and all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.simulated = tmp_path / "simulated"

    def settings(self) -> dict[str, object]:
        return {
            "kind": "tape",
            "simulated_path": str(self.simulated),
            "state_path": str(self.tmp_path / "tape-state"),
            "record_size": RECORD_SIZE,
        }

    def prepare(self, appliance: Appliance) -> None:
        changer = FakeChanger(self.simulated, [FakeTapeDrive()])
        changer.insert_cartridge("VOL001", 64 * MiB)
        self.cartridge = changer.cartridge_path("VOL001")

    def swap_in_another_archives(self) -> None:
        drive = FakeTapeDrive()
        changer = FakeChanger(self.tmp_path / "other", [drive])
        changer.insert_cartridge("VOL001", 64 * MiB)
        other = TapeLibrary(
            drive,
            changer,
            self.tmp_path / "other-state",
            record_size=RECORD_SIZE,
            archive=ANOTHER_ARCHIVE,
        )
        other.label("VOL001", 64 * MiB)
        other.write_pack("VOL001", "p-000000001", [b"another archive's pack"])
        other.unload()
        shutil.move(self.cartridge, self.tmp_path / "VOL001.own")
        shutil.copyfile(changer.cartridge_path("VOL001"), self.cartridge)

    def put_back(self) -> None:
        shutil.move(self.tmp_path / "VOL001.own", self.cartridge)


@pytest.mark.parametrize("kind", [Directory, Tape], ids=["directory", "tape"])
def test_another_archives_volume_with_the_same_label_is_not_the_volume(
    appliance_factory, tmp_path: Path, kind: type
) -> None:
    library = kind(tmp_path)
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "volumes": library.settings(),
    }
    appliance: Appliance = appliance_factory(settings).start()
    config = appliance.config_path
    library.prepare(appliance)
    appliance.cli("volumes", "label", "VOL001", "--capacity", "64M")
    files = study_files(tmp_path / "study", "other-archive", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(config.read_text() + MOVE_TO_OFFLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    study = uid("study", "other-archive")
    mine = (appliance.data_dir / "archive-id").read_text().strip()
    both = f"holds volume VOL001 of archive {ANOTHER_ARCHIVE}, not of this archive"

    library.swap_in_another_archives()
    asked = run(config, "recall", study)
    loaded = run(config, "volumes", "loaded", "VOL001")

    assert asked.returncode == 1 and "waiting for volume VOL001" in asked.stderr
    assert loaded.returncode == 1, loaded.stdout + loaded.stderr
    assert "Traceback" not in loaded.stderr
    said = [line for line in loaded.stderr.splitlines() if line.startswith("volume")]
    assert len(said) == 1 and f"{both} ({mine})" in said[0], loaded.stderr
    assert "load volume VOL001" in run(config, "volumes", "requests").stdout
    again = run(config, "recall", study)
    assert again.returncode == 1 and "waiting for volume VOL001" in again.stderr
    assert "damaged" not in again.stdout + again.stderr

    # This archive's copies on its own VOL001 still count.
    library.put_back()
    right = run(config, "volumes", "loaded", "VOL001")
    assert right.returncode == 0, right.stdout + right.stderr
    assert "1 waiting study(ies) recalled" in right.stdout
    assert "no open requests" in run(config, "volumes", "requests").stdout
