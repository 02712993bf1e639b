"""The child supervisor: a child that stops on SIGTERM is not reported as
killed; one that ignores it is killed after the grace period."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from appliance.children import ChildSupervisor


def obedient() -> None:
    time.sleep(60)


def stubborn() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = ChildSupervisor(stubborn, (), "stubborn", stop_grace=1.0)
    supervisor.start()
    running(supervisor)

    with caplog.at_level(logging.WARNING, logger="appliance.children"):
        supervisor.stop()

    assert [r.message for r in caplog.records] == [
        "stubborn did not stop in 1 s; killed"
    ]
    assert supervisor._child.exitcode == -signal.SIGKILL
