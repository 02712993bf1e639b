"""An optical volume's image must hold that volume: another disc's image
put in its place (copied back from the wrong disc) is refused with both
labels named, is neither read nor written, and the volume is still asked
for; as a directory library does with a swapped folder and a tape library
with a cartridge whose tape label is not its barcode. Real xorriso."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.errors import VolumeNotReachable
from appliance.storage.volumes.optical import OpticalLibrary
from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_OFFLINE, run

pytestmark = pytest.mark.skipif(
    shutil.which("xorriso") is None,
    reason="xorriso is not installed (apt-get install xorriso)",
)

MiB = 1 << 20
# The id of another archive (made-up), as its volume labels name it.
ANOTHER_ARCHIVE = "0b7e5a52-2f3c-4d1e-9a4b-6c1d2e3f4a5b"


def swap_in(discs: Path, wrong: str, right: str, shelf: Path) -> None:
    """Shelve ``right``'s image and copy ``wrong``'s image in its place."""
    shelf.mkdir(exist_ok=True)
    shutil.move(discs / f"{right}.iso", shelf / f"{right}.iso")
    shutil.copyfile(discs / f"{wrong}.iso", discs / f"{right}.iso")


def test_another_discs_image_is_not_the_volume(tmp_path: Path) -> None:
    discs = tmp_path / "discs"
    library = OpticalLibrary(discs)
    library.label("DISC01", 16 * MiB)
    library.label("DISC02", 16 * MiB)
    kept = library.write_pack("DISC01", "p-000001", [b"on DISC01"])
    library.write_pack("DISC02", "p-000002", [b"on DISC02"])

    swap_in(discs, "DISC02", "DISC01", tmp_path / "shelf")
    before = (discs / "DISC01.iso").read_bytes()

    assert not library.is_reachable("DISC01")
    assert library.is_reachable("DISC02")
    assert {v.label: v.reachable for v in library.list_volumes()} == {
        "DISC01": False,
        "DISC02": True,
    }
    both = r"holds volume DISC02, not DISC01"
    with pytest.raises(VolumeNotReachable, match=both):
        library.write_pack("DISC01", "p-000003", [b"meant for DISC01"])
    with pytest.raises(VolumeNotReachable, match=both):
        library.read_pack(kept)
    with pytest.raises(VolumeNotReachable, match=both):
        library.list_packs("DISC01")
    with pytest.raises(VolumeNotReachable, match=both):
        library.finalise("DISC01")
    assert (discs / "DISC01.iso").read_bytes() == before
    assert not library.list_volumes()[0].full

    shutil.copyfile(tmp_path / "shelf" / "DISC01.iso", discs / "DISC01.iso")
    assert library.is_reachable("DISC01")
    assert b"".join(library.read_pack(kept)) == b"on DISC01"


def study_on_disc01(appliance_factory, tmp_path: Path, name: str) -> Appliance:
    """An appliance on optical volumes whose study ``name`` (2 instances)
    was moved onto disc DISC01."""
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "volumes": {"kind": "optical"},
    }
    appliance: Appliance = appliance_factory(settings).start()
    config = appliance.config_path
    appliance.cli("volumes", "label", "DISC01", "--capacity", "100M")
    files = study_files(tmp_path / "study", name, 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(config.read_text() + MOVE_TO_OFFLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    return appliance


def test_loading_the_wrong_disc_is_refused_and_the_volume_still_asked_for(
    appliance_factory, tmp_path: Path
) -> None:
    appliance = study_on_disc01(appliance_factory, tmp_path, "optical")
    config = appliance.config_path
    appliance.cli("volumes", "label", "DISC02", "--capacity", "100M")
    discs = appliance.data_dir / "volumes"
    study = uid("study", "optical")

    swap_in(discs, "DISC02", "DISC01", tmp_path / "shelf")
    asked = run(config, "recall", study)
    assert asked.returncode == 1 and "waiting for volume DISC01" in asked.stderr
    images = {path.name: path.read_bytes() for path in discs.glob("*.iso")}

    loaded = run(config, "volumes", "loaded", "DISC01")

    assert loaded.returncode == 1, loaded.stdout + loaded.stderr
    assert "Traceback" not in loaded.stderr
    assert "holds volume DISC02, not DISC01" in loaded.stderr
    assert {path.name: path.read_bytes() for path in discs.glob("*.iso")} == images
    assert "load volume DISC01" in run(config, "volumes", "requests").stdout
    listed = run(config, "volumes", "list")
    assert "holds volume DISC02, not DISC01" in listed.stderr
    again = run(config, "recall", study)
    assert again.returncode == 1 and "waiting for volume DISC01" in again.stderr

    shutil.copyfile(tmp_path / "shelf" / "DISC01.iso", discs / "DISC01.iso")
    right = run(config, "volumes", "loaded", "DISC01")

    assert right.returncode == 0, right.stdout + right.stderr
    assert "1 waiting study(ies) recalled" in right.stdout
    assert "no open requests" in run(config, "volumes", "requests").stdout


def test_another_archives_disc_with_the_same_label_is_not_the_volume(
    appliance_factory, tmp_path: Path
) -> None:
    appliance = study_on_disc01(appliance_factory, tmp_path, "same-label")
    config = appliance.config_path
    discs = appliance.data_dir / "volumes"
    study = uid("study", "same-label")

    # Another archive's disc, labelled DISC01 too, read back in its place.
    other = OpticalLibrary(tmp_path / "other", archive=ANOTHER_ARCHIVE)
    other.label("DISC01", 16 * MiB)
    other.write_pack("DISC01", "p-000000001", [b"another archive's pack"])
    (tmp_path / "shelf").mkdir()
    shutil.move(discs / "DISC01.iso", tmp_path / "shelf" / "DISC01.iso")
    asked = run(config, "recall", study)
    assert asked.returncode == 1 and "waiting for volume DISC01" in asked.stderr
    shutil.copyfile(tmp_path / "other" / "DISC01.iso", discs / "DISC01.iso")

    loaded = run(config, "volumes", "loaded", "DISC01")

    assert loaded.returncode == 1, loaded.stdout + loaded.stderr
    assert "Traceback" not in loaded.stderr
    said = [line for line in loaded.stderr.splitlines() if line.startswith("volume")]
    mine = (appliance.data_dir / "archive-id").read_text().strip()
    both = f"holds volume DISC01 of archive {ANOTHER_ARCHIVE}, not of this archive "
    assert len(said) == 1 and both + f"({mine})" in said[0], loaded.stderr
    assert "load volume DISC01" in run(config, "volumes", "requests").stdout
    listed = run(config, "volumes", "list")
    assert both in listed.stderr and "on the shelf" in listed.stdout
    again = run(config, "recall", study)
    assert again.returncode == 1 and "waiting for volume DISC01" in again.stderr
    assert "damaged" not in again.stderr + again.stdout
    assert (tmp_path / "other" / "DISC01.iso").read_bytes() == (
        discs / "DISC01.iso"
    ).read_bytes()
    # This archive's copies on its own DISC01 still count.
    shutil.copyfile(tmp_path / "shelf" / "DISC01.iso", discs / "DISC01.iso")
    right = run(config, "volumes", "loaded", "DISC01")
    assert right.returncode == 0, right.stdout + right.stderr
    assert "1 waiting study(ies) recalled" in right.stdout
