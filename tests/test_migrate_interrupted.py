"""``appliance migrate --now`` stopped with Ctrl-C (once or twice) or
SIGTERM while a study is packed: the step in flight is finished (its pack
written, read back and counted, the online copies released), the rest is
left, one line says how far it got, exit 130 (143 for SIGTERM); running
it again carries out the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from tests.datasets import study_files, uid
from tests.signal_on_open import SENT
from tests.test_recall_stopped_at_once import MOVE_TO_NEARLINE, Archive, run

_REPOSITORY = Path(__file__).resolve().parents[1]

# A pack is written to a hidden partial name on nearline, then renamed.
PACKED = r"^open .*/nearline/packs/.*\.partial$"


def where(archive: Archive) -> dict[str, set[str]]:
    """Study -> the tiers every one of its instances has a copy on."""
    catalog = Catalog(archive.data_dir / "catalog", 2**26)
    try:
        found = {}
        for name in ("first", "second"):
            records = copies.instances_of(catalog, uid("study", name))
            tiers = [{c.tier for c in r.copies} for r in records]
            found[name] = set.intersection(*tiers)
    finally:
        catalog.close()
    return found


@pytest.mark.parametrize(
    ("signals", "status"),
    [("INT", 130), ("INT,INT", 130), ("TERM", 143)],
    ids=["ctrl-c", "two-ctrl-c", "sigterm"],
)
def test_stopped_after_the_step_in_flight(
    tmp_path: Path, signals: str, status: int
) -> None:
    archive = Archive.at(tmp_path)
    for name in ("first", "second"):
        study_files(tmp_path / "files" / name, name, 2, pixel_bytes=2000)
    imported = run(archive.config_path, "import", str(tmp_path / "files"))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    rules = tmp_path / "rules.toml"
    rules.write_text(archive.config_path.read_text() + MOVE_TO_NEARLINE)
    command = [sys.executable, "-m", "tests.signal_on_open", PACKED, signals]
    command += ["migrate", "--now", "--config", str(rules)]

    stopped = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=_REPOSITORY
    )

    assert stopped.stderr.count(SENT) == len(signals.split(",")), stopped.stderr
    assert stopped.returncode == status, stopped.stdout + stopped.stderr
    assert "Aborted" not in stopped.stderr and "Traceback" not in stopped.stderr
    assert stopped.stderr.splitlines()[-1] == (
        "interrupted: 1 of 2 step(s) done; run the same command again for the rest"
    )
    tiers = sorted(sorted(each) for each in where(archive).values())
    assert tiers == [["nearline"], ["online"]]
    packs = archive.data_dir / "nearline" / "packs"
    assert not list(packs.glob("*/.*.partial"))
    assert len(list(packs.glob("*/*.pack"))) == 1

    again = run(rules, "migrate", "--now")

    assert again.returncode == 0, again.stdout + again.stderr
    assert where(archive) == {"first": {"nearline"}, "second": {"nearline"}}
    assert len(list(packs.glob("*/*.pack"))) == 2
