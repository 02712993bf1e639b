"""Files of another archive on the mirror (copied there by hand, disks
merged), which open because that archive's escrowed keys were imported
too: the restore leaves them aside and rebuilds this archive alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.catalog import replication
from appliance.replication.transports.directory import DirectoryTransport
from tests.restore_site import Origin, appliance, mirror_settings


def other_archive(folder: Path) -> tuple[Path, Path]:
    """Another archive's newest snapshot, numbered past any of the lost
    one's, and that archive's escrow; its mirror is the snapshot's
    grandparent."""
    mirror = folder / "mirror"
    mirror.mkdir(parents=True)
    other = Origin(folder, DirectoryTransport(mirror), mirror_settings(mirror))
    other.store("other", 30, patient_id="OTHER-1", patient_name="Roe^Other")
    other.replicate()
    name = other.replicator.send_snapshot()
    assert replication.last_journal_number(other.catalog) > 30
    escrow = other.escrow()
    other.lose()
    return mirror / name, escrow


def test_a_snapshot_of_another_archive_is_left_aside(
    disaster, site, tmp_path: Path
) -> None:
    restored, mirror = site
    snapshot, escrow = other_archive(tmp_path / "other")
    shutil.copy(snapshot, mirror / "catalog" / snapshot.name)
    both = appliance("keys", "import", str(escrow), config=restored.config_path)
    assert both.returncode == 0, both.stderr

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert snapshot.name not in done.stdout
    assert restored.held() == (disaster[1], disaster[2])


def test_journal_segments_of_another_archive_are_not_replayed(
    disaster, site, tmp_path: Path
) -> None:
    """Their entries bear the numbers of this archive's own: two histories
    that the journal cannot tell apart. The manifests still can."""
    restored, mirror = site
    snapshot, escrow = other_archive(tmp_path / "other")
    segments = sorted((snapshot.parent.parent / "journal").iterdir())
    assert segments
    for segment in segments:
        target = mirror / "journal" / segment.name
        assert not target.exists()
        shutil.copy(segment, target)
    both = appliance("keys", "import", str(escrow), config=restored.config_path)
    assert both.returncode == 0, both.stderr

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert restored.held() == (disaster[1], disaster[2])
