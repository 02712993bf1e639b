"""C-GET and C-MOVE end to end, against a real ``appliance serve``.

DCMTK's getscu and movescu (with a DCMTK storescp as the destination) at
every retrieve level; pynetdicom requesters that check the pending counts,
the final status and the Failed SOP Instance UID List; destinations that
refuse some instances, refuse all, are not listening, are slow (C-CANCEL)
or are very fast (the reactor race that ``retrieve.tune_requestor``
guards against); a requester that cannot take the stored transfer syntax;
and an instance whose file went missing behind the appliance's back.

All patients, names and IDs are made up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.transport import ThreadedAssociationServer

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance, dcmtk, require_dcmtk
from tests.ports import held_port, wait_listening

CT = datasets.CT_IMAGE_STORAGE
STUDY_MOVE = client.STUDY_MOVE
STUDY_GET = client.STUDY_GET
PATIENT_MOVE = client.PatientRootQueryRetrieveInformationModelMove

SUCCESS = 0x0000
CANCELLED = 0xFE00
SOME_FAILED = 0xB000
ALL_FAILED = 0xA702
UNKNOWN_DESTINATION = 0xA801
OUT_OF_RESOURCES = 0xA700

# Destinations the appliance knows, by AE title; each gets its own port.
DESTINATIONS = ("DCMTK", "PYDEST", "PYAPP", "DOWN")
# What a stalled sub-operation leaves in the appliance log (pynetdicom's
# messages and the retrieve loop's own).
STALL_MESSAGES = (
    "unexpected",
    "DIMSE timeout",
    "no response",
    "Connection closed while waiting",
)


@dataclass
class Archive:
    """The module's appliance, what was stored in it and its destinations."""

    appliance: Appliance
    ports: dict[str, int]
    studies: dict[str, list[Path]]

    @property
    def port(self) -> int:
        return self.appliance.port

    def uids(self, label: str) -> list[str]:
        return [_sop_uid(path) for path in self.studies[label]]

    def study_uid(self, label: str) -> str:
        return _read(self.studies[label][0]).StudyInstanceUID

    def log_since(self, start: int) -> str:
        return self.appliance.log()[start:]


# -- test data -----------------------------------------------------------------


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _sop_uid(path: Path) -> str:
    return str(client.file_meta(path).MediaStorageSOPInstanceUID)


def _series(
    directory: Path,
    study: str,
    series: str,
    count: int,
    patient_id: str,
    pixel_bytes: int = 1024,
    implicit: bool = False,
) -> list[Path]:
    """``count`` made-up instances of one series, written as Part 10 files."""
    paths = []
    for number in range(1, count + 1):
        dataset = datasets.instance(
            study,
            series,
            number,
            patient_id=patient_id,
            patient_name=f"Test^{patient_id}",
            pixel_bytes=pixel_bytes,
        )
        if implicit:
            dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        paths.append(datasets.write(dataset, directory))
    return paths


def _make_studies(directory: Path) -> dict[str, list[Path]]:
    """Every study the tests retrieve, by label.

    "main" is one study of two series (3 and 2 instances); patient RTV-1
    also has the two-instance study "other". "mixed" holds explicit and
    implicit VR instances; "cancel" and "race" are many small instances.
    """
    uid = datasets.uid
    main_a = _series(directory, uid("s", "main"), uid("se", "main", 1), 3, "RTV-1")
    main_b = _series(directory, uid("s", "main"), uid("se", "main", 2), 2, "RTV-1")
    return {
        "main": main_a + main_b,
        "main_series_b": main_b,
        "other": _series(directory, uid("s", "other"), uid("se", "other"), 2, "RTV-1"),
        "mixed": _series(directory, uid("s", "mix"), uid("se", "mix", 1), 2, "RTV-2")
        + _series(
            directory, uid("s", "mix"), uid("se", "mix", 2), 2, "RTV-2", implicit=True
        ),
        "cancel": _series(
            directory, uid("s", "cancel"), uid("se", "cancel"), 100, "RTV-3", 256
        ),
        "race": _series(
            directory, uid("s", "race"), uid("se", "race"), 300, "RTV-4", 64
        ),
        "missing": _series(directory, uid("s", "miss"), uid("se", "miss"), 4, "RTV-5"),
        "nodelay": _series(directory, uid("s", "nd"), uid("se", "nd"), 4, "RTV-6"),
    }


