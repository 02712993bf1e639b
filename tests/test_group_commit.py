"""The group committer: the thread that finds no commit running commits,
records queued meanwhile share the next transaction, every submitter gets
its own result or the failure of its transaction, and none waits for ever."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.catalog.store import Catalog
from appliance.ingest import GroupCommitter, Ingest
from appliance.storage.online import OnlineTier
from tests.datasets import study_files

WAIT = 30.0


class _Catalog:
    """Records each transaction: the thread that ran it and what it held."""

    def __init__(self, hold: float = 0.0, fail: BaseException | None = None) -> None:
        self.hold = hold
        self.fail = fail
        self.transactions: list[tuple[str, list[Any]]] = []
        self.first_started = threading.Event()

    def record(self, batch: list[Any], duplicate_policy: str) -> list[str]:
        self.transactions.append((threading.current_thread().name, list(batch)))
        self.first_started.set()
        time.sleep(self.hold)
        if self.fail is not None:
            raise self.fail
        return [f"recorded {item}" for item in batch]


def _submit_in_threads(
    committer: GroupCommitter, items: list[str]
) -> tuple[list[threading.Thread], dict[str, Any]]:
    answers: dict[str, Any] = {}

    def submit(item: str) -> None:
        try:
            answers[item] = committer.submit(item)  # type: ignore[arg-type]
        except BaseException as exc:
            answers[item] = exc

    threads = [
        threading.Thread(target=submit, args=(item,), name=item, daemon=True)
        for item in items
    ]
    for thread in threads:
        thread.start()
    return threads, answers


def _joined(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), f"{thread.name} still waits"


def test_one_submitter_commits_in_its_own_thread() -> None:
    catalog = _Catalog()
    committer = GroupCommitter(catalog, "refuse")  # type: ignore[arg-type]

    answers = [committer.submit(item) for item in ("a", "b")]  # type: ignore[arg-type]

    assert answers == ["recorded a", "recorded b"]
    me = threading.current_thread().name
    assert catalog.transactions == [(me, ["a"]), (me, ["b"])]


def test_records_queued_during_a_commit_share_the_next_one() -> None:
    catalog = _Catalog(hold=1.0)
    committer = GroupCommitter(catalog, "refuse")  # type: ignore[arg-type]
    first, answers = _submit_in_threads(committer, ["first"])
    assert catalog.first_started.wait(WAIT)

    others, more = _submit_in_threads(committer, ["x", "y", "z"])
    _joined(first + others)

    answers.update(more)
    assert answers == {i: f"recorded {i}" for i in ("first", "x", "y", "z")}
    # The first thread led its own transaction; the three queued meanwhile
    # share one more (not three), led by one of them.
    assert len(catalog.transactions) == 2
    assert catalog.transactions[0] == ("first", ["first"])
    assert sorted(catalog.transactions[1][1]) == ["x", "y", "z"]
    assert catalog.transactions[1][0] in {"x", "y", "z"}


def test_a_failed_commit_fails_its_records_and_the_next_one_leads_again() -> None:
    catalog = _Catalog(fail=OSError("disk full"))
    committer = GroupCommitter(catalog, "refuse")  # type: ignore[arg-type]

    with pytest.raises(OSError, match="disk full"):
        committer.submit("a")  # type: ignore[arg-type]
    catalog.fail = None

    assert committer.submit("b") == "recorded b"  # type: ignore[arg-type]


def test_a_leader_stopped_mid_commit_leaves_no_one_waiting() -> None:
    # KeyboardInterrupt passes through the commit's own handling: the
    # records of that transaction and those queued behind it get it too.
    catalog = _Catalog(hold=0.5, fail=KeyboardInterrupt())
    committer = GroupCommitter(catalog, "refuse")  # type: ignore[arg-type]
    first, answers = _submit_in_threads(committer, ["first"])
    assert catalog.first_started.wait(WAIT)
    queued, more = _submit_in_threads(committer, ["queued"])
    time.sleep(0.1)

    _joined(first + queued)

    answers.update(more)
    assert isinstance(answers["first"], KeyboardInterrupt)
    assert isinstance(answers["queued"], KeyboardInterrupt)
    catalog.fail, catalog.hold = None, 0.0
    assert committer.submit("later") == "recorded later"  # type: ignore[arg-type]


def test_concurrent_stores_through_ingest_all_commit(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    ingest = Ingest(catalog, online, "refuse")
    files = study_files(tmp_path / "files", "group", 12)
    results: list[Any] = []
    try:
        threads = [
            threading.Thread(
                target=lambda p=path: results.append(ingest.import_file(p, "test"))
            )
            for path in files
        ]
        for thread in threads:
            thread.start()
        _joined(threads)
        assert len(results) == 12 and all(result.ok for result in results)
        with catalog.read() as txn:
            for result in results:
                assert catalog.instance(txn, result.sop_instance_uid) is not None
    finally:
        ingest.close()
        catalog.close()


def test_a_leader_answers_its_own_sender_while_others_keep_submitting() -> None:
    # Over several busy associations records arrive during every commit: the
    # thread that led must still get back to its own association once its
    # record is in, not commit the others' for as long as they keep coming.
    catalog = _Catalog(hold=0.02)
    committer = GroupCommitter(catalog, "refuse")  # type: ignore[arg-type]
    leader_done = threading.Event()
    stop_at = time.monotonic() + 3.0

    def keep_submitting(name: str) -> None:
        while not leader_done.is_set() and time.monotonic() < stop_at:
            committer.submit(name)  # type: ignore[arg-type]
            # Its next instance comes over the network a moment later,
            # while the next commit runs.
            time.sleep(0.005)

    def lead() -> None:
        committer.submit("leader")  # type: ignore[arg-type]
        leader_done.set()

    feeders = [
        threading.Thread(target=keep_submitting, args=(f"f{n}",), daemon=True)
        for n in range(2)
    ]
    leader = threading.Thread(target=lead, daemon=True)
    leader.start()
    # Out of step: one feeder's record arrives during each commit.
    for feeder in feeders:
        committed = len(catalog.transactions)
        feeder.start()
        while len(catalog.transactions) <= committed and not leader_done.is_set():
            time.sleep(0.001)

    assert leader_done.wait(WAIT)
    assert time.monotonic() < stop_at - 1.0, "the leader was kept committing"
    _joined([leader, *feeders])
