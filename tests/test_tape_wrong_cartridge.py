"""A cartridge whose barcode sticker names one of this archive's volumes
while its tape holds another of them (stickers swapped, a cartridge put
back in the wrong case) is not the volume: the recall that needs the volume
waits for it and counts no copy on it as damaged, and the right cartridge
put back serves it. The tape library is the simulated drive and changer,
behind the interfaces the real ones use."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.storage.volumes.tapefake import FakeChanger, FakeTapeDrive
from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_OFFLINE, run

MiB = 1 << 20


def test_a_cartridge_holding_another_volume_is_waited_past(
    appliance_factory, tmp_path: Path
) -> None:
    simulated = tmp_path / "simulated"
    volumes = {
        "kind": "tape",
        "simulated_path": str(simulated),
        "state_path": str(tmp_path / "tape-state"),
        "record_size": 65536,
    }
    settings = {"migration": {"enabled": False, "min_copies": 1}, "volumes": volumes}
    appliance: Appliance = appliance_factory(settings).start()
    config = appliance.config_path
    changer = FakeChanger(simulated, [FakeTapeDrive()])
    for barcode in ("VOL001", "VOL002"):
        changer.insert_cartridge(barcode, 64 * MiB)
        labelled = appliance.cli("volumes", "label", barcode, "--capacity", "64M")
        assert labelled.returncode == 0, labelled.stderr
    files = study_files(tmp_path / "study", "wrong-cartridge", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(config.read_text() + MOVE_TO_OFFLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert run(config, "volumes", "unloaded", "VOL001").returncode == 0
    study = uid("study", "wrong-cartridge")
    own = changer.cartridge_path("VOL001")
    shutil.move(own, tmp_path / "VOL001.own")
    shutil.copyfile(changer.cartridge_path("VOL002"), own)

    asked = run(config, "recall", study)
    again = run(config, "recall", study)

    assert asked.returncode == 1 and "waiting for volume VOL001" in asked.stderr
    assert "check its barcode sticker" in asked.stderr
    assert again.returncode == 1 and "waiting for volume VOL001" in again.stderr
    assert "no copy below online" not in again.stderr
    assert "load volume VOL001" in run(config, "volumes", "requests").stdout

    # This archive's copies on its own VOL001 still count.
    shutil.move(tmp_path / "VOL001.own", own)
    right = run(config, "volumes", "loaded", "VOL001")
    assert right.returncode == 0, right.stdout + right.stderr
    assert "1 waiting study(ies) recalled" in right.stdout
