"""A C-GET of a study that is not online, when its recall fails on the
online tier (its recall folder read only, or full): the requester gets a
final status saying so, not an aborted association, and the service
serves the next request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import dicom_client
from tests.conftest import Appliance
from tests.datasets import study_files, uid
from tests.read_only import need_root, read_only
from tests.tier_rules import MOVE_TO_NEARLINE, run


@pytest.fixture
def archive(appliance_factory, tmp_path: Path) -> Iterator[Appliance]:
    """A running appliance with one study moved to nearline."""
    need_root()
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance: Appliance = appliance_factory(settings).start()
    files = study_files(tmp_path / "study", "refused", 2, pixel_bytes=2000)
    assert set(dicom_client.store_files(appliance.port, files).values()) == {0}
    rules = appliance.directory / "rules.toml"
    rules.write_text(appliance.config_path.read_text() + MOVE_TO_NEARLINE)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    notes = appliance.data_dir / "online" / "recalls"
    notes.mkdir(exist_ok=True)
    with read_only(notes):
        yield appliance


def test_a_recall_refused_online_is_answered(archive: Appliance) -> None:
    identifier = dicom_client.study_identifier(StudyInstanceUID=uid("study", "refused"))
    storage = dicom_client.all_storage_contexts()

    received, responses = dicom_client.get(archive.port, identifier, storage)

    assert received == {}
    assert [r.Status for r in responses] == [0xA702]
    assert responses[-1].ErrorComment == "recall failed; the archive's log says why"
    assert dicom_client.echo(archive.port) == 0
