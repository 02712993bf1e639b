"""Ctrl-C while the ``appliance`` command still loads its modules: one
line and exit status 130, no traceback."""

from __future__ import annotations

import subprocess
import sys

# Ctrl-C arrives while the command line's module is imported: a finder
# that raises KeyboardInterrupt for it, as the signal would mid-import.
_INTERRUPTED_IMPORT = """
import sys

class Interrupting:
    def find_spec(self, name, path=None, target=None):
        if name == "appliance.cli":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupting())
from appliance.__main__ import run
sys.argv = ["appliance", "--help"]
run()
"""


def test_ctrl_c_while_loading_is_one_line_and_exit_130() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_IMPORT],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted before the command started\n"


def test_the_command_runs_as_before() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout
