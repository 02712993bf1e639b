"""The data phase's threads: instances extracted several at a time from one
pack, and the next study's packs fetched while a study is extracted. A
failure in either thread stops the restore with that error, counts nothing
half-written, and the next run finishes the work."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from appliance.errors import DamagedPackError, TransportError
from appliance.hsm.tiers import ONLINE
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore.ahead import FetchAbandoned, FetchAhead, abandon_if
from appliance.restore.cache import PackCache
from appliance.restore.data import DataRestore
from appliance.restore.mirror import Fetcher, survey
from appliance.restore.progress import mark_pending
from appliance.restore.rebuild import rebuild_catalog
from appliance.storage.keys import KeyStore, import_escrow, key_store_path
from appliance.storage.packs import PackReader
from appliance.storage.packs.reader import PackReader as ReaderClass
from tests.restore_site import Restored


class Rebuilt:
    """A restored appliance after its catalog phase, run in this process."""

    def __init__(self, restored: Restored, mirror: Path) -> None:
        config = restored.config
        transport = DirectoryTransport(mirror)
        self.keys = KeyStore.load(key_store_path(config.data_dir))
        self.folder = config.data_dir / "restore"
        self.contents = survey(transport)
        self.cache = PackCache(self.folder / "packs", Fetcher(transport), 10**9)
        mark_pending(self.folder, "mirror")
        rebuild_catalog(
            config.catalog_path,
            2**26,
            self.folder / "work",
            self.cache.fetcher,
            self.contents,
            self.keys,
            self.cache,
        )
        self.online_path = config.online_path
        self.catalog_path = config.catalog_path

    def run(self, before_fetch: Any = None) -> None:
        catalog = Catalog(self.catalog_path, 2**26)
        try:
            restorer = DataRestore(
                catalog,
                self.online_path,
                0,
                self.keys,
                self.cache,
                self.contents,
                self.folder,
                before_fetch=before_fetch,
            )
            restorer.run(restorer.plan())
        finally:
            catalog.close()


def _online_studies(restored: Restored) -> dict[str, tuple[int, int]]:
    """study -> (instances counted online, instances)."""
    catalog = restored.catalog()
    try:
        with catalog.read() as txn:
            studies = [uid for uid, _ in catalog.all_records(txn, "studies")]
        found = {}
        for study_uid in studies:
            records = copies.instances_of(catalog, study_uid)
            online = sum(1 for r in records if r.copy_on(ONLINE) is not None)
            found[study_uid] = (online, len(records))
        return found
    finally:
        catalog.close()


def _finishes_on_the_next_run(restored: Restored, disaster: Any) -> None:
    done = restored.restore()
    assert done.returncode == 0, done.stderr
    assert restored.held() == (disaster[1], disaster[2])
    assert len(restored.object_files()) == len(disaster[1])


def test_a_failure_in_an_extraction_thread_stops_the_restore(disaster, site) -> None:
    """The third instance extracted fails in its worker thread with an
    error no check expects: the restore stops with it, the study under way
    counts no instance, no temporary file stays, and no worker writes on.
    The next run removes what the study left and restores it once."""
    restored, mirror = site
    rebuilt = Rebuilt(restored, mirror)
    real_extract = ReaderClass.extract_to
    threads: list[str] = []
    lock = threading.Lock()

    def failing(self: PackReader, *args: Any, **kwargs: Any) -> Any:
        with lock:
            threads.append(threading.current_thread().name)
            number = len(threads)
        if number == 3:
            raise RuntimeError("controller fault")
        return real_extract(self, *args, **kwargs)

    with (
        mock.patch.object(ReaderClass, "extract_to", failing),
        pytest.raises(RuntimeError, match="controller fault"),
    ):
        rebuilt.run()

    assert all(name.startswith("recall-extract") for name in threads)
    written = sorted(restored.object_files())
    assert written and not [p for p in written if p.name.endswith(".tmp")]
    # Every study is whole online or not counted at all.
    studies = _online_studies(restored)
    assert all(online in (0, count) for online, count in studies.values())
    assert any(online == 0 for online, _ in studies.values())
    # The threads were all waited for: nothing is written after the error.
    assert sorted(restored.object_files()) == written
    _finishes_on_the_next_run(restored, disaster)


def test_a_failed_fetch_ahead_stops_the_restore_at_its_study(disaster, site) -> None:
    """The second study's packs fail to come (fetched ahead, in the fetch
    thread): the first study is restored and counted, the error stops the
    restore when the second is reached, and the next run goes on."""
    restored, mirror = site
    rebuilt = Rebuilt(restored, mirror)
    real_fetch = Fetcher.fetch
    threads: list[str] = []

    def failing(self: Fetcher, name: str, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            raise TransportError("mirror unreachable")
        return real_fetch(self, name, *args, **kwargs)

    with (
        mock.patch.object(Fetcher, "fetch", failing),
        pytest.raises(TransportError, match="mirror unreachable"),
    ):
        rebuilt.run()

    assert all(name.startswith("restore-fetch") for name in threads)
    studies = _online_studies(restored)
    assert all(online in (0, count) for online, count in studies.values())
    complete = [uid for uid, (online, count) in studies.items() if online == count]
    assert 1 <= len(complete) < len(studies)
    _finishes_on_the_next_run(restored, disaster)


def test_recalls_go_before_each_pack_fetched_ahead(disaster, site) -> None:
    """The hook that waits for recalls runs in the fetch thread before
    every pack it fetches, and the restore still ends complete."""
    restored, mirror = site
    rebuilt = Rebuilt(restored, mirror)
    real_fetch = Fetcher.fetch
    events: list[tuple[str, str]] = []

    def fetch(self: Fetcher, name: str, *args: Any, **kwargs: Any) -> Any:
        events.append(("fetch", threading.current_thread().name))
        return real_fetch(self, name, *args, **kwargs)

    def before_fetch() -> None:
        events.append(("recalls", threading.current_thread().name))

    with mock.patch.object(Fetcher, "fetch", fetch):
        rebuilt.run(before_fetch)

    in_thread = [kind for kind, name in events if name.startswith("restore-fetch")]
    fetches = in_thread.count("fetch")
    assert fetches == len(rebuilt.contents.packs)
    assert all(
        in_thread[i - 1] == "recalls"
        for i, kind in enumerate(in_thread)
        if kind == "fetch"
    )
    assert restored.held() == (disaster[1], disaster[2])


def test_closing_cuts_off_a_fetch_under_way(tmp_path: Path) -> None:
    """A stop while a pack comes: the download ends in the fetch thread
    (the transport is free at once), no partial file stays, and the stop
    is not reported as an error."""
    ended = threading.Event()
    started = threading.Event()
    ended_in: list[str] = []

    class EndlessMirror(DirectoryTransport):
        def get(self, name: str) -> Iterator[bytes]:
            try:
                while True:
                    started.set()
                    yield b"x" * 4096
            finally:
                ended_in.append(threading.current_thread().name)
                ended.set()

    (tmp_path / "mirror").mkdir()
    fetcher = Fetcher(EndlessMirror(tmp_path / "mirror"))
    destination = tmp_path / "p-000000001.pack"
    ahead = FetchAhead()

    def job(abandoned: Any) -> None:
        fetcher.fetch("packs/000/p-000000001.pack", destination, abandon_if(abandoned))

    ahead.ask("study", job)
    assert started.wait(10)
    ahead.close()

    assert ended.is_set()
    assert ended_in[0].startswith("restore-fetch")
    assert list(tmp_path.glob("*.pack*")) == []
    with pytest.raises(FetchAbandoned):
        abandon_if(lambda: True)(1)


def test_a_failed_fetch_raises_where_it_is_waited_for() -> None:
    ahead = FetchAhead()

    def job(_abandoned: Any) -> None:
        raise TransportError("no route to the mirror")

    ahead.ask("study", job)
    try:
        with pytest.raises(TransportError, match="no route"):
            ahead.wait("study")
    finally:
        ahead.close()


def _packs(disaster: Any, tmp_path: Path) -> tuple[list[Path], KeyStore]:
    folder = disaster[0]
    keys = import_escrow(tmp_path / "keys", (folder / "escrow.txt").read_text())
    return sorted((folder / "mirror" / "packs").rglob("*.pack")), keys


def test_threads_extracting_from_one_reader_get_the_right_bytes(
    disaster, tmp_path: Path
) -> None:
    packs, keys = _packs(disaster, tmp_path)
    for path in packs:
        with PackReader.open(path, keys) as reader:
            entries = reader.manifest().instances
            alone = {}
            for entry in entries:
                out = io.BytesIO()
                reader.extract(entry, out)
                alone[entry.sop_instance_uid] = out.getvalue()

            def extracted(entry: Any, reader: PackReader = reader) -> tuple[str, bytes]:
                out = io.BytesIO()
                reader.extract(entry.sop_instance_uid, out)
                return entry.sop_instance_uid, out.getvalue()

            with ThreadPoolExecutor(8) as pool:
                together = dict(pool.map(extracted, entries * 4))
        assert together == alone


def test_a_damaged_member_fails_in_a_thread_as_alone(disaster, tmp_path: Path) -> None:
    """One byte changed in an instance's member: extracting it from worker
    threads fails with the same error, the other instances come out."""
    packs, keys = _packs(disaster, tmp_path)
    damaged = tmp_path / packs[0].name
    data = bytearray(packs[0].read_bytes())
    with PackReader.open(packs[0], keys) as reader:
        entries = reader.manifest().instances
    victim = entries[0]
    data[victim.data_offset + victim.member_size // 2] ^= 0x01
    damaged.write_bytes(data)

    with PackReader.open(damaged, keys) as reader:

        def extracted(entry: Any) -> str:
            try:
                reader.extract(entry, io.BytesIO())
            except DamagedPackError as exc:
                return exc.reason
            return "ok"

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(extracted, entries))

    assert "GCM tag does not match" in outcomes[0]
    assert outcomes[1:] == ["ok"] * (len(entries) - 1)


def test_the_data_phase_does_not_flush_its_packs_and_the_next_run_drops_them(
    tmp_path: Path,
) -> None:
    """A pack fetched for the data phase only is not flushed (the disk has
    the instances to write); a power cut may leave it cut short or zeroed
    at any size, so the next run does not trust it: it is removed, and
    fetched again if needed. A pack the catalog phase fetched is flushed
    and kept for the next run."""
    mirror = tmp_path / "mirror"
    (mirror / "packs" / "001").mkdir(parents=True)
    (mirror / "packs" / "002").mkdir(parents=True)
    (mirror / "packs" / "001" / "p-000000001.pack").write_bytes(b"one" * 1000)
    (mirror / "packs" / "002" / "p-000000002.pack").write_bytes(b"two" * 1000)
    contents = survey(DirectoryTransport(mirror))
    folder = tmp_path / "packs"
    flushed: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(fd)
        real_fsync(fd)

    cache = PackCache(folder, Fetcher(DirectoryTransport(mirror)), 10**9)
    with mock.patch("appliance.restore.mirror.os.fsync", fsync):
        data_only = cache.fetch(
            "p-000000001", contents.packs["p-000000001"], flush=False
        )
        assert flushed == []
        kept = cache.fetch("p-000000002", contents.packs["p-000000002"])
        assert len(flushed) == 1

    assert data_only.read_bytes() == b"one" * 1000
    assert data_only.name == "p-000000001.unflushed"
    assert kept.read_bytes() == b"two" * 1000
    # A power cut leaves the unflushed pack zeroed, at its size.
    data_only.write_bytes(bytes(3000))

    again = PackCache(folder, Fetcher(DirectoryTransport(mirror)), 10**9)

    assert not again.holds("p-000000001") and not data_only.exists()
    assert again.holds("p-000000002")
    fetched = again.fetch("p-000000001", contents.packs["p-000000001"], flush=False)
    assert fetched.read_bytes() == b"one" * 1000
