"""pynetdicom as a real DICOM client of the appliance, for the tests."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, StoragePresentationContexts, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.dicom.retrieve import keep_responses_for_the_sender

CLIENT_AE = "TESTCLIENT"
STUDY_FIND = StudyRootQueryRetrieveInformationModelFind
PATIENT_FIND = PatientRootQueryRetrieveInformationModelFind
STUDY_GET = StudyRootQueryRetrieveInformationModelGet
STUDY_MOVE = StudyRootQueryRetrieveInformationModelMove


def file_meta(path: Path) -> Dataset:
    return pydicom.filereader.read_file_meta_info(path)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta: what goes on the wire."""
    with open(path, "rb") as handle:
        pydicom.filereader.read_preamble(handle, False)
        pydicom.filereader._read_file_meta_info(handle)
        return handle.read()


@contextmanager
def raw_sending() -> Iterator[None]:
    """Send files as their stored bytes (no decode and re-encode)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@contextmanager
def associate(
    port: int,
    contexts: list[tuple[str, list[str]]],
    ae_title: str = CLIENT_AE,
    called: str = "APPLIANCE",
    handlers: list | None = None,
    roles: list | None = None,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> Iterator[Association]:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntaxes in contexts:
        # An empty list means pynetdicom's default transfer syntaxes.
        ae.add_requested_context(abstract, syntaxes or None)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        evt_handlers=handlers or [],
        ext_neg=roles or [],
        tls_args=tls_args,
    )
    # pynetdicom's own reactor can take a response its sender waits for,
    # and the appliance answers fast enough to hit that now and then.
    keep_responses_for_the_sender(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store_files(
    port: int, paths: list[Path], ae_title: str = CLIENT_AE
) -> dict[Path, int | None]:
    """C-STORE each file raw, in order; returns each file's status.

    None means the instance was not accepted at all: its presentation
    context was rejected, or the appliance aborted the association (a new
    one is opened for the files after it).
    """
    results: dict[Path, int | None] = {}
    metas = {path: file_meta(path) for path in paths}
    contexts = sorted(
        {
            (str(m.get("MediaStorageSOPClassUID", "")), str(m.TransferSyntaxUID))
            for m in metas.values()
        }
    )
    requested = [(sop, [ts]) for sop, ts in contexts]
    assert len(requested) <= 128, "too many contexts for one association"
    with raw_sending():
        assoc_cm = associate(port, requested, ae_title)
        assoc = assoc_cm.__enter__()
        try:
            for path in paths:
                if not assoc.is_established:
                    assoc_cm.__exit__(None, None, None)
                    assoc_cm = associate(port, requested, ae_title)
                    assoc = assoc_cm.__enter__()
                assert assoc.is_established, "association refused"
                results[path] = _send(assoc, path)
        finally:
            assoc_cm.__exit__(None, None, None)
    return results


def _send(assoc: Association, path: Path) -> int | None:
    """The C-STORE status, or None when the appliance did not accept the
    presentation context (e.g. a DICOMDIR, which is not a network object)."""
    try:
        status = assoc.send_c_store(path)
    except ValueError:
        return None
    return int(status.Status) if "Status" in status else None


def echo(port: int, ae_title: str = CLIENT_AE) -> int | None:
    with associate(port, [(Verification, [])], ae_title) as assoc:
        if not assoc.is_established:
            return None
        return int(assoc.send_c_echo().Status)


def find(
    port: int,
    identifier: Dataset,
    model: str = STUDY_FIND,
    ae_title: str = CLIENT_AE,
) -> tuple[list[Dataset], int]:
    """Run a C-FIND; returns the matches and the final status."""
    matches: list[Dataset] = []
    final = -1
    with associate(port, [(model, [])], ae_title) as assoc:
        assert assoc.is_established
        for status, found in assoc.send_c_find(identifier, model):
            if not status:
                break
            final = int(status.Status)
            if final in (0xFF00, 0xFF01) and found is not None:
                matches.append(found)
    return matches, final


def get(
    port: int,
    identifier: Dataset,
    storage: list[tuple[str, list[str]]],
    model: str = STUDY_GET,
) -> tuple[dict[str, bytes], list[Dataset]]:
    """C-GET; returns {SOP Instance UID: raw data set bytes} and every response."""
    received: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        raw = event.request.DataSet.getvalue()
        with lock:
            received[str(event.request.AffectedSOPInstanceUID)] = raw
        return 0x0000

    roles = [build_role(sop, scp_role=True) for sop in sorted({s for s, _ in storage})]
    contexts = [(model, []), *storage]
    responses: list[Dataset] = []
    with associate(
        port, contexts, handlers=[(evt.EVT_C_STORE, on_store)], roles=roles
    ) as assoc:
        assert assoc.is_established
        for status, _identifier in assoc.send_c_get(identifier, model):
            if status:
                responses.append(status)
    return received, responses


def move(
    port: int, identifier: Dataset, destination: str, model: str = STUDY_MOVE
) -> list[Dataset]:
    responses: list[Dataset] = []
    with associate(port, [(model, [])]) as assoc:
        assert assoc.is_established
        for status, _identifier in assoc.send_c_move(identifier, destination, model):
            if status:
                responses.append(status)
    return responses


def send_a_byte_at_a_time(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` on an association's connection, each byte in a TCP
    segment (or TLS record) of its own, with a pause for the appliance to
    read it before the next comes."""
    if not isinstance(sock, ssl.SSLSocket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in data:
        sock.sendall(bytes([byte]))
        time.sleep(0.05)


def wait_until_aborted(assoc: Association, within: float = 10) -> bool:
    """Whether the appliance aborts ``assoc`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(assoc.is_aborted)


def storage_contexts_for(paths: list[Path]) -> list[tuple[str, list[str]]]:
    """One context per (SOP class, transfer syntax) of the files."""
    pairs = sorted(
        {
            (
                str(file_meta(p).MediaStorageSOPClassUID),
                str(file_meta(p).TransferSyntaxUID),
            )
            for p in paths
        }
    )
    return [(sop, [ts]) for sop, ts in pairs]


def all_storage_contexts() -> list[tuple[str, list[str]]]:
    return [(cx.abstract_syntax, []) for cx in StoragePresentationContexts]


def study_identifier(level: str = "STUDY", **keys: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


__all__ = [
    "PATIENT_FIND",
    "UID",
    "PatientRootQueryRetrieveInformationModelGet",
    "PatientRootQueryRetrieveInformationModelMove",
    "Verification",
]
