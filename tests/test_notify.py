"""The sd_notify client against a real Unix datagram socket standing in for
systemd's, by file path and in the abstract namespace."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import notify


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: collects the datagrams."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5.0)

    def receive(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        messages = []
        try:
            while True:
                messages.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5.0)
        return messages


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    # Forget a failure an earlier test left, so that the next one warns.
    monkeypatch.setattr(notify, "_failed", threading.Event())


@pytest.fixture
def systemd(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> Iterator[FakeSystemd]:
    # A short folder of its own: socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="notify-") as folder:
        path = Path(folder) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            monkeypatch.setenv("NOTIFY_SOCKET", str(path))
            yield FakeSystemd(sock)


@pytest.fixture
def abstract_systemd(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> Iterator[FakeSystemd]:
    name = f"pacs-appliance-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield FakeSystemd(sock)


# -- sending ------------------------------------------------------------------


def test_without_systemd_every_call_is_a_no_op(clean_environment: None) -> None:
    assert notify.notify("READY=1") is False
    assert notify.ready("listening") is False
    assert notify.status("busy") is False
    assert notify.stopping() is False
    assert notify.watchdog() is False


def test_ready_reaches_a_socket_named_by_path(systemd: FakeSystemd) -> None:
    assert notify.ready() is True
    assert systemd.receive() == "READY=1"


def test_ready_reaches_an_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    assert notify.ready() is True
    assert abstract_systemd.receive() == "READY=1"


def test_ready_and_stopping_carry_a_status_line(systemd: FakeSystemd) -> None:
    notify.ready("listening on 0.0.0.0:104 with 4 workers")
    notify.stopping("waiting for 2 associations")
    assert systemd.receive() == (
        "READY=1\nSTATUS=listening on 0.0.0.0:104 with 4 workers"
    )
    assert systemd.receive() == "STOPPING=1\nSTATUS=waiting for 2 associations"


def test_a_status_cannot_smuggle_another_assignment(systemd: FakeSystemd) -> None:
    notify.status("recalling\nREADY=1\r\nMAINPID=1")
    message = systemd.receive()
    assert message.count("\n") == 0
    assert message == "STATUS=recalling READY=1 MAINPID=1"


def test_watchdog_sends_the_heartbeat(systemd: FakeSystemd) -> None:
    assert notify.watchdog() is True
    assert systemd.receive() == "WATCHDOG=1"


def test_an_unreachable_socket_returns_false_and_logs_once(
    monkeypatch: pytest.MonkeyPatch,
    clean_environment: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.watchdog() is False
    assert notify.watchdog() is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


def test_a_full_queue_gives_up_instead_of_blocking(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd reads nothing: its queue fills, and then a send must return.
    monkeypatch.setattr(notify, "SEND_TIMEOUT", 0.1)
    sent: list[bool] = []

    def fill() -> None:
        while len(sent) < 100_000 and notify.status("x" * 1024):
            sent.append(True)
        sent.append(False)

    # In a thread, so that a send that blocks fails the test instead of
    # hanging it.
    filler = threading.Thread(target=fill, daemon=True)
    filler.start()
    filler.join(10)
    assert not filler.is_alive(), "a send to a full queue blocked"
    assert sent[-1] is False and len(sent) < 100_000
    assert systemd.receive().startswith("STATUS=x")  # what was queued arrives


def test_a_socket_kind_it_does_not_speak_is_ignored(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


# -- the watchdog interval ----------------------------------------------------


def test_watchdog_interval_is_read_in_seconds(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> None:
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert notify.watchdog_interval() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 60.0


@pytest.mark.parametrize("usec", ["0", "-5", "sixty", ""])
def test_a_meaningless_watchdog_value_means_no_watchdog(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None, usec: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert notify.watchdog_interval() is None


def test_the_watchdog_of_another_process_is_not_ours(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> None:
    # A worker inherits the variables, but systemd watches the listener.
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None


# -- liveness and the heartbeat -------------------------------------------------


def test_liveness_goes_stale_without_touches() -> None:
    now = [100.0]
    alive = notify.Liveness(10.0, clock=lambda: now[0])
    assert alive()
    now[0] = 109.9
    assert alive()
    now[0] = 110.0
    assert not alive()
    alive.touch()
    assert alive()


def test_liveness_refuses_a_meaningless_age() -> None:
    with pytest.raises(ValueError, match="max_age"):
        notify.Liveness(0)


def test_no_watchdog_means_no_heartbeat_thread(clean_environment: None) -> None:
    beat = notify.Heartbeat(lambda: True)
    assert beat.start() is False
    beat.stop()


def test_heartbeat_beats_at_half_the_interval(systemd: FakeSystemd) -> None:
    with notify.Heartbeat(lambda: True, interval=0.2):
        started = time.monotonic()
        beats = [systemd.receive() for _ in range(4)]
        elapsed = time.monotonic() - started
    assert beats == ["WATCHDOG=1"] * 4
    # The first beat is at once, the next three 0.1 s apart.
    assert 0.25 <= elapsed < 2.0


def test_heartbeat_takes_the_interval_from_systemd(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    beat = notify.Heartbeat(lambda: True)
    assert beat.interval == 0.2
    with beat:
        assert systemd.receive() == "WATCHDOG=1"


def test_an_unhealthy_service_withholds_the_heartbeat(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = threading.Event()
    healthy.set()
    with notify.Heartbeat(healthy.is_set, interval=0.1):
        assert systemd.receive() == "WATCHDOG=1"
        healthy.clear()
        time.sleep(0.3)  # the beat after the change, and the next ones
        systemd.pending()  # at most one beat was on its way
        time.sleep(0.3)
        assert systemd.pending() == []
        healthy.set()
        assert systemd.receive() == "WATCHDOG=1"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("heartbeat withheld" in m for m in messages) == 1
    assert sum("heartbeat resumed" in m for m in messages) == 1


def test_a_hung_loop_stops_the_heartbeat(systemd: FakeSystemd) -> None:
    alive = notify.Liveness(0.3)
    with notify.Heartbeat(alive, interval=0.1):
        for _ in range(5):  # the loop turns
            alive.touch()
            time.sleep(0.05)
        assert systemd.receive() == "WATCHDOG=1"
        time.sleep(0.5)  # the loop hangs: no touch for longer than max_age
        systemd.pending()
        time.sleep(0.3)
        assert systemd.pending() == []


def test_a_failing_health_check_counts_as_unhealthy(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("catalog gone")

    with notify.Heartbeat(broken, interval=0.1):
        time.sleep(0.3)
    assert systemd.pending() == []
    assert any("health check failed" in r.getMessage() for r in caplog.records)


def test_stop_ends_the_thread(systemd: FakeSystemd) -> None:
    beat = notify.Heartbeat(lambda: True, interval=60.0)
    assert beat.start() is True
    assert beat.start() is False  # one thread per heartbeat
    assert systemd.receive() == "WATCHDOG=1"
    started = time.monotonic()
    beat.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "systemd-watchdog" for t in threading.enumerate())
