"""The audit log rotated by size: every record in exactly one file, in
order, read across the rotations; writers in several processes rotating
the same log; the syslog sender going on from a rotated file; rotated files
removed only when asked and only once sent."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from appliance import audit
from appliance import config as configuration
from appliance.audit import events
from appliance.audit.log import AuditLog, Record
from appliance.audit.sender import Position, Sender
from appliance.audit.syslog import FACILITIES, Destination
from appliance.audit.trail import Trail
from tests.syslog_receiver import TlsCollector, make_certificates

LIMIT = 2048


def record(writer: str, number: int) -> Record:
    return Record(
        time="2026-12-05T03:12:00.000Z",
        event="query",
        message=f"{writer} {number} " + "x" * 150,
        pid=os.getpid(),
    )


def seen(records: list[Record]) -> list[tuple[str, int]]:
    found = []
    for each in records:
        writer, number, _ = each.message.split(" ")
        found.append((writer, int(number)))
    return found


class Follower:
    """Reads the log as the syslog sender does: a batch at a time, from the
    file number and offset after the last record read."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.segment, self.offset = 1, 0
        self.got: list[Record] = []

    def poll(self, batch: int = 7) -> int:
        records = self.log.read_from(self.offset, batch, self.segment)
        for each in records:
            self.segment, self.offset = each.segment, each.end
        self.got += records
        return len(records)

    def drain(self) -> None:
        while self.poll():
            pass


def test_records_across_rotations_are_all_there_in_order_once(
    tmp_path: Path,
) -> None:
    log = AuditLog(tmp_path, rotate_bytes=LIMIT)
    follower = Follower(log)

    for number in range(60):
        log.append(record("w", number))
        if number % 5 == 0:
            follower.poll()
    follower.drain()

    rotated = log.rotated()
    assert [p.name for p in rotated] == [
        f"audit.log.{n}" for n in range(1, len(rotated) + 1)
    ]
    assert len(rotated) >= 5
    assert all(0 < p.stat().st_size <= LIMIT for p in [*rotated, log.path])
    expected = [("w", n) for n in range(60)]
    assert seen(list(log.records())) == expected
    assert seen(follower.got) == expected
    assert {r.segment for r in follower.got} == set(range(1, len(rotated) + 2))


def _write(folder: str, writer: str, count: int) -> None:
    # Two records a file: the writers rotate all the time.
    log = AuditLog(Path(folder), rotate_bytes=400)
    for number in range(count):
        log.append(record(writer, number))


def test_two_processes_writing_across_rotations_lose_nothing(
    tmp_path: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_write, args=(str(tmp_path), name, 150))
        for name in ("a", "b")
    ]
    follower = Follower(AuditLog(tmp_path))

    for writer in writers:
        writer.start()
    while any(writer.is_alive() for writer in writers):
        follower.poll()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    follower.drain()

    everything = seen(list(AuditLog(tmp_path).records()))
    assert len(everything) == len(set(everything)) == 300
    for name in ("a", "b"):
        assert [n for w, n in everything if w == name] == list(range(150))
    # The reader that followed the writers got the same records, in the
    # same order, each once.
    assert seen(follower.got) == everything
    assert len(AuditLog(tmp_path).rotated()) >= 100


def test_a_rotation_cut_short_by_a_crash_keeps_the_numbers(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, rotate_bytes=LIMIT)
    for number in range(30):
        log.append(record("w", number))
    newest = len(log.rotated())
    # A crash after the rename, before rotation.json was written.
    (tmp_path / "rotation.json").write_text(json.dumps({"live": newest}))
    os.rename(log.path, tmp_path / f"audit.log.{newest + 1}")

    for number in range(30, 60):
        log.append(record("w", number))
    # Rotated files moved away to an archive: their numbers are not reused.
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in log.rotated():
        path.rename(archive / path.name)
    before = log.live_number()
    for number in range(60, 90):
        log.append(record("w", number))

    assert seen(list(log.records()))[-30:] == [("w", n) for n in range(60, 90)]
    assert min(int(p.suffix[1:]) for p in log.rotated()) == before
    assert not any((tmp_path / p.name).exists() for p in archive.iterdir())


def test_rotated_files_are_kept_unless_asked_and_never_before_they_are_sent(
    tmp_path: Path,
) -> None:
    everything = tmp_path / "all"
    for number in range(60):
        AuditLog(everything, rotate_bytes=LIMIT).append(record("w", number))
    unsent = tmp_path / "unsent"
    unsent.mkdir()
    (unsent / "sent.json").write_text(
        json.dumps({"segment": 3, "offset": 0, "sent": 0})
    )
    for number in range(60):
        AuditLog(unsent, rotate_bytes=LIMIT, keep_files=2).append(record("w", number))
    free = tmp_path / "free"
    for number in range(60):
        AuditLog(free, rotate_bytes=LIMIT, keep_files=2).append(record("w", number))

    total = len(AuditLog(everything).rotated())
    assert total >= 5
    assert seen(list(AuditLog(everything).records())) == [("w", n) for n in range(60)]
    numbers = [int(p.suffix[1:]) for p in AuditLog(unsent).rotated()]
    assert numbers == list(range(3, total + 1))
    numbers = [int(p.suffix[1:]) for p in AuditLog(free).rotated()]
    assert numbers == [total - 1, total]


def test_the_trail_takes_the_limits_from_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        f'[storage]\ndata_dir = "{tmp_path}"\n'
        "[audit]\nrotate_bytes = 4096\nkeep_files = 3\n"
    )
    trail = Trail.of(configuration.load(path))
    assert (trail.log.rotate_bytes, trail.log.keep_files) == (4096, 3)
    defaults = {key.path: key.default for key in configuration.KEYS}
    assert defaults["audit.keep_files"] == 0  # an audit trail keeps all


@pytest.fixture
def certs(tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "certs"
    folder.mkdir()
    return make_certificates(folder)


def test_the_sender_goes_on_from_a_rotated_file(
    tmp_path: Path,
    certs,  # type: ignore[no-untyped-def]
) -> None:
    folder = tmp_path / "audit"
    trail = Trail(folder, "APPLIANCE", rotate_bytes=8192)
    peer = events.Peer("X", "127.0.0.1")
    collector = TlsCollector(certs).start()
    destination = Destination("tls", "127.0.0.1", collector.port, ca_file=str(certs.ca))
    for n in range(5):
        audit.security_alert(trail, f"alert {n}", peer)
    sender = Sender(AuditLog(folder), destination, FACILITIES["authpriv"])
    sender.start()
    try:
        collector.wait_for(5)
        for n in range(5, 40):  # several rotations while the sender runs
            audit.security_alert(trail, f"alert {n}", peer)
        got = collector.wait_for(40)
    finally:
        sender.stop()
        collector.stop()

    assert len(trail.log.rotated()) >= 3
    descriptions = [
        m.xml.findtext("EventIdentification/EventOutcomeDescription") for m in got
    ]
    assert descriptions == [f"alert {n}" for n in range(40)]
    assert [m.sequence for m in got] == list(range(1, 41))
    position = Position(folder)
    assert (position.segment, position.sent) == (trail.log.live_number(), 40)
