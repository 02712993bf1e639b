"""The catalog phase of a restore tells how far it is: each step (the
snapshot read, the journal read and replayed, the packs read in a scan)
with a known total and numbers that advance to it; the same numbers in
``appliance restore status`` while it runs."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from appliance.cli_restore import status_text
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore import adopt, replay
from appliance.restore.cache import PackCache
from appliance.restore.mirror import Fetcher, survey
from appliance.restore.progress import Tracker, mark_pending, read
from appliance.restore.rebuild import rebuild_catalog
from appliance.restore.sources import BYTES, ENTRIES, PACKS, Step
from appliance.storage.keys import KeyStore, key_store_path
from tests.restore_site import Restored


def _rebuild(
    restored: Restored, mirror: Path, scan: bool, tracker: Tracker
) -> tuple[list[Step], list[str]]:
    """The catalog phase in this process; every step told, in order, and
    what appliance restore status said at the end of each."""
    config = restored.config
    transport = DirectoryTransport(mirror)
    keys = KeyStore.load(key_store_path(config.data_dir))
    fetcher = Fetcher(transport)
    folder = config.data_dir / "restore"
    cache = PackCache(folder / "packs", fetcher, 10**9)
    mark_pending(folder, "mirror")
    told: list[Step] = []
    said: list[str] = []

    def progress(step: Step) -> None:
        told.append(step)
        tracker.rebuilding(step.what, step.done, step.total, step.unit)
        if step.done == step.total:
            said.append(status_text(folder))

    rebuild_catalog(
        config.catalog_path,
        2**26,
        folder / "work",
        fetcher,
        survey(transport),
        keys,
        cache,
        scan,
        progress,
    )
    return told, said


def _by_step(told: list[Step]) -> dict[str, list[Step]]:
    steps: dict[str, list[Step]] = defaultdict(list)
    for step in told:
        steps[step.what].append(step)
    return steps


def _advances_to_its_total(steps: list[Step]) -> None:
    totals = {step.total for step in steps}
    assert len(totals) == 1 and totals.pop() > 0
    done = [step.done for step in steps]
    assert done == sorted(done)
    assert done[0] == 0 and done[-1] == steps[-1].total
    # Numbers in between, not only the start and the end.
    assert len(set(done)) >= 3, done


@pytest.fixture
def told_each_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "_TELL_EVERY", 1)
    monkeypatch.setattr(adopt, "_TELL_EVERY", 2)


def test_a_restore_from_the_snapshot_tells_each_step(
    disaster, site, told_each_entry: None
) -> None:
    restored, mirror = site
    tracker = Tracker(restored.data_dir / "restore", "command")

    told, said = _rebuild(restored, mirror, False, tracker)

    steps = _by_step(told)
    (snapshot,) = mirror.glob("catalog/snapshot-*")
    first = told[0]
    assert first.what == "reading the catalog snapshot"
    assert (first.done, first.total, first.unit) == (0, snapshot.stat().st_size, BYTES)
    assert list(steps) == [
        first.what,
        "reading the journal",
        "replaying the journal",
        "writing the catalog",
    ]
    for what in ("reading the journal", "replaying the journal", "writing the catalog"):
        _advances_to_its_total(steps[what])
    # The snapshot is one chunk here: its numbers go from 0 to its size.
    assert [s.done for s in steps[first.what]][-1] == snapshot.stat().st_size
    assert steps["reading the journal"][0].unit == BYTES
    replayed = steps["replaying the journal"]
    assert replayed[0].unit == ENTRIES
    # Entries after the snapshot's: those of packs 3 and 4, and more.
    assert replayed[-1].total >= 4
    # The same numbers where appliance restore status reads them.
    total = replayed[-1].total
    assert (
        f"restore (command): rebuilding the catalog, replaying the journal: "
        f"{total:,} of {total:,} journal entries"
    ) in said
    written = read(restored.data_dir / "restore")
    assert written is not None and written.state == "rebuilding"
    count = len(disaster[1])
    assert (written.step, written.step_done, written.step_total) == (
        "writing the catalog",
        count,
        count,
    )


def test_a_scan_tells_the_packs_read(site) -> None:
    restored, mirror = site
    tracker = Tracker(restored.data_dir / "restore", "command")

    told, said = _rebuild(restored, mirror, True, tracker)

    packs = [step for step in told if step.what == "reading the pack manifests"]
    assert [step.what for step in told] == [
        *["reading the pack manifests"] * 5,
        *["writing the catalog"] * 2,
    ]
    assert {step.unit for step in packs} == {PACKS}
    assert [step.done for step in packs] == [0, 1, 2, 3, 4]
    assert {step.total for step in packs} == {4}
    assert (
        "restore (command): rebuilding the catalog, reading the pack manifests: "
        "4 of 4 packs"
    ) in said


def test_a_replay_tells_its_entries_between_runs_of_stores(site, tmp_path) -> None:
    """A journal replayed without a snapshot is one long run of stores: it
    is written in parts, and the numbers advance between them."""
    from appliance.catalog.store import Catalog
    from tests.test_restore import _journal_entries

    entries = _journal_entries(*site, tmp_path)
    stores = [e for e in entries if e["op"] in ("store", "replace")]
    catalog = Catalog(tmp_path / "work", 2**26)
    told: list[tuple[int, int]] = []
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(replay, "_RUN_MOST", 2)
            patch.setattr(replay, "_TELL_EVERY", 1)
            replay.replay_journal(
                catalog, stores, lambda done, total: told.append((done, total))
            )
    finally:
        catalog.close()

    assert {total for _done, total in told} == {len(stores)}
    done = [d for d, _total in told]
    assert done == sorted(done) and done[-1] == len(stores)
    assert len(set(done)) >= len(stores) // 2


def test_the_command_line_shows_the_catalog_phase_then_its_end(disaster, site) -> None:
    """Run whole (catalog phase only, --background): the progress file says
    the catalog is back, and the status says so."""
    restored, _mirror = site

    done = restored.restore("--background")

    assert done.returncode == 0, done.stderr
    # Without a terminal, the bar is drawn once, at its end.
    assert "0/?" not in done.stderr
    count = len(disaster[1])
    assert "catalog: writing the catalog" in done.stderr
    assert f" {count} of {count} instances" in done.stderr
    written = read(restored.data_dir / "restore")
    assert written is not None and written.state == "rebuilt"
    text = status_text(restored.data_dir / "restore")
    assert text == "restore: the catalog is back; the data waits for the service"
