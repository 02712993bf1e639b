"""The volume commands that work without a catalog (``list``, ``unloaded``,
``export``: a restore from volumes needs them first) pointed at a data
directory that is not there (a mistyped --data-dir) say so in one line and
make nothing: no data directory, no empty library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [("list",), ("unloaded", "VOL001"), ("export", "VOL001")]


@pytest.mark.parametrize("args", COMMANDS, ids=[c[0] for c in COMMANDS])
@pytest.mark.parametrize("kind", ["directory", "tape"])
def test_a_volume_command_on_a_missing_data_dir_makes_nothing(
    tmp_path: Path, args: tuple[str, ...], kind: str
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(f'[volumes]\nkind = "{kind}"\n')
    if kind == "tape":
        config.write_text(
            config.read_text() + f'simulated_path = "{tmp_path / "simulated"}"\n'
        )
    data_dir = tmp_path / "typo"
    command = [sys.executable, "-m", "appliance", "volumes", *args]
    command += ["--data-dir", str(data_dir), "--config", str(config)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    folder = data_dir / ("volume-state" if kind == "tape" else "volumes")
    assert done.stderr.splitlines() == [
        f"no volume library at {folder}: no volume labelled yet, or "
        "--data-dir / --config point elsewhere"
    ]
    assert not data_dir.exists()