def _store(archive: Archive) -> None:
    """Store every study: the bulk ones with storescu (Nagle off, so fast),
    the rest raw with pynetdicom, whose bytes the tests compare."""
    bulk = archive.studies["cancel"] + archive.studies["race"]
    rest = {p for paths in archive.studies.values() for p in paths} - set(bulk)
    statuses = client.store_files(archive.port, sorted(rest))
    assert set(statuses.values()) == {SUCCESS}, archive.appliance.log()[-3000:]

    if shutil.which("storescu") is None:
        statuses = client.store_files(archive.port, bulk)
        assert set(statuses.values()) == {SUCCESS}
        return
    command = ["storescu", "-aec", "APPLIANCE", "127.0.0.1", str(archive.port)]
    result = dcmtk(*command, *map(str, bulk))
    assert result.returncode == 0, result.stderr
    assert "refused instance" not in archive.appliance.log()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One appliance for the module, with every study stored over the network.

    The DIMSE timeout is short so that a lost C-STORE response shows up as
    a failed sub-operation within the test's time, not after a minute.
    """
    root = tmp_path_factory.mktemp("retrieve")
    # Held for the module: a destination listens only during its tests.
    held = {title: held_port() for title in DESTINATIONS}
    ports = {title: port.port for title, port in held.items()}
    peers = [
        {"ae_title": title, "host": "127.0.0.1", "port": port}
        for title, port in ports.items()
    ]
    directory = root / "appliance"
    directory.mkdir()
    appliance = Appliance(directory, {"timeouts": {"dimse": 20}}, peers)
    appliance.start()
    try:
        archive = Archive(appliance, ports, _make_studies(root / "source"))
        _store(archive)
        yield archive
    finally:
        appliance.stop()
        for port in held.values():
            port.release()


# -- destinations --------------------------------------------------------------


class Destination:
    """A pynetdicom Storage SCP on loopback that keeps what it receives.

    It answers ``failure`` for the SOP Instance UIDs in ``refuse`` and
    success for the rest, after sleeping ``delay`` seconds per instance and
    after ``gate`` (if given) is set.
    """

    def __init__(
        self,
        port: int,
        refuse: set[str] | None = None,
        failure: int = OUT_OF_RESOURCES,
        delay: float = 0.0,
        gate: threading.Event | None = None,
    ) -> None:
        self.port = port
        self.refuse = refuse or set()
        self.failure = failure
        self.delay = delay
        self.gate = gate
        self.received: dict[str, bytes] = {}
        self.answered: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def __enter__(self) -> Destination:
        ae = AE(ae_title="PYDEST")
        ae.add_supported_context(CT, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def __exit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    def _on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        if self.gate is not None:
            self.gate.wait(timeout=30)
        uid = str(event.request.AffectedSOPInstanceUID)
        status = self.failure if uid in self.refuse else SUCCESS
        with self._lock:
            self.answered[uid] = status
            if status == SUCCESS:
                self.received[uid] = event.request.DataSet.getvalue()
        return status


@contextlib.contextmanager
def _listener(command: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run a storage SCP program with Nagle off; stop it afterwards."""
    env = dict(os.environ, TCP_NODELAY="1")
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(process, port)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def dcmtk_storescp(port: int, out: Path | None) -> contextlib.AbstractContextManager:
    """DCMTK storescp as DCMTK: bit-preserving into ``out``, or ignoring data."""
    where = ["+B", "-od", str(out)] if out is not None else ["--ignore"]
    return _listener(["storescp", "-aet", "DCMTK", *where, str(port)], port)


def pynetdicom_storescp(port: int) -> contextlib.AbstractContextManager:
    """pynetdicom's own storescp application, receiving and ignoring data."""
    command = [sys.executable, "-m", "pynetdicom", "storescp", "-q", "--ignore"]
    return _listener([*command, "-aet", "PYAPP", str(port)], port)


# -- requesters ----------------------------------------------------------------

Response = tuple[Dataset, Dataset | None]


def _identifier(level: str, **keys: str) -> Dataset:
    return client.study_identifier(level, **keys)


def _collect(responses: Iterator[Response]) -> list[Response]:
    """Every (status, identifier) pair; a missing status fails the test."""
    collected = []
    for status, identifier in responses:
        assert status, "no response from the appliance (timeout or abort)"
        collected.append((status, identifier))
    return collected


