"""DIMSE message fragments out of their order (PS3.8 E.2, PS3.7 6.3.1).

A message is its command's fragments, then, if the command announces one,
its data set's fragments, on the command's presentation context. A sender
that breaks the order is aborted with one log line, and the file a C-STORE
was being received into is removed: before, a command sent in the middle
of a data set left the partly received file in ``incoming/`` until the
service restarted, so that a sender could fill the online tier with them.
A C-STORE whose command announces no data set is answered with a status.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests import dicom_client as client
from tests.conftest import Appliance, incoming_files, started
from tests.test_store_wire import (
    A_ABORT,
    _uid_for,
    associate_rq,
    data_set,
    p_data,
    read_pdu,
    store_request,
)

A_ASSOCIATE_AC = 0x02
P_DATA = 0x04
CANNOT_UNDERSTAND = 0xC000
# Message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
COMMAND_LAST = 0x03
DATA_MORE = 0x00
DATA_LAST = 0x02
# (0000,0800) Command Data Set Type, US, of store_request: a data set follows.
WITH_DATA_SET = struct.pack("<HHIH", 0x0000, 0x0800, 2, 0x0001)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("store-fragments")
    with started(root / "appliance") as node:
        yield node


def _send(appliance: Appliance, pdus: list[bytes]) -> tuple[int, bytes]:
    """Send ``pdus`` on a new association; the first PDU that comes back."""
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=20) as conn:
        conn.sendall(associate_rq())
        assert read_pdu(conn)[0] == A_ASSOCIATE_AC
        for pdu in pdus:
            conn.sendall(pdu)
        return read_pdu(conn)


def _problems(appliance: Appliance, start: int) -> list[str]:
    """Log lines since ``start`` that are not the association's closing line."""
    log = appliance.log()[start:]
    assert "Traceback" not in log
    return [line for line in log.splitlines() if " INFO " not in line]


def _wait_for_close(appliance: Appliance, start: int) -> None:
    """Until the association's closing line is logged (it is the last one)."""
    deadline = time.monotonic() + 20
    while "association from WIRE" not in appliance.log()[start:]:
        assert time.monotonic() < deadline, appliance.log()[start:]
        time.sleep(0.05)


def _assert_aborted_cleanly(appliance: Appliance, start: int, reply: int) -> None:
    assert reply == A_ABORT
    _wait_for_close(appliance, start)
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert "WARNING" in problems[0] and "WIRE@127.0.0.1" in problems[0]
    assert incoming_files(appliance.data_dir / "online") == []
    assert client.echo(appliance.port) == 0


def test_a_command_in_the_middle_of_a_data_set_aborts_and_leaves_nothing(
    appliance: Appliance,
) -> None:
    first, second = _uid_for("1"), _uid_for("2")
    data = data_set(first)
    start = len(appliance.log())
    kind, _body = _send(
        appliance,
        [
            p_data(COMMAND_LAST, store_request(first.encode())),
            p_data(DATA_MORE, data[: len(data) // 2]),
            p_data(COMMAND_LAST, store_request(second.encode())),
        ],
    )
    _assert_aborted_cleanly(appliance, start, kind)


def test_two_commands_in_a_row_abort_and_leave_nothing(appliance: Appliance) -> None:
    first, second = _uid_for("3"), _uid_for("4")
    start = len(appliance.log())
    kind, _body = _send(
        appliance,
        [
            p_data(COMMAND_LAST, store_request(first.encode())),
            p_data(COMMAND_LAST, store_request(second.encode())),
        ],
    )
    _assert_aborted_cleanly(appliance, start, kind)


def test_a_data_set_before_its_command_aborts_with_one_line(
    appliance: Appliance,
) -> None:
    start = len(appliance.log())
    kind, _body = _send(appliance, [p_data(DATA_LAST, data_set(_uid_for("5")))])
    _assert_aborted_cleanly(appliance, start, kind)


def test_a_store_without_a_data_set_gets_a_status_and_keeps_the_association(
    appliance: Appliance,
) -> None:
    """Before, the handler failed on the missing file, with a traceback."""
    command = store_request(_uid_for("6").encode())
    assert WITH_DATA_SET in command
    no_data_set = WITH_DATA_SET[:-2] + struct.pack("<H", 0x0101)
    start = len(appliance.log())
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=20) as conn:
        conn.sendall(associate_rq())
        assert read_pdu(conn)[0] == A_ASSOCIATE_AC
        conn.sendall(p_data(COMMAND_LAST, command.replace(WITH_DATA_SET, no_data_set)))
        kind, body = read_pdu(conn)
        assert kind == P_DATA
        status_at = body.index(b"\x00\x00\x00\x09\x02\x00\x00\x00") + 8
        assert struct.unpack("<H", body[status_at : status_at + 2])[0] == (
            CANNOT_UNDERSTAND
        )
        # The association goes on: a whole C-STORE after it is stored.
        uid = _uid_for("7")
        conn.sendall(p_data(COMMAND_LAST, store_request(uid.encode())))
        conn.sendall(p_data(DATA_LAST, data_set(uid)))
        kind, body = read_pdu(conn)
        assert kind == P_DATA and b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00" in body
        conn.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4)
        assert read_pdu(conn)[0] == 0x06  # A-RELEASE-RP
    _wait_for_close(appliance, start)
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert "WARNING" in problems[0] and "no data set" in problems[0]
    assert incoming_files(appliance.data_dir / "online") == []
