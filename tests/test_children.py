"""The child supervisor: a child that stops on SIGTERM is not reported as
killed; one that ignores it is killed after the grace period. Background
children run at a lower CPU priority."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from appliance.children import BACKGROUND_NICENESS, ChildSupervisor, run_child


def obedient() -> None:
    time.sleep(60)


def stubborn(ready: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(60)


def running(supervisor: ChildSupervisor) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        child = supervisor._child
        if child is not None and child.pid is not None and child.is_alive():
            time.sleep(0.5)  # past the child's start-up
            return
        time.sleep(0.05)
    raise AssertionError("the child did not start")


def test_a_child_that_stops_on_sigterm_is_not_reported_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = ChildSupervisor(obedient, (), "obedient", stop_grace=10.0)
    supervisor.start()
    running(supervisor)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="appliance.children"):
        supervisor.stop()

    assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if "did not stop" in r.message]
    assert supervisor._child.exitcode == -signal.SIGTERM


def test_a_sigterm_to_the_whole_service_is_no_failure_of_the_child(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``kill`` on the process group: the child hears SIGTERM before the
    service has stopped its supervisor. Its end is no failure, and it is
    not started again."""
    supervisor = ChildSupervisor(obedient, (), "grouped", stop_grace=10.0)
    supervisor.start()
    running(supervisor)
    first = supervisor._child

    with caplog.at_level(logging.INFO, logger="appliance.children"):
        os.kill(first.pid, signal.SIGTERM)
        time.sleep(0.5)  # the service's own stop comes a little later
        supervisor.stop()

    assert supervisor._child is first
    assert not [
        r
        for r in caplog.records
        if r.name == "appliance.children" and r.levelno >= logging.WARNING
    ]


def graceful(ready: str) -> None:
    """Stops on SIGTERM with exit code 0, as replication and commitment do;
    ``ready`` is made once it listens for it."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(ready).touch()
    stop.wait(60)


def test_a_graceful_child_in_a_stopping_service_is_no_failure(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The same with a child that finishes its step and exits 0 on SIGTERM."""
    ready = tmp_path / "ready"
    supervisor = ChildSupervisor(graceful, (str(ready),), "graceful", stop_grace=10.0)
    supervisor.start()
    running(supervisor)
    first = supervisor._child
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="appliance.children"):
        os.kill(first.pid, signal.SIGTERM)
        time.sleep(0.5)
        supervisor.stop()

    assert supervisor._child is first
    assert first.exitcode == 0
    assert not [
        r
        for r in caplog.records
        if r.name == "appliance.children" and r.levelno >= logging.WARNING
    ]


def test_a_child_sent_sigterm_alone_is_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = ChildSupervisor(obedient, (), "alone", stop_grace=10.0)
    supervisor.young = supervisor.stop_follows = 0.5
    supervisor.start()
    running(supervisor)
    first = supervisor._child

    with caplog.at_level(logging.ERROR, logger="appliance.children"):
        os.kill(first.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while supervisor._child is first and time.monotonic() < deadline:
            time.sleep(0.05)
        running(supervisor)
        supervisor.stop()

    assert supervisor._child is not first
    assert [r.message for r in caplog.records] == [
        f"alone process ended (exit code {-signal.SIGTERM}); starting it again"
    ]


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ready = tmp_path / "ignoring"
    supervisor = ChildSupervisor(stubborn, (str(ready),), "stubborn", stop_grace=1.0)
    supervisor.start()
    running(supervisor)
    # A loaded machine can take longer than the pause in running() to get
    # the child to its signal handler.
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="appliance.children"):
        supervisor.stop()

    assert [r.message for r in caplog.records] == [
        "stubborn did not stop in 1 s; killed"
    ]
    assert supervisor._child.exitcode == -signal.SIGKILL


def report_niceness(path: str) -> None:
    with open(path, "w") as handle:
        handle.write(str(os.nice(0)))


@pytest.mark.parametrize("background", [False, True])
def test_background_children_yield_the_cpu(tmp_path: Path, background: bool) -> None:
    reported = tmp_path / "niceness"

    exit_code = run_child(
        report_niceness, (str(reported),), "niceness", background=background
    )

    assert exit_code == 0
    ours = os.nice(0)
    expected = min(ours + BACKGROUND_NICENESS, 19) if background else ours
    assert int(reported.read_text()) == expected


def test_a_background_supervised_child_yields_the_cpu(tmp_path: Path) -> None:
    reported = tmp_path / "niceness"
    supervisor = ChildSupervisor(
        report_niceness,
        (str(reported),),
        "niceness",
        until_success=True,
        background=True,
    )

    supervisor.start()
    supervisor._thread.join(30)

    assert int(reported.read_text()) == min(os.nice(0) + BACKGROUND_NICENESS, 19)


def test_a_stop_while_the_child_starts_stops_it() -> None:
    # Stopped at once: the supervisor thread is making or starting the
    # child meanwhile, or has not begun; whichever, no child outlives it.
    for attempt in range(5):
        supervisor = ChildSupervisor(obedient, (), f"quick-{attempt}", 10.0)
        supervisor.start()
        time.sleep(0.01 * attempt)

        supervisor.stop()

        assert not supervisor._thread.is_alive()
        child = supervisor._child
        assert child is None or child.exitcode == -signal.SIGTERM
