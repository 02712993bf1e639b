"""Ports for destinations that listen late: held until their server binds
them, and a server that cannot bind its port is an error of the test, not
a C-MOVE that fails every sub-operation. A server that stops and starts
again keeps its port held in between."""

from __future__ import annotations

import gc
import socket
import subprocess
import sys

import pytest

from tests import ports
from tests.conftest import require_dcmtk
from tests.test_retrieve import dcmtk_storescp, pynetdicom_storescp


def test_a_held_port_cannot_be_taken_by_a_plain_bind() -> None:
    held = ports.held_port()
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", held.port))
        assert not ports._bindable(held.port)
    finally:
        held.release()
    assert ports._bindable(held.port)


def test_a_held_port_is_not_handed_out_to_another_process() -> None:
    """Another test run asks this module for a port while one is held: the
    held one is skipped even in the worker block it was drawn from."""
    held = ports.held_port()
    try:
        script = (
            "from tests import ports\n"
            f"print(ports._bindable({held.port}))\n"
            "print(ports.free_port())\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        bindable, handed_out = done.stdout.split()
        assert bindable == "False"
        assert int(handed_out) != held.port
    finally:
        held.release()


def test_a_held_port_refuses_connections_until_its_server_listens() -> None:
    require_dcmtk()
    held = ports.held_port()
    try:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", held.port)) != 0
        with dcmtk_storescp(held.port, None) as process:
            assert ports.listens(process.pid, held.port)
        with pynetdicom_storescp(held.port) as process:
            assert ports.listens(process.pid, held.port)
    finally:
        held.release()


def test_a_destination_whose_port_another_program_holds_is_an_error() -> None:
    """storescp exits when the port is taken; connections are still
    accepted there, by the other program, and must not pass for storescp."""
    require_dcmtk()
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        with (
            pytest.raises(AssertionError, match="held by another program"),
            dcmtk_storescp(port, None),
        ):
            pass


class _Server:
    """Stands for a server that listens on its port, stops and listens
    again, as the appliance and sshd of the tests do."""

    def __init__(self) -> None:
        self.port = ports.port_for(self)

    def listen(self) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        return listener


def test_a_port_for_a_server_is_held_between_its_starts_until_it_is_gone() -> None:
    server = _Server()
    port = server.port
    for _ in range(2):
        with server.listen(), socket.create_connection(("127.0.0.1", port)):
            pass
        assert not ports._bindable(port)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0

    del server
    gc.collect()
    assert ports._bindable(port)
