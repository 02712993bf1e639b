"""``appliance serve`` with the HL7 listener on: python-hl7's ``mllp_send``
books appointments that ``appliance prefetch appointments`` then shows, the
listener comes back after its process dies, and a port in use stops the
start with a reason."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import Appliance, free_port
from tests.hl7_samples import orm, siu

MLLP_SEND = Path(sys.executable).parent / "mllp_send"


def send(port: int, text: str, folder: Path) -> list[list[str]]:
    """The MSA segments of the ACKs mllp_send got, as fields."""
    batch = folder / "batch.hl7"
    batch.write_text(text)
    sent = subprocess.run(
        [
            str(MLLP_SEND),
            "--loose",
            "--file",
            str(batch),
            "--port",
            str(port),
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = sent.stdout.replace("\r", "\n").split("\n")
    return [line.split("|") for line in lines if line.startswith("MSA|")]


def hl7_children(appliance: Appliance, port: int) -> list[int]:
    """The PIDs of the service's children that hold the HL7 port open:
    the HL7 process, which got the bound socket from the listener."""
    assert appliance.process is not None
    found = []
    for child in psutil.Process(appliance.process.pid).children():
        try:
            held = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.laddr and c.laddr.port == port and c.status == "LISTEN" for c in held):
            found.append(child.pid)
    return found


def wait_for(condition: Callable[[], object], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_appointments_over_mllp_reach_the_catalog(
    appliance_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    appliance = appliance_factory(
        {"hl7": {"enabled": True, "port": port}, "prefetch": {"enabled": False}}
    ).start()
    wait_for(lambda: "HL7 (MLLP) listening on" in appliance.log())

    acks = send(port, siu(control_id="E1") + "\n" + orm(control_id="E2"), tmp_path)
    listed = json.loads(
        appliance.cli("prefetch", "appointments", "--all", "--json").stdout
    )

    assert [ack[1:3] for ack in acks] == [["AA", "E1"], ["AA", "E2"]]
    assert {a["key"] for a in listed} == {"appointment:APT1001", "order:ORD5001"}


def test_the_listener_comes_back_after_its_process_dies(
    appliance_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    appliance = appliance_factory({"hl7": {"enabled": True, "port": port}}).start()
    wait_for(lambda: bool(hl7_children(appliance, port)))
    (first,) = hl7_children(appliance, port)

    os.kill(first, signal.SIGKILL)
    # A child that died young is started again after a pause of 10 s.
    wait_for(lambda: hl7_children(appliance, port) not in ([], [first]))
    acks = send(port, siu(control_id="AFTER"), tmp_path)

    assert [ack[1:3] for ack in acks] == [["AA", "AFTER"]]
    assert "hl7 process ended" in appliance.log()


def test_a_taken_hl7_port_stops_the_start_with_a_reason(
    appliance_factory: Callable[..., Appliance],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        appliance = appliance_factory({"hl7": {"enabled": True, "port": port}})

        with pytest.raises(RuntimeError) as failed:
            appliance.start()

    assert f"cannot listen for HL7 on 127.0.0.1:{port}" in str(failed.value)
