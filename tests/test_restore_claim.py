"""Who holds the online tier while a restore runs: a second restore, or a
service started meanwhile, is told that a restore runs, not that the
service restores in the background or already serves."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from appliance.restore.progress import read as read_progress
from tests.conftest import free_port
from tests.restore_site import Restored, mirror_settings

_COMMAND = (sys.executable, "-m", "appliance")


@pytest.fixture
def paused(site) -> Iterator[Restored]:
    """A restore from the mirror held in its data phase by a paused
    timetable: it holds the online tier until it is stopped."""
    restored, mirror = site
    held = Restored(
        restored.folder,
        mirror_settings(mirror),
        restored.escrow,
        {"restore": {"timetable": "pause"}},
    )
    process = subprocess.Popen(
        [*_COMMAND, "restore", "--from", "mirror", "--config", str(held.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snapshot = read_progress(held.data_dir / "restore")
            if snapshot is not None and snapshot.state == "paused":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the first restore never reached its data phase")
        yield held
    finally:
        process.kill()
        process.wait(timeout=30)


def test_a_second_restore_is_told_that_a_restore_runs(paused: Restored) -> None:
    second = paused.restore()

    assert second.returncode == 1
    assert "appliance restore" in second.stderr
    assert "restores in the background" not in second.stderr


def test_a_service_started_during_a_restore_is_told_that_a_restore_runs(
    paused: Restored,
) -> None:
    started = subprocess.run(
        [
            *_COMMAND,
            "serve",
            "--port",
            str(free_port()),
            "--config",
            str(paused.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert started.returncode == 1
    assert "appliance restore" in started.stderr
    assert "already serving" not in started.stderr
