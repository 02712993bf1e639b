"""An association left idle longer than ``timeouts.network``.

It is aborted, and the one line that closes it says it was idle; before,
pynetdicom logged an ERROR of its own first ('Network timeout reached'),
naming neither the peer nor the association.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests import dicom_client as client
from tests.conftest import Appliance, started
from tests.test_store_wire import associate_rq, read_pdu

A_ASSOCIATE_AC = 0x02
A_ABORT = 0x07


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("idle")
    with started(root / "appliance", {"timeouts": {"network": 1.0}}) as node:
        yield node


def test_an_idle_association_is_aborted_with_one_line(appliance: Appliance) -> None:
    start = len(appliance.log())
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=30) as conn:
        conn.sendall(associate_rq())
        assert read_pdu(conn)[0] == A_ASSOCIATE_AC
        # Nothing more is sent: the appliance gives up on the association.
        assert read_pdu(conn)[0] == A_ABORT

    deadline = time.monotonic() + 20
    while "association from WIRE" not in appliance.log()[start:]:
        assert time.monotonic() < deadline, appliance.log()[start:]
        time.sleep(0.05)
    # The service's other parts may still be logging their start.
    lines = [
        line
        for line in appliance.log()[start:].splitlines()
        if "pynetdicom" in line or "appliance.dicom" in line
    ]
    assert len(lines) == 1, lines
    assert (
        " INFO " in lines[0] and "idle" in lines[0] and "timeouts.network" in lines[0]
    )
    assert client.echo(appliance.port) == 0
