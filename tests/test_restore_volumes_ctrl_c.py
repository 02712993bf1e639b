"""``appliance restore --from volumes`` stopped with Ctrl-C or SIGTERM, as
``--from mirror`` is: in the catalog phase it puts nothing in place, says
to run it again and exits 1; in the data phase the study in flight is
finished and counted, one line says what is done and one what to do, exit
1. Either way the same command then completes, every instance back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import test_restore_volumes as volumes
from tests.restore_site import interrupted_summary, online_bytes
from tests.signal_on_open import SENT
from tests.test_restore_volumes import Disaster, Site

# The archive on two volumes, and a new appliance to restore it.
disaster = volumes.disaster
site = volumes.site

_REPOSITORY = Path(__file__).resolve().parents[1]

# Each pack of the catalog phase is copied from its volume to this file.
SPOOLED = r"^open .*/restore/work/pack\.spool$"
# A pack file of a directory volume, opened to be read.
ON_A_VOLUME = r"^open .*/volumes/L[12]/packs/[^/]+$"
# Each instance of the data phase is extracted to a temporary name.
EXTRACTED = r"^open .*/online/objects/[0-9a-f]{2}/\.[^/]+\.tmp$"


def restore_signalled(
    site: Site, pattern: str, signals: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.signal_on_open", pattern, signals]
    command += ["restore", "--from", "volumes", "--config", str(site.config_path)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=_REPOSITORY
    )


def assert_one_stop(stopped: subprocess.CompletedProcess[str], signals: str) -> None:
    sent = signals.count("INT") + signals.count("TERM")
    assert stopped.stderr.count(SENT) == sent, stopped.stderr
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "Aborted" not in stopped.stderr and "Traceback" not in stopped.stderr
    assert stopped.stderr.count("run the same command again") == 1, stopped.stderr


def assert_completes(disaster: Disaster, site: Site) -> None:
    """The same command completes; every counted instance is there with
    its bytes, and no file is left that the catalog does not count."""
    again = site.restore()
    assert again.returncode == 0, again.stdout + again.stderr
    assert site.held() == (disaster.held, disaster.found)
    assert len(site.object_files()) == len(disaster.held)
    assert not (site.data_dir / "restore" / "staging").exists()


@pytest.mark.parametrize(
    ("pattern", "signals"),
    [(SPOOLED, "-,INT"), (SPOOLED, "-,TERM"), (ON_A_VOLUME, "-,INT")],
    ids=["ctrl-c", "sigterm", "ctrl-c-while-a-pack-is-read"],
)
def test_stopped_in_the_catalog_phase(
    disaster: Disaster, site: Site, pattern: str, signals: str
) -> None:
    stopped = restore_signalled(site, pattern, signals)

    assert_one_stop(stopped, signals)
    assert stopped.stderr.splitlines()[-1] == (
        "stopped: run the same command again to continue"
    )
    catalog = site.data_dir / "catalog"
    assert not catalog.exists() or not any(catalog.iterdir())
    assert site.object_files() == []

    assert_completes(disaster, site)


@pytest.mark.parametrize("signals", ["INT", "TERM", "INT,INT"])
def test_stopped_in_the_data_phase(
    disaster: Disaster, site: Site, signals: str
) -> None:
    """Signalled as the first study's first instance is extracted: that
    study is finished and counted, nothing else is tried."""
    stopped = restore_signalled(site, EXTRACTED, signals)

    assert_one_stop(stopped, signals)
    said = [line for line in stopped.stderr.splitlines() if SENT not in line]
    restored, waiting = interrupted_summary(said)
    assert "not tried yet:" not in stopped.stderr  # no line per instance
    assert 0 < restored < len(disaster.held)
    assert restored + waiting == len(disaster.held)
    catalog = site.catalog()
    try:
        counted = online_bytes(catalog, site.data_dir / "online")
    finally:
        catalog.close()
    assert len(counted) == restored
    assert all(disaster.held[uid] == data for uid, data in counted.items())
    assert len(site.object_files()) == restored

    assert_completes(disaster, site)
