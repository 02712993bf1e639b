"""``appliance recall`` when the online tier refuses a study's files (a
full disk, a file system remounted read only): that study is one line on
standard error, not a traceback; the other studies named are recalled, and
the exit status is 1."""

from __future__ import annotations

import json
from pathlib import Path

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_NEARLINE, run

# The command line, with the online tier refusing the first study's files
# as it would on a read-only file system.
FIRST_STUDY_REFUSED = """
import sys
from appliance import cli
from appliance.errors import StorageError
from appliance.hsm import recall

original = recall.Recaller._flush_folders
calls = []

def flush(self, staged):
    calls.append(len(staged))
    if len(calls) == 1:
        raise StorageError("cannot flush the online tier: Read-only file system")
    return original(self, staged)

recall.Recaller._flush_folders = flush
sys.argv = ["appliance", *sys.argv[1:]]
cli.main()
"""


def test_a_study_the_online_tier_refuses_is_one_line(
    appliance_factory, tmp_path: Path
) -> None:
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    for name in ("first", "second"):
        files = study_files(tmp_path / name, name, 2, pixel_bytes=2000)
        assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(appliance.config_path.read_text() + MOVE_TO_NEARLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    studies = [uid("study", "first"), uid("study", "second")]

    refused = run(appliance.config_path, "recall", *studies, code=FIRST_STUDY_REFUSED)
    tiers = json.loads(run(appliance.config_path, "tiers", "--json").stdout)

    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    assert (
        f"{studies[0]}: not recalled: cannot flush the online tier: "
        "Read-only file system"
    ) in refused.stderr.splitlines()
    assert f"{studies[1]}: 2 instance(s) staged online" in refused.stdout
    assert [t["studies"] for t in tiers if t["tier"] == "online"] == [1]
