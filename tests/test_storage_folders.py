"""A setting that names a folder but points at a file (a typing mistake,
a mount point made as a file): the appliance does not start, and says
which path is a file; no command ends in a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import config_text, free_port


def appliance(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def config_with(folder: Path, section: str, key: str, value: str) -> Path:
    settings: dict[str, dict[str, object]] = {
        "node": {"port": free_port()},
        "web": {"enabled": False},
        "storage": {"data_dir": str(folder / "data")},
    }
    settings.setdefault(section, {})[key] = value
    if section == "volumes" and key == "state_path":
        settings["volumes"].update(
            {"kind": "tape", "simulated_path": str(folder / "simulated")}
        )
    path = folder / "appliance.toml"
    path.write_text(config_text(settings, []))
    return path


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("storage", "online_path"),
        ("storage", "nearline_path"),
        ("storage", "catalog_path"),
        ("volumes", "path"),
        ("volumes", "state_path"),
    ],
)
def test_serve_names_the_file_in_place_of_a_folder(
    tmp_path: Path, section: str, key: str
) -> None:
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("not a folder\n")
    config = config_with(tmp_path, section, key, str(in_the_way))

    started = appliance("serve", config=config)

    assert started.returncode == 1
    assert f"{in_the_way} is a file, not a folder" in started.stderr
    assert "Traceback" not in started.stderr
    assert in_the_way.read_text() == "not a folder\n"


def test_volumes_list_names_a_tape_state_path_that_is_a_file(tmp_path: Path) -> None:
    in_the_way = tmp_path / "state"
    in_the_way.write_text("")
    config = config_with(tmp_path, "volumes", "state_path", str(in_the_way))

    listed = appliance("volumes", "list", config=config)

    assert listed.returncode == 1
    assert "Traceback" not in listed.stderr
    assert f"{in_the_way} is a file, not a folder" in listed.stderr
