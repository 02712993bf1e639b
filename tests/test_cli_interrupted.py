"""Ctrl-C in a command that does not handle it itself: one line and exit
130, not click's "Aborted!" and exit 1 (the status of a failure)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.signal_on_open import SENT
from tests.test_recall_stopped_at_once import Archive

_REPOSITORY = Path(__file__).resolve().parents[1]


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(tmp_path: Path) -> None:
    archive = Archive.at(tmp_path)
    # The command reads its configuration first thing.
    pattern = r"^open .*/appliance\.toml$"
    command = [sys.executable, "-m", "tests.signal_on_open", pattern, "INT"]
    command += ["tiers", "--config", str(archive.config_path)]

    stopped = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=_REPOSITORY
    )

    assert SENT in stopped.stderr
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert stopped.stderr.splitlines()[1:] == ["interrupted"], stopped.stderr