def move(
    archive: Archive, identifier: Dataset, destination: str, model: str = STUDY_MOVE
) -> list[Response]:
    with client.associate(archive.port, [(model, [])]) as assoc:
        assert assoc.is_established
        return _collect(assoc.send_c_move(identifier, destination, model))


def get(
    archive: Archive,
    identifier: Dataset,
    storage: list[tuple[str, list[str]]],
    model: str = STUDY_GET,
) -> tuple[dict[str, bytes], list[Response]]:
    """C-GET; the raw data sets received by SOP Instance UID, and responses."""
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received[uid] = event.request.DataSet.getvalue()
        return SUCCESS

    roles = [build_role(sop, scp_role=True) for sop in sorted({s for s, _ in storage})]
    with client.associate(
        archive.port,
        [(model, []), *storage],
        handlers=[(evt.EVT_C_STORE, on_store)],
        roles=roles,
    ) as assoc:
        assert assoc.is_established
        responses = _collect(assoc.send_c_get(identifier, model))
    return received, responses


def counts(status: Dataset) -> tuple[int, int, int, int]:
    """(remaining, completed, failed, warning) of a C-GET/C-MOVE response."""
    return (
        int(status.get("NumberOfRemainingSuboperations", 0) or 0),
        int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        int(status.get("NumberOfFailedSuboperations", 0) or 0),
        int(status.get("NumberOfWarningSuboperations", 0) or 0),
    )


def failed_list(identifier: Dataset | None) -> list[str]:
    assert identifier is not None, "final response without an identifier"
    value = identifier.get("FailedSOPInstanceUIDList", [])
    return [value] if isinstance(value, str) else [str(uid) for uid in value]


def assert_pending_sequence(
    responses: list[Response], total: int, outcomes: list[bool] | None = None
) -> None:
    """One pending response after each sub-operation but the last, counting
    down. With ``outcomes`` (success of each sub-operation, in the order
    they ran) the counts must match exactly; without, each sub-operation
    must add one to either the completed or the failed count."""
    pending = [status for status, _ in responses[:-1]]
    assert [int(s.Status) for s in pending] == [0xFF00] * (total - 1)
    failed = 0
    for done, status in enumerate(pending, start=1):
        remaining, completed, now_failed, warning = counts(status)
        assert (remaining, completed + now_failed, warning) == (total - done, done, 0)
        assert now_failed - failed in (0, 1), done
        failed = now_failed
        if outcomes is not None:
            assert now_failed == outcomes[:done].count(False), done


def assert_final(
    responses: list[Response], status: int, completed: int, failed: int
) -> Dataset | None:
    """The final response's status and counts; returns its identifier."""
    final, identifier = responses[-1]
    assert int(final.Status) == status, f"0x{int(final.Status):04X}"
    assert counts(final) == (0, completed, failed, 0)
    return identifier


def received_files(directory: Path) -> dict[str, Path]:
    return {_sop_uid(path): path for path in directory.iterdir()}


def online_file(archive: Archive, uid: str) -> Path:
    """The appliance's online-tier file of one instance."""
    objects = archive.appliance.data_dir / "online" / "objects"
    for path in objects.rglob("*.dcm"):
        if _sop_uid(path) == uid:
            return path
    raise AssertionError(f"no online file for {uid}")


# -- DCMTK getscu and movescu --------------------------------------------------

LEVELS = ("STUDY", "SERIES", "IMAGE", "PATIENT")


def _level_keys(archive: Archive, level: str) -> tuple[list[str], list[Path]]:
    """The -k arguments of a DCMTK retrieve at ``level``, and the files that
    must come back."""
    main = archive.studies["main"]
    if level == "STUDY":
        keys, expected = [f"StudyInstanceUID={archive.study_uid('main')}"], main
    elif level == "SERIES":
        series = archive.studies["main_series_b"]
        keys = [
            f"StudyInstanceUID={archive.study_uid('main')}",
            f"SeriesInstanceUID={_read(series[0]).SeriesInstanceUID}",
        ]
        expected = series
    elif level == "IMAGE":
        chosen = _read(main[1])
        keys = [
            f"StudyInstanceUID={chosen.StudyInstanceUID}",
            f"SeriesInstanceUID={chosen.SeriesInstanceUID}",
            f"SOPInstanceUID={chosen.SOPInstanceUID}",
        ]
        expected = [main[1]]
    else:
        keys = ["PatientID=RTV-1"]
        expected = main + archive.studies["other"]
    return [f"QueryRetrieveLevel={level}", *keys], expected


