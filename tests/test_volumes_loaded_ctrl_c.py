"""``appliance volumes loaded`` stopped with Ctrl-C: the studies that waited
for the volume and were not recalled yet still wait for it (its request
stays open and lists them), the study in flight is finished, and saying
the volume is loaded again recalls the rest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_OFFLINE, run

# The command line, with SIGINT arriving (COUNT times: a second Ctrl-C
# stops at once) just as the first waiting study's recall is to start:
# after the volume was found loaded, before anything was recalled.
INTERRUPTED_BEFORE_THE_FIRST_RECALL = """
import os, signal, sys
from appliance import cli
from appliance.hsm import recall

original = recall.Recaller.recall
calls = []

def interrupted(self, study_uid, *args, **kwargs):
    calls.append(study_uid)
    if len(calls) == 1:
        # os.kill runs the handler before it returns: the first SIGINT
        # is handled before the second is sent.
        for _ in range(COUNT):
            os.kill(os.getpid(), signal.SIGINT)
    return original(self, study_uid, *args, **kwargs)

recall.Recaller.recall = interrupted
sys.argv = ["appliance", *sys.argv[1:]]
cli.main()
"""


def online_files(appliance: Appliance) -> int:
    return len(list((appliance.data_dir / "online" / "objects").glob("??/*.dcm")))


@pytest.fixture
def waiting(appliance_factory, tmp_path: Path) -> Appliance:
    """An appliance whose two studies are only on volume L00001, which is on
    the shelf and asked for by both studies' recalls."""
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    appliance.cli("volumes", "label", "L00001", "--capacity", "1G")
    for name in ("first", "second"):
        files = study_files(tmp_path / name, name, 2, pixel_bytes=2000)
        assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(appliance.config_path.read_text() + MOVE_TO_OFFLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert online_files(appliance) == 0

    volume = appliance.data_dir / "volumes" / "L00001"
    shutil.move(volume, tmp_path / "L00001")
    studies = [uid("study", "first"), uid("study", "second")]
    asked = run(appliance.config_path, "recall", *studies)
    assert asked.returncode == 1, asked.stdout + asked.stderr
    requested = run(appliance.config_path, "volumes", "requests").stdout
    assert "load volume L00001" in requested and "2 studies waiting" in requested
    shutil.move(tmp_path / "L00001", volume)
    return appliance


@pytest.mark.parametrize(
    ("signals", "recalled", "left"),
    [(1, 1, "1 study waiting"), (2, 0, "2 studies waiting")],
    ids=["one-ctrl-c", "two-ctrl-c"],
)
def test_ctrl_c_leaves_the_rest_waiting_for_the_volume(
    waiting: Appliance, signals: int, recalled: int, left: str
) -> None:
    appliance = waiting
    config = appliance.config_path
    code = INTERRUPTED_BEFORE_THE_FIRST_RECALL.replace("COUNT", str(signals))

    stopped = run(config, "volumes", "loaded", "L00001", code=code)
    requested = run(config, "volumes", "requests").stdout

    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert f"interrupted: {recalled} of 2 study(ies) done" in stopped.stderr
    assert "load volume L00001" in requested and left in requested
    assert online_files(appliance) == 2 * recalled

    again = run(config, "volumes", "loaded", "L00001")

    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{2 - recalled} waiting study(ies) recalled" in again.stdout
    assert "no open requests" in run(config, "volumes", "requests").stdout
    assert online_files(appliance) == 4


def test_recalls_that_fail_are_not_reported_as_recalled(waiting: Appliance) -> None:
    """The volume is there but its packs are gone: the command fails, and
    its last line says how many of the waiting studies were recalled."""
    appliance = waiting
    packs = appliance.data_dir / "volumes" / "L00001" / "packs"
    for pack in packs.iterdir():
        pack.unlink()

    loaded = run(appliance.config_path, "volumes", "loaded", "L00001")

    assert loaded.returncode == 1, loaded.stdout + loaded.stderr
    assert "Traceback" not in loaded.stderr
    assert "loaded; 2 waiting study(ies) recalled" not in loaded.stdout
    assert "loaded; 0 of 2 waiting study(ies) recalled" in loaded.stdout
    assert online_files(appliance) == 0


# Ctrl-C at a terminal reaches the whole foreground process group: here it
# is sent so, just after the first recall has started a tool (xorriso)
# to read the volume.
CTRL_C_AT_THE_TERMINAL_DURING_A_READ = """
import os, signal, subprocess, sys
from appliance import cli
from appliance.hsm import recall
from appliance.storage.volumes import commands

original_recall = recall.Recaller.recall
original_popen = commands.subprocess.Popen
recalls = []
sent = []

def recalled(self, *args, **kwargs):
    recalls.append(1)
    return original_recall(self, *args, **kwargs)

def started(*args, **kwargs):
    process = original_popen(*args, **kwargs)
    if recalls and not sent:
        sent.append(1)
        os.killpg(os.getpgid(0), signal.SIGINT)
    return process

recall.Recaller.recall = recalled
commands.subprocess.Popen = started
sys.argv = ["appliance", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.skipif(
    shutil.which("xorriso") is None,
    reason="xorriso is not installed (apt-get install xorriso)",
)
def test_ctrl_c_at_the_terminal_does_not_fail_the_read_in_flight(
    appliance_factory, tmp_path: Path
) -> None:
    """The tool reading the volume is not the terminal's to stop: the study
    in flight is recalled, and the copies on the volume still count."""
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "volumes": {"kind": "optical"},
    }
    appliance: Appliance = appliance_factory(settings).start()
    config = appliance.config_path
    appliance.cli("volumes", "label", "DISC01", "--capacity", "100M")
    for name in ("first", "second"):
        files = study_files(tmp_path / name, f"disc-{name}", 2, pixel_bytes=2000)
        assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(config.read_text() + MOVE_TO_OFFLINE)
    assert run(rules, "migrate", "--now").returncode == 0
    image = appliance.data_dir / "volumes" / "DISC01.iso"
    shutil.move(image, tmp_path / "DISC01.iso")
    studies = [uid("study", "disc-first"), uid("study", "disc-second")]
    assert run(config, "recall", *studies).returncode == 1
    shutil.move(tmp_path / "DISC01.iso", image)

    command = [sys.executable, "-c", CTRL_C_AT_THE_TERMINAL_DURING_A_READ]
    command += ["volumes", "loaded", "DISC01", "--config", str(config)]
    # A process group of its own, as a shell gives a command it runs.
    stopped = subprocess.run(
        command, capture_output=True, text=True, timeout=300, start_new_session=True
    )

    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "interrupted: 1 of 2 study(ies) done" in stopped.stderr
    assert "damaged" not in stopped.stderr
    assert online_files(appliance) == 2
    again = run(config, "volumes", "loaded", "DISC01")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 waiting study(ies) recalled" in again.stdout
    assert online_files(appliance) == 4
