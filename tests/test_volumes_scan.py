"""``appliance volumes scan LABEL``: a tape written by an appliance whose
tape registry (``volumes.state_path``) is lost, or by another appliance, is
read to its end and registered with every complete pack on it, as
docs/volumes.md and docs/restore.md tell the administrator to do before a
restore from volumes. Libraries that find their volumes by themselves say
so."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from appliance import config as configuration
from appliance.storage.volumes import open_library
from tests.conftest import config_text

MiB = 1 << 20


def write_config(folder: Path, volumes: dict[str, object]) -> Path:
    path = folder / "appliance.toml"
    settings = {"storage": {"data_dir": str(folder / "data")}, "volumes": volumes}
    path.write_text(config_text(settings, []))
    return path


def appliance(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_tape_the_library_forgot_is_scanned_and_registered(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "kind": "tape",
            "simulated_path": str(tmp_path / "simulated"),
            "state_path": str(tmp_path / "state"),
            "record_size": 65536,
        },
    )
    settings = configuration.load(config).volume_settings()
    library = open_library("tape", settings)
    library.changer.insert_cartridge("T00001", 64 * MiB)  # type: ignore[attr-defined]
    library.label("T00001", 64 * MiB)
    for n in (1, 2):
        library.write_pack("T00001", f"p-00000{n}", [bytes([n]) * 100_000])
    library.unload()  # type: ignore[attr-defined]
    shutil.rmtree(tmp_path / "state")  # the registry is lost with the server

    before = appliance("volumes", "list", config=config)
    scanned = appliance("volumes", "scan", "T00001", config=config)
    after = appliance("volumes", "list", config=config)

    assert "T00001" not in before.stdout
    assert scanned.returncode == 0, scanned.stderr
    assert "volume T00001: 2 pack(s) registered" in scanned.stdout
    assert "T00001" in after.stdout
    listed = open_library("tape", settings).list_packs("T00001")
    assert [p.pack_id for p in listed] == ["p-000001", "p-000002"]


def test_a_blank_tape_is_not_registered(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "kind": "tape",
            "simulated_path": str(tmp_path / "simulated"),
            "state_path": str(tmp_path / "state"),
            "record_size": 65536,
        },
    )
    library = open_library("tape", configuration.load(config).volume_settings())
    library.changer.insert_cartridge("T00009", 64 * MiB)  # type: ignore[attr-defined]

    scanned = appliance("volumes", "scan", "T00009", config=config)

    assert scanned.returncode == 1
    assert "T00009 has no volume label" in scanned.stderr
    assert "Traceback" not in scanned.stderr


def test_a_directory_library_needs_no_scan(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"kind": "directory"})

    scanned = appliance("volumes", "scan", "L00001", config=config)

    assert scanned.returncode == 1
    assert "finds its volumes by itself" in scanned.stderr
