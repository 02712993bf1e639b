"""A recall whose files the online tier refuses (a full disk, a file system
remounted read only) fails, but the pack it read is not to blame: its
copies still count as verified, so no release relies on a copy wrongly
lost, and the same recall works once the disk has room again."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from appliance.catalog import copies
from appliance.hsm.recall import Recaller
from appliance.storage.packs import PackReader
from tests.read_only import read_only
from tests.test_recall_notes import INSTANCES, STUDY, Archive, archive_in


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    with archive_in(tmp_path) as found:
        yield found


def disk_full(self: PackReader, instance: Any, out: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("threads", [1, 4])
def test_a_full_online_tier_leaves_the_packs_copies_counted(
    archive: Archive, threads: int
) -> None:
    with mock.patch.object(PackReader, "extract", disk_full):
        refused = Recaller(archive.catalog, archive.tiers(), threads).recall(STUDY)

    records = copies.instances_of(archive.catalog, STUDY)
    nearline = [record.copy_on("nearline") for record in records]
    assert not refused.ok and refused.staged == 0
    assert all(copy is not None and copy.verified for copy in nearline)

    again = Recaller(archive.catalog, archive.tiers(), threads).recall(STUDY)

    assert again.ok and again.staged == INSTANCES


@pytest.fixture
def read_only_objects(archive: Archive) -> Iterator[Path]:
    """The online tier's objects folder, read only."""
    with read_only(archive.online.objects) as folder:
        yield folder


def test_a_read_only_online_tier_fails_the_recall_and_blames_no_pack(
    archive: Archive, read_only_objects: Path
) -> None:
    refused = Recaller(archive.catalog, archive.tiers()).recall(STUDY)

    records = copies.instances_of(archive.catalog, STUDY)
    assert not refused.ok and refused.staged == 0
    assert "Read-only file system" in "; ".join(refused.problems)
    assert all(record.copy_on("nearline") is not None for record in records)
