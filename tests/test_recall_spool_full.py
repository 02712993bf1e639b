"""A recall from an offline volume copies the pack into the spool (under
the data directory) first. When that disk is full, the recall of that study
fails with one line, the pack is not counted as damaged (its copies still
count), and the same recall works once there is room again."""

from __future__ import annotations

from pathlib import Path

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.tier_rules import MOVE_TO_OFFLINE, run

# The command line, with the spool's disk full: every write to a file
# opened in the offline tier's module fails as on a full disk.
SPOOL_FULL = """
import builtins, errno, sys
from appliance import cli
from appliance.storage import offline

class Full:
    def __init__(self, *args, **kwargs):
        self.file = builtins.open(*args, **kwargs)
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()

offline.open = Full
sys.argv = ["appliance", *sys.argv[1:]]
cli.main()
"""


def test_a_full_spool_fails_the_recall_and_blames_no_pack(
    appliance_factory, tmp_path: Path
) -> None:
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    config = appliance.config_path
    labelled = appliance.cli("volumes", "label", "L00001", "--capacity", "64M")
    assert labelled.returncode == 0, labelled.stderr
    files = study_files(tmp_path / "study", "spool-full", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(config.read_text() + MOVE_TO_OFFLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    study = uid("study", "spool-full")

    refused = run(config, "recall", study, code=SPOOL_FULL)
    again = run(config, "recall", study)

    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert "damaged" not in refused.stderr
    said = [line for line in refused.stderr.splitlines() if "not recalled" in line]
    assert len(said) == 1 and "no space left on the device" in said[0]
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{study}: 2 instance(s) staged online" in again.stdout
