"""pynetdicom's polling sleeps turned into waits: each wait ends as soon as
what the loop waits for is there, never later than the sleep would have
while the association has work, and passes on what it does not take; an
idle association's loops look only a few times a second."""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification

from appliance.dicom import reactor_waits
from tests.conftest import dcmtk, require_dcmtk
from tests.ports import free_port

# Far longer than any wait below should take: a wait that runs this long
# was not woken.
LONG = 30.0


class _Wrapper:
    """Stands for pynetdicom's AssociationSocket: the connection it holds."""

    def __init__(self, connection: Any, connected: bool = True) -> None:
        self.socket = connection
        self._is_connected = connected


def _in_thread(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_the_dul_wait_ends_when_bytes_arrive() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        waiting = _in_thread(reactor_waits.until_readable, _Wrapper(ours), LONG)
        time.sleep(0.1)
        assert waiting.is_alive()

        theirs.sendall(b"\x04")
        waiting.join(LONG / 3)

        assert not waiting.is_alive()
        assert reactor_waits.until_readable(_Wrapper(ours), 0)  # still there


def test_the_dul_wait_says_when_it_found_nothing() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not reactor_waits.until_readable(_Wrapper(ours), 0.01)


def test_the_dul_wait_ends_on_a_connection_numbered_beyond_select() -> None:
    # select() cannot wait on a descriptor numbered 1,024 or more; a busy
    # appliance may hold that many files and connections.
    high = 1500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= high:
        pytest.skip(f"this process may not open descriptor {high}")
    if soft != resource.RLIM_INFINITY and soft <= high:
        resource.setrlimit(resource.RLIMIT_NOFILE, (high + 1, hard))
    ours, theirs = socket.socketpair()
    try:
        os.dup2(ours.fileno(), high)
        far = socket.socket(fileno=high)
        with far, theirs:
            theirs.sendall(b"\x04")
            began = time.monotonic()
            assert reactor_waits.until_readable(_Wrapper(far), LONG)
            assert time.monotonic() - began < LONG / 3
    finally:
        ours.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_dul_wait_ends_when_a_pdu_is_queued_for_sending() -> None:
    ours, theirs = socket.socketpair()
    wake = reactor_waits._Wake()
    with ours, theirs:
        waiting = _in_thread(reactor_waits.until_readable, _Wrapper(ours), LONG, wake)
        time.sleep(0.1)
        assert waiting.is_alive()

        wake.signal()
        waiting.join(LONG / 3)

        assert not waiting.is_alive()
        assert not wake.clear()  # reset by the wait: the next one waits
    wake.close()


def test_a_wake_closed_with_its_thread_is_never_written() -> None:
    wake = reactor_waits._Wake()
    wake.close()
    wake.signal()  # a PDU queued after the thread ended: nothing written
    wake.close()
    assert wake.fd == -1 and not wake.clear()


class _WithPending:
    """A connection holding bytes already read off the kernel's socket."""

    def pending(self) -> int:
        return 6


def test_the_dul_wait_does_not_wait_for_bytes_already_read() -> None:
    waiting = _in_thread(reactor_waits.until_readable, _Wrapper(_WithPending()), LONG)
    waiting.join(LONG / 3)
    assert not waiting.is_alive()


def test_the_dul_wait_sleeps_its_time_on_a_closed_connection() -> None:
    # A closed socket is always "ready": waiting on it must not end at once,
    # or the loop would spin until it notices.
    closed = socket.socket()
    closed.close()
    for wrapper in (_Wrapper(closed), _Wrapper(socket.socket(), connected=False)):
        began = time.monotonic()
        reactor_waits.until_readable(wrapper, 0.05)
        assert time.monotonic() - began >= 0.05
        wrapper.socket.close()


def test_the_association_wait_ends_when_a_message_is_queued() -> None:
    messages: queue.Queue[Any] = queue.Queue()
    waiting = _in_thread(reactor_waits.until_queued, messages, LONG)
    time.sleep(0.1)
    assert waiting.is_alive()

    messages.put((1, "message"))
    waiting.join(LONG / 3)

    assert not waiting.is_alive()
    assert reactor_waits.until_queued(messages, 0)
    assert messages.get_nowait() == (1, "message")  # left for the loop
    assert not reactor_waits.until_queued(messages, 0.01)


def test_a_loop_waits_longer_only_once_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    pace = reactor_waits._Pace()
    assert pace.wait(0.001) == 0.001

    monkeypatch.setattr(reactor_waits, "QUIET_AFTER", 0.05)
    time.sleep(0.1)
    assert pace.wait(0.001) == reactor_waits.IDLE_WAIT

    pace.busy()
    assert pace.wait(0.001) == 0.001


def test_the_association_wait_passes_the_wake_on_to_a_reader() -> None:
    # The loop waits first; then a sender waits in get() for its response.
    # put() wakes one of them: the loop's wait, which takes nothing, must
    # pass the wake on or the sender waits out its whole timeout.
    messages: queue.Queue[Any] = queue.Queue()
    _in_thread(reactor_waits.until_queued, messages, LONG)
    time.sleep(0.2)
    received: list[Any] = []
    reader = _in_thread(lambda: received.append(messages.get(timeout=LONG)))
    time.sleep(0.2)

    messages.put((1, "response"))
    reader.join(LONG / 3)

    assert not reader.is_alive()
    assert received == [(1, "response")]


def test_other_sleeps_in_pynetdicom_still_sleep() -> None:
    clock = reactor_waits._ReactorClock()
    began = time.monotonic()
    clock.sleep(0.05)
    assert time.monotonic() - began >= 0.05
    assert clock.monotonic() >= began  # the rest of the time module


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The waits installed for this test only, each call noted by the kind
    of thread that made it."""
    # Everything install() replaces is put back after the test, so that
    # the other tests in this process run pynetdicom as it was.
    monkeypatch.setattr(pynetdicom.dul, "time", pynetdicom.dul.time)
    monkeypatch.setattr(pynetdicom.association, "time", pynetdicom.association.time)
    for name in ("send_pdu", "run_reactor"):
        monkeypatch.setattr(DULServiceProvider, name, getattr(DULServiceProvider, name))
    calls: list[str] = []
    readable, queued = reactor_waits.until_readable, reactor_waits.until_queued

    def note_readable(wrapper: Any, seconds: float, *wake: Any) -> bool:
        calls.append(type(threading.current_thread()).__name__ + " readable")
        return readable(wrapper, seconds, *wake)

    def note_queued(messages: Any, seconds: float) -> bool:
        calls.append(type(threading.current_thread()).__name__ + " queued")
        return queued(messages, seconds)

    monkeypatch.setattr(reactor_waits, "until_readable", note_readable)
    monkeypatch.setattr(reactor_waits, "until_queued", note_queued)
    reactor_waits.install()
    yield calls


def test_both_loops_of_an_association_wait_instead_of_sleeping(
    installed: list[str],
) -> None:
    # The peer is DCMTK's echoscu, so that only the association served here
    # runs through the waits. (A pynetdicom requestor in this process would
    # meet pynetdicom's own race, in which its reactor takes a response
    # the sender waits for: the appliance's requestors are guarded against
    # it, see retrieve.tune_requestor.)
    require_dcmtk()
    before = _eventfds()
    port = free_port()
    scp = AE(ae_title="WAITS")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        echoed = dcmtk(
            "echoscu", "--repeat", "3", "-aec", "WAITS", "127.0.0.1", str(port)
        )
    finally:
        server.shutdown()

    assert echoed.returncode == 0, echoed.stderr

    assert f"{DULServiceProvider.__name__} readable" in installed
    assert f"{Association.__name__} queued" in installed
    # Each DUL thread closed its eventfd as it ended.
    deadline = time.monotonic() + LONG / 3
    while _eventfds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _eventfds() == before


def _eventfds() -> int:
    """This process's open eventfds."""
    folder = Path("/proc/self/fd")
    found = 0
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            found += os.readlink(entry) == "anon_inode:[eventfd]"
    return found


def test_an_idle_association_looks_a_few_times_a_second(
    installed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ends are pynetdicom in this process: four loops, each of which
    # looked a thousand times a second while idle. No DIMSE message is
    # sent, so pynetdicom's requestor race (see above) cannot happen.
    monkeypatch.setattr(reactor_waits, "QUIET_AFTER", 0.2)
    port = free_port()
    scp = AE(ae_title="IDLE")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        scu = AE(ae_title="HOLDER")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="IDLE")
        assert assoc.is_established
        time.sleep(0.5)  # quiet for longer than QUIET_AFTER

        before = len(installed)
        time.sleep(1.0)
        looks = len(installed) - before

        assoc.release()
        assert assoc.is_released
    finally:
        server.shutdown()

    # Four loops at IDLE_WAIT (0.1 s): 40 looks a second; at 1 ms, 4,000.
    assert 0 < looks <= 200, looks
