"""Under systemd (Type=notify) the service says when it is ready, beats the
watchdog while its accept loop turns, and says when it stops."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.conftest import Appliance


def test_ready_heartbeat_and_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a beat every 0.5 s
    directory = tmp_path / "node"
    directory.mkdir()
    appliance = Appliance(directory, {"replication": {"enabled": False}, "web": {}})
    messages: list[str] = []
    try:
        appliance.start()
        # Ready comes once the HTTP server answers: its child takes seconds.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            messages.count("WATCHDOG=1") < 3 or "READY=1" not in messages
        ):
            try:
                messages += receiver.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
    finally:
        appliance.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("STOPPING=1" in m for m in messages):
        try:
            messages += receiver.recv(4096).decode().split("\n")
        except TimeoutError:
            continue
    receiver.close()

    assert "READY=1" in messages
    assert any(m.startswith("STATUS=serving DICOM on 127.0.0.1:") for m in messages)
    # The log says what systemd's status says: every address, HTTP's too.
    serving = next(m for m in messages if m.startswith("STATUS=serving"))
    assert f"ready: {serving.removeprefix('STATUS=')}" in appliance.log()
    assert ", HTTP on 127.0.0.1:" in serving
    assert messages.count("WATCHDOG=1") >= 3
    assert "STOPPING=1" in messages
    # The heartbeat starts with the accept loop; READY follows once HTTP
    # answers, so beats may come before it (sd_notify allows that).
