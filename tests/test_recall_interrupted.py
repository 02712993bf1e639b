"""``appliance recall`` stopped with Ctrl-C: the study in flight is
finished and counted (its files would otherwise stay under objects/ with
no catalog entry naming them, orphans for the scrub), the rest is left,
the exit status is 130, and running the command again recalls the rest."""

from __future__ import annotations

import json
from pathlib import Path

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_NEARLINE, run

# The command line, with a SIGINT arriving while the first study's
# folder is flushed: between the files' writing and the catalog's commit.
INTERRUPTED_IN_THE_FIRST_FLUSH = """
import os, signal, sys
from appliance import cli
from appliance.hsm import recall

original = recall.Recaller._flush_folders
calls = []

def flush(self, staged):
    calls.append(len(staged))
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return original(self, staged)

recall.Recaller._flush_folders = flush
sys.argv = ["appliance", *sys.argv[1:]]
cli.main()
"""


def online_files(appliance: Appliance) -> int:
    return len(list((appliance.data_dir / "online" / "objects").glob("??/*.dcm")))


def test_ctrl_c_finishes_the_study_in_flight(appliance_factory, tmp_path: Path) -> None:
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    for name in ("first", "second"):
        files = study_files(tmp_path / name, name, 2, pixel_bytes=2000)
        assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(appliance.config_path.read_text() + MOVE_TO_NEARLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert online_files(appliance) == 0
    studies = [uid("study", "first"), uid("study", "second")]

    stopped = run(
        appliance.config_path, "recall", *studies, code=INTERRUPTED_IN_THE_FIRST_FLUSH
    )
    tiers = json.loads(run(appliance.config_path, "tiers", "--json").stdout)

    assert stopped.returncode == 130, stopped.stderr
    assert f"{studies[0]}: 2 instance(s) staged online" in stopped.stdout
    assert studies[1] not in stopped.stdout
    assert "interrupted: 1 of 2 study(ies) done" in stopped.stderr
    assert [t["studies"] for t in tiers if t["tier"] == "online"] == [1]
    assert online_files(appliance) == 2

    again = run(appliance.config_path, "recall", *studies)

    assert again.returncode == 0, again.stderr
    assert f"{studies[1]}: 2 instance(s) staged online" in again.stdout
    assert online_files(appliance) == 4


def test_ctrl_c_during_the_last_study_stops_nothing(
    appliance_factory, tmp_path: Path
) -> None:
    """Ctrl-C that comes while the last study is recalled leaves nothing
    undone: the command ends as it would have, and says nothing of
    running it again."""
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    files = study_files(tmp_path / "only", "only", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(appliance.config_path.read_text() + MOVE_TO_NEARLINE)
    assert run(rules, "migrate", "--now").returncode == 0
    study = uid("study", "only")

    stopped = run(
        appliance.config_path, "recall", study, code=INTERRUPTED_IN_THE_FIRST_FLUSH
    )

    assert stopped.returncode == 0, stopped.stderr
    assert f"{study}: 2 instance(s) staged online" in stopped.stdout
    assert "interrupted" not in stopped.stderr
    assert online_files(appliance) == 2
