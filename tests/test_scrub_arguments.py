"""``appliance scrub run --study``: a study the catalog does not hold (a
typing mistake, a UID from another archive) is said so and exits 1; it is
not reported as a clean scrub of nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid


@pytest.fixture
def appliance(appliance_factory, tmp_path: Path) -> Appliance:
    started = appliance_factory({"migration": {"enabled": False}}).start()
    files = study_files(tmp_path / "study", "scrubbed", 3, pixel_bytes=2000)
    assert set(dicom_client.store_files(started.port, files).values()) == {0}
    return started


def test_an_unknown_study_is_named_and_fails(appliance: Appliance) -> None:
    done = appliance.cli("scrub", "run", "--study", "1.2.3.999", check=False)

    assert done.returncode == 1
    assert "'1.2.3.999': no such study in the catalog" in done.stderr
    assert "copies checked" not in done.stdout


def test_a_known_study_is_scrubbed(appliance: Appliance) -> None:
    done = appliance.cli("scrub", "run", "--study", uid("study", "scrubbed"))

    assert "online: 3 copies checked" in done.stdout
