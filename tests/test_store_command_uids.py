"""Non-conformant UIDs in the C-STORE command itself, sent byte by byte.

A UID with letters is stored as it is, with the one WARNING line of the
archive's own (which names the UID); pynetdicom's two lines about the
same UID, without the peer, are not logged. A UID longer than 64
characters, which pynetdicom cannot decode into its request, is read
without it and refused with 0x0117 (Invalid SOP Instance) and one WARNING
line, where the association used to be aborted; the response goes without
the UID.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests import dicom_client as client
from tests.conftest import Appliance, incoming_files, started
from tests.test_store_wire import SUCCESS, data_set, send_store

INVALID_SOP_INSTANCE = 0x0117
DOES_NOT_MATCH = 0xA900


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("command-uids")
    with started(root / "appliance") as node:
        yield node


def _problems(appliance: Appliance, start: int) -> list[str]:
    """Log lines since ``start`` but the association's closing line, once
    that line is there."""
    deadline = time.monotonic() + 20
    while "association from WIRE" not in appliance.log()[start:]:
        assert time.monotonic() < deadline, appliance.log()[start:]
        time.sleep(0.05)
    log = appliance.log()[start:]
    assert "Traceback" not in log
    return [line for line in log.splitlines() if " INFO " not in line]


def test_a_uid_with_letters_is_stored_with_one_line(appliance: Appliance) -> None:
    uid = f"1.2.826.0.1.3680043.8.498.{int(time.time())}.abc"
    start = len(appliance.log())
    assert send_store(appliance.port, uid.encode(), [data_set(uid)]) == SUCCESS
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert "non-conformant SOPInstanceUID" in problems[0]


def test_a_uid_longer_than_64_characters_is_refused_with_one_line(
    appliance: Appliance,
) -> None:
    uid = f"1.2.826.0.1.3680043.8.498.{int(time.time())}." + "1" * 50
    assert len(uid) > 64
    objects = appliance.data_dir / "online" / "objects"
    before = set(objects.rglob("*.dcm"))
    start = len(appliance.log())
    status = send_store(appliance.port, uid.encode(), [data_set(uid)])
    assert status == INVALID_SOP_INSTANCE
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert "from WIRE@127.0.0.1" in problems[0]
    assert f"SOPInstanceUID is {len(uid)} characters long, over 64" in problems[0]
    assert incoming_files(appliance.data_dir / "online") == []
    assert set(objects.rglob("*.dcm")) == before
    assert client.echo(appliance.port) == 0


def test_a_uid_of_two_values_is_refused_with_one_line(appliance: Appliance) -> None:
    """The request names two instances, the data set is one of them: the
    association was aborted, where the sender is owed a status."""
    uid = f"1.2.826.0.1.3680043.8.498.{int(time.time())}.2"
    objects = appliance.data_dir / "online" / "objects"
    before = set(objects.rglob("*.dcm"))
    start = len(appliance.log())
    sent = f"{uid}\\1.2.3".encode()
    assert send_store(appliance.port, sent, [data_set(uid)]) == DOES_NOT_MATCH
    problems = _problems(appliance, start)
    assert len(problems) == 1, problems
    assert f"refused instance {uid}\\1.2.3 from WIRE@127.0.0.1" in problems[0]
    assert incoming_files(appliance.data_dir / "online") == []
    assert set(objects.rglob("*.dcm")) == before
    assert client.echo(appliance.port) == 0
