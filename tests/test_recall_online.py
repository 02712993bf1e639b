"""``appliance recall`` of a study whose every instance is online already
says so, instead of '0 instance(s) staged online', which reads as if the
recall had found nothing to bring."""

from __future__ import annotations

from pathlib import Path

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid


def test_a_study_online_already_is_said_to_be(
    appliance_factory, tmp_path: Path
) -> None:
    appliance: Appliance = appliance_factory({"migration": {"enabled": False}})
    appliance.start()
    files = study_files(tmp_path / "study", "online", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}

    done = appliance.cli("recall", uid("study", "online"))

    assert f"{uid('study', 'online')}: already online, nothing to recall" in done.stdout
