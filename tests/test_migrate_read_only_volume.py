"""A volume that refuses writes (its folder mounted read only, a cartridge
with its write-protect tab set) passes the pack on to the next volume with
room, with one WARNING naming it; only when no volume can take the pack
does the copy fail, in one line, with nothing counted."""

from __future__ import annotations

import subprocess
from pathlib import Path

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.storage.volumes.tapefake import FakeChanger, FakeTapeDrive
from tests.datasets import study_files, uid
from tests.read_only import read_only
from tests.tier_rules import MOVE_TO_OFFLINE, run

MiB = 1 << 20
STUDY = uid("study", "read-only-volume")


def archive_with_volumes(tmp_path: Path, volumes: str = "") -> Path:
    """A study imported, VOL001 and VOL002 labelled; the configuration with
    a rule that moves every study offline."""
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        "[replication]\nenabled = false\n"
        "[migration]\nmin_copies = 1\n" + volumes
    )
    files = study_files(tmp_path / "study", "read-only-volume", 2, pixel_bytes=2000)
    imported = run(config, "import", *map(str, files))
    assert imported.returncode == 0, imported.stderr
    for label in ("VOL001", "VOL002"):
        labelled = run(config, "volumes", "label", label, "--capacity", "64M")
        assert labelled.returncode == 0, labelled.stderr
    rules = tmp_path / "rules.toml"
    rules.write_text(config.read_text() + MOVE_TO_OFFLINE)
    return rules


def pack_locations(tmp_path: Path) -> list[str]:
    """Where the catalog counts the study's packs."""
    catalog = Catalog(tmp_path / "data" / "catalog", 2**24, readonly=True)
    try:
        return [pack.location for pack in copies.packs_of(catalog, STUDY)]
    finally:
        catalog.close()


def volume_warnings(stderr: str) -> list[str]:
    """The WARNING lines that name a volume (not the new master key's)."""
    lines = stderr.splitlines()
    return [line for line in lines if " WARNING " in line and "VOL0" in line]


def assert_passed_on_to_vol002(
    moved: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    """The migration went through, VOL001 refused with one warning and the
    pack is on VOL002."""
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "1 copy(ies) made, 1 release(s), 0 failed" in moved.stdout
    [warning] = volume_warnings(moved.stderr)
    assert "cannot write to volume VOL001: Read-only file system" in warning
    assert " ERROR " not in moved.stderr
    [location] = pack_locations(tmp_path)
    assert location.startswith("VOL002/")


def test_a_read_only_volume_folder_passes_the_pack_on(tmp_path: Path) -> None:
    rules = archive_with_volumes(tmp_path)
    library = tmp_path / "data" / "volumes"

    with read_only(library / "VOL001"):
        moved = run(rules, "migrate", "--now")

    assert_passed_on_to_vol002(moved, tmp_path)
    assert list((library / "VOL001" / "packs").iterdir()) == []


def test_no_writable_volume_fails_the_copy_in_one_line(tmp_path: Path) -> None:
    rules = archive_with_volumes(tmp_path)
    library = tmp_path / "data" / "volumes"

    with read_only(library / "VOL001"), read_only(library / "VOL002"):
        moved = run(rules, "migrate", "--now")

    assert moved.returncode == 1, moved.stdout + moved.stderr
    [failed] = [line for line in moved.stdout.splitlines() if "-> offline:" in line]
    assert "volumes VOL001, VOL002 refuse writes" in failed
    assert "make VOL001, VOL002 writable" in failed
    assert len(volume_warnings(moved.stderr)) == 2
    assert pack_locations(tmp_path) == []
    assert list(library.glob("*/packs/*")) == []


def test_a_write_protected_cartridge_passes_the_pack_on(tmp_path: Path) -> None:
    simulated = tmp_path / "simulated"
    changer = FakeChanger(simulated, [FakeTapeDrive()])
    for barcode in ("VOL001", "VOL002"):
        changer.insert_cartridge(barcode, 64 * MiB)
    rules = archive_with_volumes(
        tmp_path,
        f'[volumes]\nkind = "tape"\nsimulated_path = "{simulated}"\n'
        "record_size = 65536\n",
    )
    changer = FakeChanger(simulated, [FakeTapeDrive()])
    changer.set_write_protect("VOL001")

    moved = run(rules, "migrate", "--now")

    assert moved.returncode == 0, moved.stdout + moved.stderr
    [warning] = volume_warnings(moved.stderr)
    assert "VOL001" in warning and "write protected" in warning
    [location] = pack_locations(tmp_path)
    assert location.startswith("VOL002/")


def optical_archive(tmp_path: Path) -> tuple[Path, Path]:
    """As archive_with_volumes, with VOL001 and VOL002 as optical volumes;
    the rules and the folder of their images."""
    discs = tmp_path / "discs"
    discs.mkdir()
    rules = archive_with_volumes(
        tmp_path, f'[volumes]\nkind = "optical"\npath = "{discs}"\n'
    )
    return rules, discs


def test_a_read_only_disc_image_passes_the_pack_on(tmp_path: Path) -> None:
    """An optical volume whose image may not be written (here a read-only
    mount of the image alone) is passed over as a read-only folder is; its
    image is untouched and nothing is left in the staging folder."""
    rules, discs = optical_archive(tmp_path)
    size = (discs / "VOL001.iso").stat().st_size

    with read_only(discs / "VOL001.iso"):
        moved = run(rules, "migrate", "--now")

    assert_passed_on_to_vol002(moved, tmp_path)
    assert (discs / "VOL001.iso").stat().st_size == size
    assert list((discs / ".staging").iterdir()) == []