def _key_args(keys: list[str]) -> list[str]:
    return [arg for key in keys for arg in ("-k", key)]


def assert_same_data_sets(received: dict[str, Path], expected: list[Path]) -> None:
    assert set(received) == {_sop_uid(path) for path in expected}
    for path in expected:
        got = client.dataset_bytes(received[_sop_uid(path)])
        assert got == client.dataset_bytes(path), path.name


@pytest.mark.parametrize("level", LEVELS)
def test_getscu_brings_back_identical_data_sets(
    archive: Archive, level: str, tmp_path: Path
) -> None:
    require_dcmtk()
    keys, expected = _level_keys(archive, level)
    model = "-P" if level == "PATIENT" else "-S"
    result = dcmtk(
        "getscu",
        model,
        "+B",
        "-aec",
        "APPLIANCE",
        "-od",
        str(tmp_path),
        *_key_args(keys),
        "127.0.0.1",
        str(archive.port),
    )

    assert result.returncode == 0, result.stderr
    assert_same_data_sets(received_files(tmp_path), expected)


@pytest.mark.parametrize("level", LEVELS)
def test_movescu_to_storescp_delivers_identical_data_sets(
    archive: Archive, level: str, tmp_path: Path
) -> None:
    require_dcmtk()
    keys, expected = _level_keys(archive, level)
    model = "-P" if level == "PATIENT" else "-S"
    with dcmtk_storescp(archive.ports["DCMTK"], tmp_path):
        result = dcmtk(
            "movescu",
            "-v",
            model,
            "-aec",
            "APPLIANCE",
            "-aem",
            "DCMTK",
            *_key_args(keys),
            "127.0.0.1",
            str(archive.port),
        )

    assert result.returncode == 0, result.stderr
    assert "Received Final Move Response (Success)" in result.stderr
    assert_same_data_sets(received_files(tmp_path), expected)


# -- pynetdicom: counts, statuses, failures ------------------------------------


def test_c_get_pending_counts_then_success(archive: Archive) -> None:
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("main"))
    storage = [(CT, [ExplicitVRLittleEndian])]
    received, responses = get(archive, identifier, storage)

    assert_pending_sequence(responses, 5, [True] * 5)
    assert assert_final(responses, SUCCESS, 5, 0) is None
    assert sorted(received) == sorted(archive.uids("main"))


def test_c_move_pending_counts_then_success(archive: Archive) -> None:
    identifier = _identifier("PATIENT", PatientID="RTV-1")
    with Destination(archive.ports["PYDEST"]) as destination:
        responses = move(archive, identifier, "PYDEST", PATIENT_MOVE)

    assert_pending_sequence(responses, 7, [True] * 7)
    assert_final(responses, SUCCESS, 7, 0)
    expected = archive.studies["main"] + archive.studies["other"]
    assert sorted(destination.received) == sorted(map(_sop_uid, expected))
    for path in expected:
        assert destination.received[_sop_uid(path)] == client.dataset_bytes(path)


def test_unknown_destination_keeps_the_association(archive: Archive) -> None:
    start = len(archive.appliance.log())
    study = archive.study_uid("main")
    identifier = _identifier("STUDY", StudyInstanceUID=study)
    contexts = [(STUDY_MOVE, []), (client.STUDY_FIND, [])]

    with (
        Destination(archive.ports["PYDEST"]) as destination,
        client.associate(archive.port, contexts) as assoc,
    ):
        refused = _collect(assoc.send_c_move(identifier, "NOWHERE", STUDY_MOVE))
        assert assoc.is_established
        query = _identifier("STUDY", StudyInstanceUID=study)
        found = _collect(assoc.send_c_find(query, client.STUDY_FIND))
        moved = _collect(assoc.send_c_move(identifier, "PYDEST", STUDY_MOVE))

    assert len(refused) == 1
    assert int(refused[0][0].Status) == UNKNOWN_DESTINATION
    assert refused[0][0].get("ErrorComment")
    assert "unknown destination 'NOWHERE'" in archive.log_since(start)
    assert [int(s.Status) for s, _ in found] == [0xFF00, SUCCESS]
    assert found[0][1].StudyInstanceUID == study
    assert_final(moved, SUCCESS, 5, 0)
    assert len(destination.received) == 5


