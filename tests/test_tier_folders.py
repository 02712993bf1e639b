"""Tier folders on disks of their own (``storage.online_path``,
``storage.nearline_path``, ``storage.catalog_path``), as on archive
hardware: a named folder that is missing is never made, and the empty
mount point of a disk that is not mounted is refused wherever the catalog
says that disk holds copies, by the service and by hand-run commands,
without anything made in it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import config_text, free_port
from tests.datasets import study_files
from tests.tier_rules import MOVE_TO_NEARLINE, run

# Every study copied to the nearline tier and kept online too: a copy on
# each of the two disks.
COPY_TO_NEARLINE = '\n[[rules]]\nname = "copy"\naction = "copy"\nto = "nearline"\n'


def configuration(folder: Path, **storage: str) -> Path:
    settings: dict[str, dict[str, object]] = {
        "node": {"port": free_port()},
        "web": {"enabled": False},
        "hl7": {"enabled": False},
        "migration": {"min_copies": 1},
        "storage": {"data_dir": str(folder / "data"), **storage},
    }
    path = folder / "appliance.toml"
    path.write_text(config_text(settings, []))
    return path


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, Path]:
    """A tier on a disk of its own each, mounted (folders made) and named."""
    mounted = {name: tmp_path / "disks" / name for name in ("online", "nearline")}
    for folder in mounted.values():
        folder.mkdir(parents=True)
    return mounted


@pytest.fixture
def archive(tmp_path: Path, disks: dict[str, Path]) -> Path:
    """The configuration of an archive with two instances stored online."""
    config = configuration(
        tmp_path,
        online_path=str(disks["online"]),
        nearline_path=str(disks["nearline"]),
    )
    files = study_files(tmp_path / "study", "mounted", 2, pixel_bytes=2000)
    imported = run(config, "import", *map(str, files))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    return config


def migrate(config: Path, rule: str) -> None:
    """Run one migration now with ``rule`` added to the configuration."""
    rules = config.with_name("rules.toml")
    rules.write_text(config.read_text() + rule)
    moved = run(rules, "migrate", "--now")
    assert moved.returncode == 0, moved.stdout + moved.stderr


def unmount(folder: Path) -> Path:
    """Take the disk away from ``folder``: its files go elsewhere, and an
    empty folder stays behind, as a mount point does."""
    away = folder.with_name(folder.name + "-unmounted")
    folder.rename(away)
    folder.mkdir()
    return away


@pytest.mark.parametrize("key", ["online_path", "nearline_path", "catalog_path"])
def test_a_named_folder_that_is_missing_is_not_made(tmp_path: Path, key: str) -> None:
    missing = tmp_path / "disks" / key
    config = configuration(tmp_path, **{key: str(missing)})

    started = run(config, "serve")

    assert started.returncode == 1
    assert f"storage.{key}: {missing} does not exist" in started.stderr
    assert "Traceback" not in started.stderr
    assert not missing.exists()


def test_an_unmounted_online_disk_is_not_taken_for_an_empty_tier(
    archive: Path, disks: dict[str, Path]
) -> None:
    unmount(disks["online"])

    started = run(archive, "serve")
    listed = run(archive, "tiers")
    imported = run(archive, "import", str(archive))

    for refused in (started, listed, imported):
        assert refused.returncode == 1
        assert "is the online tier's disk mounted there?" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert list(disks["online"].iterdir()) == []


def test_an_unmounted_nearline_disk_is_refused_until_its_disk_is_back(
    archive: Path, disks: dict[str, Path]
) -> None:
    migrate(archive, MOVE_TO_NEARLINE)
    away = unmount(disks["nearline"])

    started = run(archive, "serve")
    listed = run(archive, "tiers")

    for refused in (started, listed):
        assert refused.returncode == 1
        assert "is the nearline tier's disk mounted there?" in refused.stderr
    assert list(disks["nearline"].iterdir()) == []

    disks["nearline"].rmdir()
    away.rename(disks["nearline"])
    assert run(archive, "tiers").returncode == 0


def test_a_replaced_nearline_disk_is_taken_once_its_packs_folder_is_made(
    archive: Path, disks: dict[str, Path]
) -> None:
    migrate(archive, MOVE_TO_NEARLINE)
    unmount(disks["nearline"])
    refused = run(archive, "tiers")
    packs = disks["nearline"] / "packs"
    advice = f"make {packs} to take the new one, then run appliance scrub run"
    assert f"{advice} --tier nearline" in refused.stderr

    (disks["nearline"] / "packs").mkdir()

    listed = run(archive, "tiers")
    assert listed.returncode == 0, listed.stderr


def test_an_unmounted_catalog_disk_is_no_new_archive(
    tmp_path: Path, archive: Path
) -> None:
    catalog = tmp_path / "data" / "catalog"
    unmount(catalog)

    started = run(archive, "serve")
    imported = run(archive, "import", str(archive))

    for refused in (started, imported):
        assert refused.returncode == 1
        assert f"no catalog at {catalog}, but the online tier" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert list(catalog.iterdir()) == []


@pytest.mark.parametrize("tier", ["online", "nearline"])
def test_a_scrub_refuses_an_unmounted_disk_rather_than_find_its_copies_lost(
    archive: Path, disks: dict[str, Path], tier: str
) -> None:
    migrate(archive, COPY_TO_NEARLINE)
    unmount(disks[tier])

    scrubbed = run(archive, "scrub", "run", "--tier", tier)
    adopted = run(archive, "scrub", "adopt", "--tier", tier, "objects/00/0.dcm")

    for refused in (scrubbed, adopted):
        assert refused.returncode == 1
        assert f"is the {tier} tier's disk mounted there?" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert list(disks[tier].iterdir()) == []
    assert "0 instance(s) with no good copy" in run(archive, "scrub", "status").stdout


def test_an_unmounted_catalog_disk_is_no_new_archive_beside_packs(
    tmp_path: Path, archive: Path, disks: dict[str, Path]
) -> None:
    migrate(archive, MOVE_TO_NEARLINE)
    catalog = tmp_path / "data" / "catalog"
    unmount(catalog)
    files = study_files(tmp_path / "later", "later", 1, pixel_bytes=2000)

    # The import first: a service that is not refused would run on.
    for command in (("import", *map(str, files)), ("serve",)):
        refused = run(archive, *command)
        assert refused.returncode == 1
        assert f"{disks['nearline']} holds packs" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert list(catalog.iterdir()) == []


def test_an_unmounted_online_disk_is_refused_when_every_study_is_in_packs(
    tmp_path: Path, archive: Path, disks: dict[str, Path]
) -> None:
    migrate(archive, MOVE_TO_NEARLINE)
    unmount(disks["online"])
    files = study_files(tmp_path / "later", "later", 1, pixel_bytes=2000)

    # The import first: a service that is not refused would run on.
    for command in (("import", *map(str, files)), ("tiers",), ("serve",)):
        refused = run(archive, *command)
        assert refused.returncode == 1
        assert "2 instances (none online now)" in refused.stderr
        assert "is the online tier's disk mounted there?" in refused.stderr
    assert list(disks["online"].iterdir()) == []


def test_a_mirror_check_refuses_an_unmounted_online_disk(
    archive: Path, disks: dict[str, Path]
) -> None:
    unmount(disks["online"])

    verified = run(archive, "replication", "verify")

    assert verified.returncode == 1
    assert "is the online tier's disk mounted there?" in verified.stderr
    assert "Traceback" not in verified.stderr
    assert list(disks["online"].iterdir()) == []


@pytest.mark.parametrize("source", ["volumes", "mirror"])
def test_a_restore_refuses_an_unmounted_online_disk(
    archive: Path, disks: dict[str, Path], source: str
) -> None:
    # A copy on each tier; the pack made the master keys a restore reads.
    migrate(archive, COPY_TO_NEARLINE)
    unmount(disks["online"])

    restored = run(archive, "restore", "--from", source)

    assert restored.returncode == 1
    assert "is the online tier's disk mounted there?" in restored.stderr
    assert "Traceback" not in restored.stderr
    assert list(disks["online"].iterdir()) == []


def test_an_unreadable_folder_of_the_online_layout_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import config as settings
    from appliance.errors import StorageError
    from appliance.hsm import tier_folders

    folder = tmp_path / "data" / "online" / "objects" / "ab"
    folder.mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: str | Path) -> Iterator[os.DirEntry[str]]:
        # Root reads any folder: the permission is refused here instead.
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(tier_folders.os, "scandir", scandir)
    config = settings.load(configuration(tmp_path))

    with pytest.raises(StorageError, match=f"cannot read {folder}: Permission"):
        tier_folders.vet_tier_folders(config)
