"""``appliance recall`` stopped at once, by a second Ctrl-C or by SIGTERM,
while a study's files are being written: one line and exit 130 (143 for
SIGTERM), no "Aborted!", the study's files written so far removed before
the command ends (nothing left for the next recall to clean up), and
running the command again recalls everything."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.storage.online import OnlineTier
from tests.conftest import config_text
from tests.datasets import study_files, uid
from tests.signal_on_open import SENT
from tests.tier_rules import MOVE_TO_NEARLINE, run

_REPOSITORY = Path(__file__).resolve().parents[1]

# Each instance a recall extracts is written to a temporary name beside
# its online file first.
EXTRACTED = r"^open .*/online/objects/[0-9a-f]{2}/\.[^/]+\.tmp$"
# The same, and an online file removed (a stopped recall's clean-up).
EXTRACTED_OR_REMOVED = (
    r"^(open .*/online/objects/[0-9a-f]{2}/\.[^/]+\.tmp"
    r"|remove .*/online/objects/[0-9a-f]{2}/[0-9a-f]+\.dcm)$"
)


def run_signalled(
    config: Path, signals: str, *args: str, pattern: str = EXTRACTED
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.signal_on_open", pattern, signals]
    command += [*args, "--config", str(config)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=_REPOSITORY
    )


@dataclass
class Archive:
    """An archive's data directory and its configuration."""

    data_dir: Path
    config_path: Path

    @classmethod
    def at(cls, folder: Path) -> Archive:
        settings: dict[str, dict[str, object]] = {
            "storage": {"data_dir": str(folder / "data"), "reserved_bytes": 0},
            "migration": {"enabled": False, "min_copies": 1},
            "web": {"enabled": False},
        }
        config_path = folder / "appliance.toml"
        config_path.write_text(config_text(settings, []))
        return cls(folder / "data", config_path)


def online_leftovers(archive: Archive) -> list[Path]:
    """Every file in the online tier's objects and recall notes."""
    online = archive.data_dir / "online"
    found = [p for p in (online / "objects").rglob("*") if p.is_file()]
    return found + list((online / "recalls").glob("*"))


def check_online(archive: Archive) -> set[Path]:
    """The files the catalog's online copies name, each checked present
    with the catalog's SHA-256; every instance keeps its nearline copy."""
    catalog = Catalog(archive.data_dir / "catalog", 2**26)
    online = OnlineTier(archive.data_dir / "online")
    named = set()
    try:
        for study in (uid("study", "first"), uid("study", "second")):
            for record in copies.instances_of(catalog, study):
                assert record.copy_on("nearline") is not None
                copy = record.copy_on("online")
                if copy is None:
                    continue
                path = online.path_of(copy.location)
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                assert digest == record.sha256
                named.add(path)
    finally:
        catalog.close()
    return named


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """Two studies of three instances, moved to nearline (none online);
    each test works on a copy."""
    folder = tmp_path_factory.mktemp("recall-stopped")
    archive = Archive.at(folder)
    for name in ("first", "second"):
        study_files(folder / "files" / name, name, 3, pixel_bytes=2000)
    imported = run(archive.config_path, "import", str(folder / "files"))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    rules = folder / "rules.toml"
    rules.write_text(archive.config_path.read_text() + MOVE_TO_NEARLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert not [p for p in online_leftovers(archive) if p.suffix == ".dcm"]
    return archive


@pytest.fixture
def on_nearline(prepared: Archive, tmp_path: Path) -> Archive:
    shutil.copytree(prepared.data_dir, tmp_path / "data")
    return Archive.at(tmp_path)


@pytest.mark.parametrize(
    ("signals", "status"),
    [
        ("-,INT,INT", 130),
        ("-,TERM", 143),
        ("-,INT,TERM", 130),
        # The third Ctrl-C comes as the clean-up removes the first file.
        ("-,INT,INT,INT", 130),
    ],
    ids=["two-ctrl-c", "sigterm", "ctrl-c-then-sigterm", "third-in-clean-up"],
)
def test_stopped_at_once_leaves_no_file_and_the_next_run_completes(
    on_nearline: Archive, signals: str, status: int
) -> None:
    archive = on_nearline
    config = archive.config_path
    studies = [uid("study", "first"), uid("study", "second")]

    stopped = run_signalled(
        config, signals, "recall", *studies, pattern=EXTRACTED_OR_REMOVED
    )

    sent = signals.count("INT") + signals.count("TERM")
    assert stopped.stderr.count(SENT) == sent, stopped.stderr
    assert stopped.returncode == status, stopped.stdout + stopped.stderr
    assert "Aborted" not in stopped.stderr and "Traceback" not in stopped.stderr
    # One line, the last (the progress bar's last frame may come before).
    assert stopped.stderr.count("interrupted") == 1, stopped.stderr
    assert stopped.stderr.splitlines()[-1] == (
        "interrupted: 0 of 2 study(ies) done; run the same command again for the rest"
    )
    assert "staged online" not in stopped.stdout
    # The first study's first instance was written before the stop: gone.
    assert online_leftovers(archive) == []
    assert check_online(archive) == set()

    again = run(config, "recall", *studies)

    assert again.returncode == 0, again.stdout + again.stderr
    for study in studies:
        assert f"{study}: 3 instance(s) staged online" in again.stdout
    named = check_online(archive)
    assert len(named) == 6
    assert set(online_leftovers(archive)) == named


def test_one_ctrl_c_lets_the_study_in_flight_finish(on_nearline: Archive) -> None:
    """The first Ctrl-C, at the same point, stops nothing in flight."""
    archive = on_nearline
    studies = [uid("study", "first"), uid("study", "second")]

    stopped = run_signalled(archive.config_path, "-,INT", "recall", *studies)

    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert f"{studies[0]}: 3 instance(s) staged online" in stopped.stdout
    assert "interrupted: 1 of 2 study(ies) done" in stopped.stderr
    named = check_online(archive)
    assert len(named) == 3
    assert set(online_leftovers(archive)) == named


# An instance extracted, or a recall's note removed once its copies are
# counted.
EXTRACTED_OR_COUNTED = (
    r"^(open .*/online/objects/[0-9a-f]{2}/\.[^/]+\.tmp"
    r"|remove .*/online/recalls/[^/]+\.note)$"
)


def test_a_second_ctrl_c_once_the_copies_are_counted_stops_after_them(
    on_nearline: Archive,
) -> None:
    """The second Ctrl-C comes as the first study's copies have just been
    counted: the rest of that recall (its volume requests, its audit
    record) is not cut off; it is reported done, and the command stops."""
    archive = on_nearline
    studies = [uid("study", "first"), uid("study", "second")]

    stopped = run_signalled(
        archive.config_path,
        "-,INT,-,INT",
        "recall",
        *studies,
        pattern=EXTRACTED_OR_COUNTED,
    )

    assert stopped.stderr.count(SENT) == 2, stopped.stderr
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert f"{studies[0]}: 3 instance(s) staged online" in stopped.stdout
    assert stopped.stderr.splitlines()[-1] == (
        "interrupted: 1 of 2 study(ies) done; run the same command again for the rest"
    )
    named = check_online(archive)
    assert len(named) == 3
    assert set(online_leftovers(archive)) == named
    trail = run(
        archive.config_path, "audit", "show", "--event", "study-recalled", "--json"
    )
    assert trail.stdout.count(studies[0]) >= 1, trail.stdout + trail.stderr
    assert len(trail.stdout.splitlines()) == 1