def test_some_sub_operations_refused_by_the_destination(archive: Archive) -> None:
    uids = archive.uids("main")
    refuse = {uids[1], uids[3]}
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("main"))
    with Destination(archive.ports["PYDEST"], refuse) as destination:
        responses = move(archive, identifier, "PYDEST")

    outcomes = [status == SUCCESS for status in destination.answered.values()]
    assert outcomes.count(False) == 2
    assert_pending_sequence(responses, 5, outcomes)
    failed = failed_list(assert_final(responses, SOME_FAILED, 3, 2))
    assert sorted(failed) == sorted(refuse)
    assert set(destination.received) == set(uids) - refuse


def test_every_sub_operation_refused_by_the_destination(archive: Archive) -> None:
    uids = archive.uids("main")
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("main"))
    with Destination(archive.ports["PYDEST"], set(uids), failure=0xC123) as dest:
        responses = move(archive, identifier, "PYDEST")

    assert_pending_sequence(responses, 5, [False] * 5)
    assert set(dest.answered) == set(uids)
    failed = failed_list(assert_final(responses, ALL_FAILED, 0, 5))
    assert sorted(failed) == sorted(uids)


def test_destination_not_listening(archive: Archive) -> None:
    start = len(archive.appliance.log())
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("main"))
    responses = move(archive, identifier, "DOWN")

    assert len(responses) == 1
    failed = failed_list(assert_final(responses, ALL_FAILED, 0, 5))
    assert sorted(failed) == sorted(archive.uids("main"))
    line = "cannot associate with DOWN at 127.0.0.1:%d: no connection (refused"
    assert line % archive.ports["DOWN"] in archive.log_since(start)


def test_destination_that_rejects_the_association(archive: Archive) -> None:
    """A program on the destination's port that is not the destination
    (another AE title) rejects the sub-association: all fail, and the
    log says it was a rejection, not a refused connection."""
    start = len(archive.appliance.log())
    ae = AE(ae_title="STRANGER")
    ae.require_called_aet = True
    ae.add_supported_context(CT, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", archive.ports["PYAPP"]), block=False)
    try:
        identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("main"))
        responses = move(archive, identifier, "PYAPP")
    finally:
        server.shutdown()

    assert_final(responses, ALL_FAILED, 0, 5)
    log = archive.log_since(start)
    assert "cannot associate with PYAPP" in log
    assert "rejected: Called AE title not recognised" in log


def test_c_get_without_a_context_for_the_stored_syntax(archive: Archive) -> None:
    """No transcoding: a requester that only takes implicit VR gets the
    implicit VR instances, and the explicit VR ones fail."""
    start = len(archive.appliance.log())
    uids = archive.uids("mixed")
    explicit, implicit = uids[:2], uids[2:]
    storage = [(CT, [ImplicitVRLittleEndian])]
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("mixed"))
    received, responses = get(archive, identifier, storage)

    failed = failed_list(assert_final(responses, SOME_FAILED, 2, 2))
    assert sorted(failed) == sorted(explicit)
    assert sorted(received) == sorted(implicit)
    for path in archive.studies["mixed"][2:]:
        assert received[_sop_uid(path)] == client.dataset_bytes(path)
    log = archive.log_since(start)
    assert all(f"C-STORE sub-operation for {uid}" in log for uid in explicit)
    # One line each, a warning: the peer declined a syntax, the archive is
    # not at fault; pynetdicom's own error line is not repeated.
    refusals = [line for line in log.splitlines() if "No presentation" in line]
    assert len(refusals) == len(explicit)
    assert all(" WARNING appliance.dicom.retrieve" in line for line in refusals)


def test_c_get_with_no_usable_context_fails_all(archive: Archive) -> None:
    storage = [(CT, [ImplicitVRLittleEndian])]
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("main"))
    received, responses = get(archive, identifier, storage)

    failed = failed_list(assert_final(responses, ALL_FAILED, 0, 5))
    assert sorted(failed) == sorted(archive.uids("main"))
    assert not received


# -- C-CANCEL ------------------------------------------------------------------


def test_c_cancel_stops_a_move_to_a_slow_destination(archive: Archive) -> None:
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("cancel"))
    responses: list[Response] = []
    with (
        Destination(archive.ports["PYDEST"], delay=0.1) as destination,
        client.associate(archive.port, [(STUDY_MOVE, [])]) as assoc,
    ):
        context_id = assoc.accepted_contexts[0].context_id
        for status, found in assoc.send_c_move(identifier, "PYDEST", STUDY_MOVE, 7):
            assert status, "no response from the appliance"
            if not responses:
                assoc.send_c_cancel(7, context_id)
            responses.append((status, found))

    final = responses[-1][0]
    assert int(final.Status) == CANCELLED
    remaining, completed, failed, warning = counts(final)
    assert (failed, warning) == (0, 0)
    assert remaining + completed == 100
    assert completed == len(destination.received) == len(responses) - 1
    assert completed < 30


