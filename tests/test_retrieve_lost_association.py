"""A retrieve whose sub-operations' association ends in the middle.

A C-MOVE destination that aborts its association after a few instances, a
C-GET requester that aborts its own: the sub-operations stop there, with
one log line saying so. Before, every instance left was tried and logged
on an association that was gone, and on the requester's own association
each waited out the DIMSE timeout: a C-GET of a large study held a thread
for hours. The C-MOVE requester gets a final response counting the
instances not sent as failed; a C-MOVE whose requester aborted stops
sending, too. The service goes on.

All patients, names and IDs are made up.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance
from tests.ports import held_port

CT = datasets.CT_IMAGE_STORAGE
PENDING = 0xFF00
SOME_FAILED = 0xB000
INSTANCES = 12
# The sub-operation during which the other end aborts (1-based).
ABORT_AT = 3
# A-ABORT, service-user source, no reason.
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


class Archive:
    def __init__(self, appliance: Appliance, destination_port: int, study: str):
        self.appliance = appliance
        self.destination_port = destination_port
        self.study = study
        self.uids: list[str] = []

    def wait_for_log(self, start: int, needle: str) -> str:
        deadline = time.monotonic() + 30
        while needle not in (log := self.appliance.log()[start:]):
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
        return log


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("lost-association")
    # Held for the module: the destination listens only during its tests.
    destination = held_port()
    port = destination.port
    peers = [{"ae_title": "ABORTER", "host": "127.0.0.1", "port": port}]
    node = Appliance(root / "appliance", {"replication": {"enabled": False}}, peers)
    node.directory.mkdir()
    node.start()
    try:
        study = datasets.uid("study", "lost-association")
        paths = datasets.study_files(
            root / "files", "lost-association", INSTANCES, patient_id="LOST-01"
        )
        assert set(client.store_files(node.port, paths).values()) == {0}
        archive = Archive(node, port, study)
        archive.uids = [
            str(client.file_meta(p).MediaStorageSOPInstanceUID) for p in paths
        ]
        yield archive
    finally:
        node.stop()
        destination.release()


def _identifier(study: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return identifier


def _aborting_on(received: list[str], lock: threading.Lock) -> evt.EventHandlerType:
    """A C-STORE handler that aborts its association at the ABORT_AT-th,
    before answering it: it sends an A-ABORT (PS3.8 9.3.8) and waits until
    the appliance has closed the connection.

    The PDU is written here: pynetdicom's own abort waits for the
    association's reactor, which is the thread running this handler.
    """

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(str(event.request.AffectedSOPInstanceUID))
            count = len(received)
        if count == ABORT_AT:
            connection = event.assoc.dul.socket.socket
            connection.sendall(A_ABORT)
            select.select([connection], [], [], 30)
        return 0x0000

    return on_store


def _problems(log: str) -> list[str]:
    assert "Traceback" not in log
    return [line for line in log.splitlines() if " INFO " not in line]


def test_a_destination_that_aborts_ends_the_move_with_one_line(
    archive: Archive,
) -> None:
    received: list[str] = []
    ae = AE(ae_title="ABORTER")
    ae.add_supported_context(CT, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", archive.destination_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, _aborting_on(received, threading.Lock()))],
    )
    start = len(archive.appliance.log())
    try:
        responses = client.move(
            archive.appliance.port, _identifier(archive.study), "ABORTER"
        )
    finally:
        server.shutdown()

    final = responses[-1]
    # The instances before the abort were answered; the one it interrupted
    # and those after it were not sent.
    completed = ABORT_AT - 1
    assert int(final.Status) == SOME_FAILED
    assert final.NumberOfCompletedSuboperations == completed
    assert final.NumberOfFailedSuboperations == INSTANCES - completed
    assert final.NumberOfWarningSuboperations == 0
    assert [int(r.Status) for r in responses[:-1]] == [PENDING] * (ABORT_AT - 1)
    assert len(received) == ABORT_AT and set(received) <= set(archive.uids)
    log = archive.wait_for_log(start, "association from TESTCLIENT")
    problems = _problems(log)
    assert len(problems) == 1, problems
    assert "ABORTER" in problems[0] and "ended" in problems[0]
    assert client.echo(archive.appliance.port) == 0


def test_a_get_requester_that_aborts_ends_the_get_with_one_line(
    archive: Archive,
) -> None:
    received: list[str] = []
    roles = [build_role(CT, scp_role=True)]
    handlers = [(evt.EVT_C_STORE, _aborting_on(received, threading.Lock()))]
    start = len(archive.appliance.log())
    with client.associate(
        archive.appliance.port,
        [(client.STUDY_GET, []), (CT, [ExplicitVRLittleEndian])],
        handlers=handlers,
        roles=roles,
    ) as assoc:
        assert assoc.is_established
        for _response in assoc.send_c_get(_identifier(archive.study), client.STUDY_GET):
            pass

    log = archive.wait_for_log(start, "C-GET from TESTCLIENT")
    assert len(received) == ABORT_AT
    summary = [line for line in log.splitlines() if "C-GET from" in line]
    assert summary[0].endswith(
        f"{ABORT_AT - 1} sent, {INSTANCES - ABORT_AT + 1} failed, 0 not attempted"
    )
    problems = _problems(log)
    assert len(problems) == 1, problems
    assert "TESTCLIENT" in problems[0] and "its association ended" in problems[0]
    assert client.echo(archive.appliance.port) == 0


def test_a_move_requester_that_aborts_stops_the_sub_operations(
    archive: Archive,
) -> None:
    """Else a caller could start any number of moves, each going on after
    its association, and so its place under node.max_associations, is gone."""
    aborted = threading.Event()
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == ABORT_AT:
            aborted.wait(timeout=30)
        return 0x0000

    ae = AE(ae_title="ABORTER")
    ae.add_supported_context(CT, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", archive.destination_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    start = len(archive.appliance.log())
    try:
        with client.associate(
            archive.appliance.port, [(client.STUDY_MOVE, [])]
        ) as assoc:
            responses = assoc.send_c_move(
                _identifier(archive.study), "ABORTER", client.STUDY_MOVE
            )
            for pending, _response in enumerate(responses, 1):
                if pending == ABORT_AT - 1:
                    assoc.dul.socket.socket.sendall(A_ABORT)
                    break
            # The appliance's own line for the end of the requester's
            # association, logged while the move still waits on ABORTER.
            archive.wait_for_log(start, "association from TESTCLIENT")
            aborted.set()
        log = archive.wait_for_log(start, "C-MOVE from TESTCLIENT")
    finally:
        aborted.set()
        server.shutdown()

    assert len(received) == ABORT_AT
    problems = _problems(log)
    assert len(problems) == 1, problems
    assert "its association ended" in problems[0]
    assert client.echo(archive.appliance.port) == 0
