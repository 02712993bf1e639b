"""``appliance import`` stopped with Ctrl-C: the file in flight is
finished, the summary says what was imported and refused so far and how
far it got, the exit status is 130, and the same command run again
imports the rest (what is there already is recognised)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.datasets import study_files

# The command line, with a SIGINT arriving while the third file is being
# imported: what an administrator's Ctrl-C does, at a known point.
INTERRUPTED_ON_THE_THIRD_FILE = """
import os, signal, sys
from appliance import cli, ingest

original = ingest.Ingest.import_file
calls = []

def import_file(self, path, source):
    calls.append(path)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return original(self, path, source)

ingest.Ingest.import_file = import_file
sys.argv = ["appliance", *sys.argv[1:]]
cli.main()
"""


def run(*args: str, interrupted: bool) -> subprocess.CompletedProcess[str]:
    start = (
        ["-c", INTERRUPTED_ON_THE_THIRD_FILE] if interrupted else ["-m", "appliance"]
    )
    return subprocess.run(
        [sys.executable, *start, *args], capture_output=True, text=True, timeout=300
    )


def test_ctrl_c_finishes_the_file_in_flight_and_says_how_far(tmp_path: Path) -> None:
    folder = tmp_path / "cd"
    study_files(folder, "interrupted", 6, pixel_bytes=2000)
    data = ["--data-dir", str(tmp_path / "data")]

    first = run("import", str(folder), *data, interrupted=True)
    status = run("status", "--json", *data, interrupted=False)
    again = run("import", str(folder), *data, interrupted=False)

    assert first.returncode == 130, first.stderr
    assert "Traceback" not in first.stderr
    assert "3 file(s) read: 3 stored" in first.stdout
    assert "interrupted: 3 of 6 file(s) done" in first.stderr
    assert '"instances": 3' in status.stdout
    assert again.returncode == 0, again.stderr
    assert "6 file(s) read: 3 stored, 3 already there" in again.stdout
