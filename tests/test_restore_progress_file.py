"""The restore's progress file keeps up with the numbers: the last ones
before a long step (a big pack fetched at a low rate) reach the file
within a few seconds, not only when the next study is done."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.cli_restore import bar_label
from appliance.restore.progress import Snapshot, Tracker, read


def test_numbers_held_back_by_the_write_interval_reach_the_file(
    tmp_path: Path,
) -> None:
    tracker = Tracker(tmp_path, "service")
    tracker.planned(studies=3, size=300, expected=0, left=0)
    # At once after the planned numbers were written: held back.
    tracker.advanced(100, "study 2 of 3: fetching its packs")

    deadline = time.monotonic() + 30
    written = read(tmp_path)
    while written is not None and written.bytes_done != 100:
        assert time.monotonic() < deadline, "the numbers never reached the file"
        time.sleep(0.1)
        written = read(tmp_path)

    assert written is not None
    assert written.doing == "study 2 of 3: fetching its packs"


def test_the_bar_says_stopped_and_what_next_once_stopped() -> None:
    snapshot = Snapshot()
    snapshot.state, snapshot.doing = "restoring", "pack p-000000007"
    assert bar_label(snapshot) == "restoring pack p-000000007"

    snapshot.state, snapshot.doing = "stopped", "run the restore again to continue"
    assert bar_label(snapshot) == "stopped: run the restore again to continue"