# -- the fast destination race, and TCP_NODELAY --------------------------------


def _assert_quick_clean_move(archive: Archive, destination: str) -> None:
    """300 sub-operations to a fast destination, each answered in time."""
    start = len(archive.appliance.log())
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("race"))
    began = time.monotonic()
    responses = move(archive, identifier, destination)
    elapsed = time.monotonic() - began

    assert_final(responses, SUCCESS, 300, 0)
    log = archive.log_since(start)
    stalls = [
        line for line in log.splitlines() if any(m in line for m in STALL_MESSAGES)
    ]
    assert not stalls, stalls[:5]
    assert elapsed < 60


def test_fast_dcmtk_destination_gets_every_instance(archive: Archive) -> None:
    require_dcmtk()
    with dcmtk_storescp(archive.ports["DCMTK"], None):
        for _ in range(4):
            _assert_quick_clean_move(archive, "DCMTK")


def test_fast_pynetdicom_destination_gets_every_instance(archive: Archive) -> None:
    with pynetdicom_storescp(archive.ports["PYAPP"]):
        for _ in range(2):
            _assert_quick_clean_move(archive, "PYAPP")


def _outgoing_socket(appliance: Appliance, port: int) -> tuple[int, int] | None:
    """(pid, fd) of an appliance process's established connection to ``port``."""
    assert appliance.process is not None
    root = psutil.Process(appliance.process.pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            for connection in process.net_connections(kind="tcp"):
                remote = connection.raddr
                if remote and remote.port == port and connection.fd >= 0:
                    return process.pid, connection.fd
    return None


def _nodelay_of(pid: int, fd: int) -> int:
    """TCP_NODELAY of another process's socket, via pidfd_getfd(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if copy < 0:
            pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(pidfd)
    with socket.socket(fileno=copy) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_outgoing_move_socket_has_nodelay(archive: Archive) -> None:
    """Read the option from the appliance's own socket while a C-MOVE to a
    destination that holds back its answer keeps the association open
    (``ss`` does not show the option)."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open on this platform")
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("nodelay"))
    port = archive.ports["PYDEST"]
    found: list[tuple[int, int]] = []
    moved: list[list[Response]] = []
    gate = threading.Event()
    with Destination(port, gate=gate):
        mover = threading.Thread(
            target=lambda: moved.append(move(archive, identifier, "PYDEST"))
        )
        mover.start()
        deadline = time.monotonic() + 20
        nodelay = None
        try:
            # The option is set just after the connection is made: a busy
            # machine may show the socket in between.
            while nodelay != 1 and time.monotonic() < deadline:
                socket_of = _outgoing_socket(archive.appliance, port)
                found += [socket_of] if socket_of else []
                nodelay = _nodelay_of(*found[-1]) if found else None
                time.sleep(0.05)
        finally:
            gate.set()
            mover.join(timeout=30)

    assert found, "no outgoing connection seen"
    assert nodelay == 1
    assert moved, "the C-MOVE did not finish"
    assert_final(moved[0], SUCCESS, 4, 0)


# -- a file missing from the online tier ---------------------------------------


def test_missing_file_fails_its_sub_operation_only(archive: Archive) -> None:
    start = len(archive.appliance.log())
    uids = archive.uids("missing")
    online_file(archive, uids[2]).unlink()
    identifier = _identifier("STUDY", StudyInstanceUID=archive.study_uid("missing"))

    with Destination(archive.ports["PYDEST"]) as destination:
        moved = move(archive, identifier, "PYDEST")
    storage = [(CT, [ExplicitVRLittleEndian])]
    received, got = get(archive, identifier, storage)

    for responses in (moved, got):
        assert_pending_sequence(responses, 4)
        assert failed_list(assert_final(responses, SOME_FAILED, 3, 1)) == [uids[2]]
    others = set(uids) - {uids[2]}
    assert set(destination.received) == set(received) == others
    log = archive.log_since(start)
    assert log.count(f"C-STORE sub-operation for {uids[2]}") == 2
    assert client.echo(archive.port) == SUCCESS
