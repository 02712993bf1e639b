"""Warnings a peer can cause at will are logged once a window per address;
the others are counted, and their number logged when the window is over."""

from __future__ import annotations

import logging
import time

import pytest

from appliance.peer_warnings import PeerWarnings

NAME = "tests.peer_warnings"
STALLED = "connections closed so"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NAME]


def test_one_line_a_window_per_address_then_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=NAME)
    clock = Clock()
    warnings = PeerWarnings(logging.getLogger(NAME), STALLED, 60.0, clock, False)

    for port in range(40000, 40004):
        warnings.warning("10.0.0.5", "connection from 10.0.0.5:%d closed", port)
        clock.now += 1
    warnings.warning("10.0.0.6", "connection from 10.0.0.6:%d closed", 50000)
    warnings.flush()  # no window is over yet
    said_in_the_window = _said(caplog)
    clock.now += 60
    warnings.flush()

    assert said_in_the_window == [
        "connection from 10.0.0.5:40000 closed",
        "connection from 10.0.0.6:50000 closed",
    ]
    # Nothing held back for 10.0.0.6: no count for it.
    assert _said(caplog)[2:] == [
        f"from 10.0.0.5: 3 more {STALLED} in 60 s, not logged one by one"
    ]


def test_a_warning_after_the_window_is_logged_after_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=NAME)
    clock = Clock()
    warnings = PeerWarnings(logging.getLogger(NAME), STALLED, 60.0, clock, False)

    warnings.warning("::1", "first")
    warnings.warning("::1", "held back")
    clock.now += 61
    warnings.warning("::1", "next window")
    clock.now += 61
    warnings.flush()
    warnings.warning("::1", "quiet window over")

    assert _said(caplog) == [
        "first",
        f"from ::1: 1 more {STALLED} in 60 s, not logged one by one",
        "next window",
        "quiet window over",
    ]


def test_the_count_comes_by_itself_when_the_window_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=NAME)
    warnings = PeerWarnings(logging.getLogger(NAME), STALLED, window=0.3)

    for _ in range(5):
        warnings.warning("10.0.0.7", "stalled")
    deadline = time.monotonic() + 10
    while len(_said(caplog)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)

    assert _said(caplog) == [
        "stalled",
        f"from 10.0.0.7: 4 more {STALLED} in 0.3 s, not logged one by one",
    ]
