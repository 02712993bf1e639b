"""The catalog phase of a restore killed (SIGKILL, no cleanup) at chosen
points, then run again: the second run completes, and the catalog answers
as the lost appliance's did, every instance once. Also what earlier runs
or the mirror may leave behind: a work folder or a rebuilt catalog cut
short, a catalog snapshot that does not open."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.catalog.store import Catalog
from appliance.restore import swap
from appliance.restore.rebuild import partial_path
from appliance.storage import sealed
from appliance.storage.keys import KeyStore, key_store_path
from tests import test_restore_volumes as volume_tests
from tests.restore_site import Restored, appliance
from tests.test_restore_volumes import Disaster, Site, _write_config

# LMDB's page, the system's: the first two of its file are its meta pages.
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Runs ``appliance ARGS...`` with TARGET patched to kill the process with
# SIGKILL (no ``finally``, no flush) just before or just after its Nth
# call. "cut" truncates the file it is given half way first, as a copy
# killed while it writes leaves it.
_KILLER = """
import os, pkgutil, signal, sys
from pathlib import Path
from unittest import mock

target, when, nth, *args = sys.argv[1:]
real = pkgutil.resolve_name(target)
calls = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def patched(*a, **k):
    global calls
    calls += 1
    if calls == int(nth) and when == "cut":
        data = Path(a[0]) / "data.mdb"
        os.truncate(data, data.stat().st_size // 2)
        die()
    if calls == int(nth) and when == "before":
        die()
    result = real(*a, **k)
    if calls == int(nth) and when == "after":
        die()
    return result

with mock.patch(target, patched):
    sys.argv = ["appliance", *args]
    from appliance.cli import main
    main()
"""


def _killed(
    config: Path,
    target: str,
    when: str,
    nth: int = 1,
    *options: str,
    source: str = "mirror",
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _KILLER, target, when, str(nth)]
    command += ["restore", "--from", source, *options, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _assert_whole(restored: Restored, disaster, *options: str) -> None:
    """Run again: it completes with the lost appliance's answers, and each
    instance restored once."""
    done = restored.restore(*options)
    assert done.returncode == 0, done.stdout + done.stderr
    assert restored.held() == (disaster[1], disaster[2])
    assert len(restored.object_files()) == len(disaster[1])
    catalog_path = restored.config.catalog_path
    assert not swap.rebuilt_path(catalog_path).exists()
    assert not partial_path(swap.rebuilt_path(catalog_path)).exists()
    assert not (restored.data_dir / "restore" / "work").exists()


@pytest.mark.parametrize(
    ("target", "when"),
    [
        # The work catalog written (not flushed), nothing rebuilt yet.
        ("appliance.restore.sources.Sources.build", "after"),
        # The copy of the work catalog killed half way through.
        ("appliance.restore.adopt.Catalog", "cut"),
        # Inside the rewrite's transaction, studies not written yet.
        ("appliance.restore.adopt._Pass.studies", "before"),
        # While the check runs, as the flush begins.
        ("appliance.restore.rebuild._flush", "before"),
        # Checked and flushed, not marked yet; then marked, not renamed
        # catalog.rebuilt yet (made again all the same).
        ("appliance.restore.rebuild.mark_checked", "before"),
        ("appliance.restore.rebuild.mark_checked", "after"),
        # Renamed catalog.rebuilt, not moved into place.
        ("appliance.restore.rebuild.put_in_place", "before"),
        # In place, the work folder not removed yet.
        ("appliance.restore.rebuild.swap.move_into_place", "after"),
    ],
)
def test_a_kill_in_the_catalog_phase(disaster, site, target: str, when: str) -> None:
    restored, _mirror = site

    killed = _killed(restored.config_path, target, when)

    assert killed.returncode == -9, killed.stderr
    _assert_whole(restored, disaster)


def test_a_kill_between_the_renames(disaster, site) -> None:
    """An empty catalog in place is set aside, then the kill comes before
    the rebuilt one takes its name (renames: the checked catalog to
    catalog.rebuilt, the empty one aside, catalog.rebuilt into place)."""
    restored, _mirror = site
    catalog_path = restored.config.catalog_path
    Catalog(catalog_path, 2**26).close()

    killed = _killed(restored.config_path, "pathlib.Path.rename", "after", 2)

    assert killed.returncode == -9, killed.stderr
    assert not catalog_path.exists()
    assert swap.note_of(swap.rebuilt_path(catalog_path)) is not None
    _assert_whole(restored, disaster)
    assert list(catalog_path.parent.glob("catalog.before-restore-*"))


@pytest.mark.parametrize(
    ("target", "when", "nth"),
    [
        # The second pack's manifest merged.
        ("appliance.restore.sources.merge_pack_file", "after", 2),
        ("appliance.restore.adopt.Catalog", "cut", 1),
    ],
)
def test_a_kill_in_a_scan(disaster, site, target: str, when: str, nth: int) -> None:
    restored, _mirror = site

    killed = _killed(restored.config_path, target, when, nth, "--scan")

    assert killed.returncode == -9, killed.stderr
    _assert_whole(restored, disaster, "--scan")


def test_a_rebuilt_catalog_cut_short_by_a_power_cut_is_made_again(
    disaster, site
) -> None:
    """Checked but not marked, and its pages, written without flushing,
    lost to a power cut (zeros but for the meta pages): it is never opened,
    made again from the start; catalog.rebuilt holds a whole catalog only."""
    restored, _mirror = site
    rebuilt = swap.rebuilt_path(restored.config.catalog_path)

    killed = _killed(restored.config_path, "appliance.restore.rebuild.check", "after")

    assert killed.returncode == -9
    assert not rebuilt.exists()
    data = partial_path(rebuilt) / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as lost:
        lost.seek(2 * _PAGE)
        lost.write(bytes(size - 2 * _PAGE))
    _assert_whole(restored, disaster)
    assert not partial_path(rebuilt).exists()


@pytest.mark.parametrize("damage", ["cut short", "another key", "not a catalog"])
def test_a_snapshot_that_does_not_open_falls_back_to_the_journal(
    disaster, site, tmp_path: Path, damage: str
) -> None:
    restored, mirror = site
    (snapshot,) = mirror.glob("catalog/snapshot-*")
    name = f"catalog/{snapshot.name}"
    if damage == "cut short":
        os.truncate(snapshot, snapshot.stat().st_size // 2)
    else:
        keys = KeyStore.load(key_store_path(restored.data_dir))
        plain = io.BytesIO()
        with open(snapshot, "rb") as source:
            sealed.open_sealed(source, name, keys, plain)
        if damage == "another key":
            keys = KeyStore.create_if_missing(tmp_path / "other.keys")
        else:
            plain = io.BytesIO(b"PACS" * (len(plain.getvalue()) // 4))
        plain.seek(0)
        with open(snapshot, "wb") as out:
            sealed.seal(plain, out, name, keys)

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert f"snapshot {name} does not open" in done.stderr
    assert "no snapshot opened" in done.stdout
    assert restored.held() == (disaster[1], disaster[2])


# The lost appliance of the volume tests, under a name of its own here.
volumes_disaster = volume_tests.disaster


@pytest.fixture
def volumes_site(volumes_disaster: Disaster, tmp_path: Path) -> Site:
    """A new appliance with the lost one's volume library (a copy)."""
    data_dir = tmp_path / "restored"
    origin = volumes_disaster.folder / "origin" / "volumes"
    shutil.copytree(origin, data_dir / "volumes")
    config_path = _write_config(tmp_path / "restored.toml", data_dir)
    escrow = str(volumes_disaster.folder / "escrow.txt")
    done = appliance("keys", "import", escrow, config=config_path)
    assert done.returncode == 0, done.stderr
    return Site(data_dir, config_path)


def _assert_volumes_whole(site: Site, disaster: Disaster) -> None:
    done = site.restore()
    assert done.returncode == 0, done.stdout + done.stderr
    assert site.held() == (disaster.held, disaster.found)
    assert len(site.object_files()) == len(disaster.held)
    rebuilt = swap.rebuilt_path(site.data_dir / "catalog")
    assert not rebuilt.exists() and not partial_path(rebuilt).exists()
    assert not (site.data_dir / "restore" / "work").exists()


@pytest.mark.parametrize(
    ("target", "when", "nth"),
    [
        # The first pack of L2 merged: L1 is noted read, L2 not.
        ("appliance.restore.volumes.merge_pack_file", "after", 4),
        ("appliance.restore.adopt.Catalog", "cut", 1),
        ("appliance.restore.rebuild.mark_checked", "after", 1),
        ("appliance.restore.volumes.swap.move_into_place", "after", 1),
    ],
)
def test_a_kill_in_the_catalog_phase_from_volumes(
    volumes_disaster: Disaster,
    volumes_site: Site,
    target: str,
    when: str,
    nth: int,
) -> None:
    config = volumes_site.config_path

    killed = _killed(config, target, when, nth, source="volumes")

    assert killed.returncode == -9, killed.stderr
    _assert_volumes_whole(volumes_site, volumes_disaster)


@pytest.mark.parametrize(
    ("target", "when", "nth"),
    [
        ("appliance.restore.adopt.Catalog", "cut", 1),
        ("appliance.restore.volumes._carry_over", "after", 1),
        # The earlier catalog set aside, the new one not in its place.
        ("pathlib.Path.rename", "after", 2),
    ],
)
def test_a_kill_when_a_volume_loaded_later_is_read(
    volumes_disaster: Disaster,
    volumes_site: Site,
    tmp_path: Path,
    target: str,
    when: str,
    nth: int,
) -> None:
    """A first run without L2 (on the shelf) restores what L1 holds; the
    run once L2 is back is killed while it rebuilds the catalog."""
    shutil.move(volumes_site.volumes / "L2", tmp_path / "L2")
    assert volumes_site.restore().returncode == 1
    shutil.move(tmp_path / "L2", volumes_site.volumes / "L2")
    config = volumes_site.config_path

    killed = _killed(config, target, when, nth, source="volumes")

    assert killed.returncode == -9, killed.stderr
    _assert_volumes_whole(volumes_site, volumes_disaster)


def _leave_behind(data_dir: Path) -> None:
    """What earlier runs, or other versions, may leave: a work catalog and
    a rebuilt catalog cut short, and a whole rebuilt catalog not marked."""
    rebuilt = swap.rebuilt_path(data_dir / "catalog")
    for folder in (data_dir / "restore" / "work" / "catalog", partial_path(rebuilt)):
        folder.mkdir(parents=True)
        (folder / "data.mdb").write_bytes(b"\0" * 3 * _PAGE)
    (data_dir / "restore" / "work" / "segment").write_bytes(b"{")
    Catalog(rebuilt, 2**26).close()


def test_what_earlier_runs_left_is_made_again(disaster, site) -> None:
    restored, _mirror = site
    _leave_behind(restored.data_dir)

    _assert_whole(restored, disaster)


def test_what_earlier_runs_left_is_made_again_from_volumes(
    volumes_disaster: Disaster, volumes_site: Site
) -> None:
    _leave_behind(volumes_site.data_dir)
    shutil.rmtree(volumes_site.data_dir / "restore" / "work" / "catalog")

    _assert_volumes_whole(volumes_site, volumes_disaster)


def test_a_gap_in_the_journal_falls_back_to_the_manifests(disaster, site) -> None:
    """No snapshot opens, and a journal segment is cut short: the journal
    cannot be replayed whole, every pack's manifest is read instead."""
    restored, mirror = site
    (snapshot,) = mirror.glob("catalog/snapshot-*")
    snapshot.unlink()
    segment = sorted(mirror.glob("journal/*"))[1]
    os.truncate(segment, segment.stat().st_size - 1)

    done = restored.restore()

    assert done.returncode == 0, done.stderr
    assert f"journal segment journal/{segment.name}" in done.stderr
    assert "rebuilding from the pack manifests instead" in done.stderr
    assert "the manifests of every pack" in done.stdout
    assert restored.held() == (disaster[1], disaster[2])


def test_a_pack_cut_short_in_the_cache_is_fetched_again(disaster, site) -> None:
    """A scan killed once it has packs in the cache, and the first of them
    cut short on the disk (as a power cut leaves a file not flushed): the
    next run fetches it again rather than lose what its manifest lists."""
    restored, _mirror = site
    target = "appliance.restore.sources.merge_pack_file"
    killed = _killed(restored.config_path, target, "after", 2, "--scan")
    assert killed.returncode == -9, killed.stderr
    first = restored.data_dir / "restore" / "packs" / "p-000000001.pack"
    os.truncate(first, first.stat().st_size // 3)

    done = restored.restore("--scan")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "pack p-000000001 in the restore cache holds" in done.stderr
    assert restored.held() == (disaster[1], disaster[2])
