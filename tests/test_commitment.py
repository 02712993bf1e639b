"""Storage Commitment Push Model SCP against a real ``appliance serve``.

The requester is pynetdicom: it sends the N-ACTION as SCU and runs its own
SCP on a free loopback port, registered as a [[peers]] entry, for reports
that come on a new association (over TLS when the appliance's peer entry
says ``tls = true``).
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from appliance.catalog import commitments
from appliance.catalog.commitments import Transaction
from appliance.catalog.store import Catalog
from appliance.commitment import messages
from appliance.commitment.process import Reporter
from appliance.config import Config, Peer
from appliance.config import defaults as config_defaults
from appliance.config import load as config_load
from appliance.errors import ConfigError
from tests import dicom_client as client
from tests.certificates import Authority, Issued
from tests.conftest import Appliance
from tests.datasets import study_files
from tests.ports import held_port, port_for

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
MODALITY = "MODALITY"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
QUICK_RETRIES = {"retry_initial": 0.2, "retry_max": 0.5}


@dataclass
class Report:
    """One N-EVENT-REPORT the requester received."""

    event_type: int
    information: Dataset
    # "same": on the association of the request; "new": on one the
    # appliance opened.
    how: str
    calling_ae: str = ""
    # The TLS version of the association that brought it; "" without TLS.
    tls_version: str = ""
    # The common name of the certificate the appliance presented.
    client_certificate: str = ""

    @property
    def transaction_uid(self) -> str:
        return str(self.information.TransactionUID)

    def committed(self) -> set[tuple[str, str]]:
        items = self.information.get("ReferencedSOPSequence", [])
        return {_pair(item) for item in items}

    def failed(self) -> dict[tuple[str, str], int]:
        items = self.information.get("FailedSOPSequence", [])
        return {_pair(item): int(item.FailureReason) for item in items}


def _pair(item: Dataset) -> tuple[str, str]:
    return str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)


class Requester:
    """A modality asking for storage commitment, with its report SCP.

    Its port is held while it lives: the appliance knows it as a peer from
    the start, and a test may have the SCP listen late, or stop and listen
    again.
    """

    def __init__(self) -> None:
        self.port = port_for(self)
        self.reports: queue.Queue[Report] = queue.Queue()
        self._server = None

    @property
    def peer(self) -> dict[str, object]:
        return {"ae_title": MODALITY, "host": "127.0.0.1", "port": self.port}

    def listen(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Accept report associations; over TLS only, with ``ssl_context``."""
        ae = AE(ae_title=MODALITY)
        ae.add_supported_context(COMMITMENT, scu_role=False, scp_role=True)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_new_association)],
            ssl_context=ssl_context,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_new_association(self, event: evt.Event) -> tuple[int, None]:
        calling = event.assoc.requestor.ae_title.strip()
        report = Report(event.event_type, event.event_information, "new", calling)
        report.tls_version, report.client_certificate = _tls_of(event.assoc)
        self.reports.put(report)
        return 0x0000, None

    def request(
        self,
        appliance_port: int,
        information: Dataset,
        keep_open: bool = True,
        action_type: int = 1,
        instance: str = COMMITMENT_INSTANCE,
        roles: list | None = None,
    ) -> int:
        """Send an N-ACTION; with ``keep_open``, wait on the association for
        the report before releasing. The N-ACTION status."""
        ae = AE(ae_title=MODALITY)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(COMMITMENT)
        # pynetdicom's release() counts an association thread that is still
        # in a request's handler as paused: the handler's answer could then
        # follow the A-RELEASE-RQ, which pynetdicom's state machine refuses
        # with an exception in its thread. So a report is released after
        # only once its answer has gone out, and a requester that leaves at
        # once holds any report that crosses its release until the release
        # is done (its answer then goes nowhere).
        seen: list[Report] = []
        answered = threading.Event()
        released = threading.Event()

        def on_report(event: evt.Event) -> tuple[int, None]:
            report = Report(event.event_type, event.event_information, "same")
            seen.append(report)
            self.reports.put(report)
            return 0x0000, None

        def on_pdu_sent(event: evt.Event) -> None:
            if seen and isinstance(event.pdu, P_DATA_TF):
                answered.set()

        def on_report_while_leaving(_event: evt.Event) -> tuple[int, None]:
            released.wait(timeout=60)
            return 0x0110, None  # what pynetdicom answers without a handler

        handlers: list = [(evt.EVT_N_EVENT_REPORT, on_report_while_leaving)]
        if keep_open:
            handlers = [
                (evt.EVT_N_EVENT_REPORT, on_report),
                (evt.EVT_PDU_SENT, on_pdu_sent),
            ]
        assoc = ae.associate(
            "127.0.0.1",
            appliance_port,
            ae_title="APPLIANCE",
            evt_handlers=handlers,
            ext_neg=roles or [],
        )
        assert assoc.is_established
        try:
            status, _reply = assoc.send_n_action(
                information, action_type, COMMITMENT, instance
            )
            if keep_open:
                answered.wait(timeout=30)
        finally:
            assoc.release()
            released.set()
        return int(status.Status)

    def next_report(self, timeout: float = 60) -> Report:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no storage commitment report arrived") from None

    def no_report(self, wait: float) -> None:
        try:
            extra = self.reports.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected report: {extra}")


def _tls_of(assoc: Association) -> tuple[str, str]:
    """The TLS version of an association and the common name of the
    certificate its requester showed; empty strings without TLS."""
    connection = assoc.dul.socket.socket if assoc.dul.socket else None
    if not isinstance(connection, ssl.SSLSocket):
        return "", ""
    details: dict[str, Any] = dict(connection.getpeercert() or {})
    subject = details.get("subject", ())
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return str(connection.version()), ",".join(names)


def action_information(
    transaction_uid: str | None, references: list[tuple[str, str]]
) -> Dataset:
    information = Dataset()
    if transaction_uid is not None:
        information.TransactionUID = transaction_uid
    items = []
    for sop_class, uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    information.ReferencedSOPSequence = Sequence(items)
    return information


def store(appliance: Appliance, directory: Path, label: str, count: int) -> list:
    """Store ``count`` new instances; their (SOP Class, SOP Instance) UIDs."""
    files = study_files(directory / label, label, count, pixel_bytes=2_000)
    assert set(client.store_files(appliance.port, files).values()) == {0}
    return [_references(path) for path in files]


def _references(path: Path) -> tuple[str, str]:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)


def wait_for_log(appliance: Appliance, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in appliance.log():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log:\n{appliance.log()[-3000:]}")


@pytest.fixture(scope="module")
def requester() -> Iterator[Requester]:
    modality = Requester()
    modality.listen()
    yield modality
    modality.stop()


@pytest.fixture(scope="module")
def appliance(
    tmp_path_factory: pytest.TempPathFactory, requester: Requester
) -> Iterator[Appliance]:
    directory = tmp_path_factory.mktemp("commitment")
    node = Appliance(
        directory,
        {
            "migration": {"enabled": False},
            "replication": {"enabled": False},
            "commitment": QUICK_RETRIES,
        },
        peers=[requester.peer],
    )
    node.start()
    yield node
    node.stop()


@pytest.fixture(autouse=True)
def _no_leftover_reports(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "requester" in request.fixturenames:
        modality = request.getfixturevalue("requester")
        while not modality.reports.empty():
            modality.reports.get_nowait()


def test_all_stored_is_event_type_1_on_the_same_association(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "all-stored", 3)
    transaction = generate_uid()

    status = requester.request(appliance.port, action_information(transaction, stored))

    assert status == 0x0000
    report = requester.next_report()
    assert report.how == "same"
    assert report.event_type == 1
    assert report.transaction_uid == transaction
    assert report.committed() == set(stored)
    assert "FailedSOPSequence" not in report.information
    assert report.information.RetrieveAETitle == "APPLIANCE"
    requester.no_report(wait=1.0)


def test_a_requester_proposing_the_scu_role_gets_its_report_the_same_way(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "with-roles", 1)
    roles = [build_role(COMMITMENT, scu_role=True, scp_role=False)]

    status = requester.request(
        appliance.port, action_information(generate_uid(), stored), roles=roles
    )

    assert status == 0x0000
    report = requester.next_report()
    assert (report.how, report.event_type) == ("same", 1)


def test_unknown_instance_and_wrong_class_fail_with_their_reasons(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "one-unknown", 3)
    unknown = (CT_IMAGE, generate_uid())
    wrong_class = (MR_IMAGE, stored[2][1])
    references = [stored[0], unknown, stored[1], wrong_class]

    status = requester.request(
        appliance.port, action_information(generate_uid(), references)
    )

    assert status == 0x0000
    report = requester.next_report()
    assert report.how == "same"
    assert report.event_type == 2
    assert report.committed() == {stored[0], stored[1]}
    assert report.failed() == {unknown: 0x0112, wrong_class: 0x0119}


def test_an_instance_named_twice_is_reported_once(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "named-twice", 2)
    references = [stored[0], stored[1], stored[0], stored[0]]

    status = requester.request(
        appliance.port, action_information(generate_uid(), references)
    )

    assert status == 0x0000
    report = requester.next_report()
    assert report.event_type == 1
    assert _listed(report, "ReferencedSOPSequence") == stored
    assert "FailedSOPSequence" not in report.information


def test_an_instance_named_under_two_classes_only_fails(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "two-classes", 2)
    other_class = (MR_IMAGE, stored[1][1])
    references = [stored[0], stored[1], other_class, stored[1]]

    status = requester.request(
        appliance.port, action_information(generate_uid(), references)
    )

    assert status == 0x0000
    report = requester.next_report()
    assert report.event_type == 2
    assert _listed(report, "ReferencedSOPSequence") == [stored[0]]
    failed = report.information.FailedSOPSequence
    assert [(*_pair(item), int(item.FailureReason)) for item in failed] == [
        (*stored[1], 0x0119),
        (*other_class, 0x0119),
    ]


def _listed(report: Report, keyword: str) -> list[tuple[str, str]]:
    """The references of one sequence of ``report``, repeats included."""
    return [_pair(item) for item in report.information.get(keyword, [])]


def test_an_instance_whose_online_file_is_gone_is_not_committed(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    objects = appliance.data_dir / "online" / "objects"
    before = set(objects.rglob("*.dcm"))
    [kept, lost] = store(appliance, tmp_path, "file-gone", 2)
    [first, second] = sorted(set(objects.rglob("*.dcm")) - before)
    lost_file = first if _references(first) == lost else second
    lost_file.unlink()

    status = requester.request(
        appliance.port, action_information(generate_uid(), [kept, lost])
    )

    assert status == 0x0000
    report = requester.next_report()
    assert report.event_type == 2
    assert report.committed() == {kept}
    assert report.failed() == {lost: 0x0110}


def test_report_comes_on_a_new_association_when_the_requester_leaves(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "left-at-once", 2)
    transaction = generate_uid()

    status = requester.request(
        appliance.port, action_information(transaction, stored), keep_open=False
    )

    assert status == 0x0000
    report = requester.next_report()
    assert report.how == "new"
    assert report.calling_ae == "APPLIANCE"
    assert report.event_type == 1
    assert report.transaction_uid == transaction
    assert report.committed() == set(stored)
    wait_for_log(appliance, f"storage commitment {transaction}: report (event")


def test_a_request_whose_worker_died_is_finished_by_the_commitment_process(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "orphaned", 2)
    now = time.time()
    # As a worker leaves a request when it dies between its answer and the
    # judging: recorded, not judged, its hold over.
    orphaned = Transaction(
        generate_uid(),
        MODALITY,
        [list(reference) for reference in stored],
        received=now,
        deadline=now + 3600,
    )
    catalog = Catalog(appliance.data_dir / "catalog")
    try:
        commitments.open_transaction(catalog, orphaned)
    finally:
        catalog.close()

    report = requester.next_report()

    assert report.how == "new"
    assert report.transaction_uid == orphaned.uid
    assert report.event_type == 1
    assert report.committed() == set(stored)


def test_repeated_transaction_uid_gets_the_first_result(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "repeat", 2)
    later = study_files(tmp_path / "repeat-later", "repeat-later", 1)
    late = _references(later[0])
    transaction = generate_uid()
    information = action_information(transaction, [*stored, late])

    assert requester.request(appliance.port, information) == 0x0000
    first = requester.next_report()
    # Judged again, the request would now find every instance.
    assert set(client.store_files(appliance.port, later).values()) == {0}
    assert requester.request(appliance.port, information) == 0x0000
    second = requester.next_report()

    assert first.event_type == second.event_type == 2
    assert first.failed() == second.failed() == {late: 0x0112}
    assert first.committed() == second.committed() == set(stored)
    log = appliance.log()
    assert log.count(f"storage commitment {transaction} from") == 2
    assert f"storage commitment {transaction} from MODALITY@" in log
    assert "repeated (request 2)" in log


def test_same_transaction_uid_for_other_instances_is_refused(
    appliance: Appliance, requester: Requester, tmp_path: Path
) -> None:
    stored = store(appliance, tmp_path, "reused", 2)
    transaction = generate_uid()
    assert (
        requester.request(appliance.port, action_information(transaction, stored[:1]))
        == 0x0000
    )
    requester.next_report()

    status = requester.request(
        appliance.port, action_information(transaction, stored), keep_open=False
    )

    assert status == 0x0110
    requester.no_report(wait=1.0)


@pytest.mark.parametrize(
    ("information", "action_type", "instance", "expected"),
    [
        (action_information(None, [(CT_IMAGE, "1.2.3")]), 1, None, 0x0115),
        (action_information("1.2.x", [(CT_IMAGE, "1.2.3")]), 1, None, 0x0115),
        (action_information("1.2.3.4", []), 1, None, 0x0115),
        (action_information("1.2.3.5", [(CT_IMAGE, "")]), 1, None, 0x0115),
        (action_information("1.2.3.6", [("", "1.2.3")]), 1, None, 0x0115),
        (action_information("1.2.3.7", [(CT_IMAGE, "1.2.3")]), 2, None, 0x0123),
        (action_information("1.2.3.8", [(CT_IMAGE, "1.2.3")]), 1, "1.2.3", 0x0112),
    ],
    ids=[
        "no-transaction",
        "bad-transaction",
        "no-references",
        "no-instance",
        "no-class",
        "action-type",
        "instance",
    ],
)
def test_malformed_requests_get_an_error_status_and_one_log_line(
    appliance: Appliance,
    requester: Requester,
    information: Dataset,
    action_type: int,
    instance: str | None,
    expected: int,
) -> None:
    before = appliance.log().count("storage commitment request from")

    status = requester.request(
        appliance.port,
        information,
        keep_open=False,
        action_type=action_type,
        instance=instance or COMMITMENT_INSTANCE,
    )

    assert status == expected
    assert appliance.log().count("storage commitment request from") == before + 1
    assert f"refused (0x{expected:04X})" in appliance.log()
    assert client.echo(appliance.port) == 0x0000
    requester.no_report(wait=0.2)


def test_offsite_commitment_waits_for_replication(
    appliance_factory, tmp_path: Path
) -> None:
    modality = Requester()
    modality.listen()
    try:
        node = appliance_factory(
            {
                "migration": {"enabled": False},
                "replication": {"batch_seconds": 1.0},
                "commitment": {"require_offsite": True, **QUICK_RETRIES},
            },
            peers=[modality.peer],
        ).start()
        stored = store(node, tmp_path, "offsite", 3)
        transaction = generate_uid()

        status = modality.request(
            node.port, action_information(transaction, stored), keep_open=False
        )

        assert status == 0x0000
        report = modality.next_report(timeout=60)
        assert report.how == "new"
        assert report.event_type == 1
        assert report.committed() == set(stored)
        log = node.log()
        assert "3 instance(s), 0 committed, 0 failed, 3 waiting" in log
        assert f"{transaction}: decided after waiting for the mirror" in log
    finally:
        modality.stop()


def test_a_pending_report_survives_a_restart(appliance_factory, tmp_path: Path) -> None:
    # The requester's SCP is down: the report cannot be delivered yet.
    modality = Requester()
    settings = {
        "migration": {"enabled": False},
        "replication": {"enabled": False},
        "commitment": QUICK_RETRIES,
    }
    node = appliance_factory(settings, peers=[modality.peer]).start()
    stored = store(node, tmp_path, "restart", 2)
    transaction = generate_uid()
    status = modality.request(
        node.port, action_information(transaction, stored), keep_open=False
    )
    assert status == 0x0000
    wait_for_log(node, "attempt 2, next in")
    node.stop()
    assert node.status()["commitment"] == {"pending_reports": 1}

    modality.listen()
    try:
        node.start()
        report = modality.next_report()
        assert report.how == "new"
        assert report.transaction_uid == transaction
        assert report.event_type == 1
        assert report.committed() == set(stored)
        modality.no_report(wait=2.0)
        assert node.status()["commitment"] == {"pending_reports": 0}
    finally:
        modality.stop()


# -- reports over TLS to a requester configured tls = true ----------------------


@dataclass(frozen=True)
class Certificates:
    """The hospital's CA and the certificates it issued to the appliance and
    the requester; the requester's certificate again from a CA nobody trusts,
    one of the hospital's that names another host, and one of the
    hospital's for the requester's host but of another common name."""

    ca: Path
    appliance: Issued
    requester: Issued
    rogue_requester: Issued
    elsewhere: Issued
    impostor: Issued


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("pki")
    hospital = Authority(folder, "hospital")
    rogue = Authority(folder, "rogue")
    # The appliance checks that the requester's certificate names the host
    # of its peer entry, 127.0.0.1.
    hosts = ("127.0.0.1", "localhost")
    return Certificates(
        hospital.certificate,
        hospital.issue("APPLIANCE", hosts),
        hospital.issue(MODALITY, hosts),
        rogue.issue(MODALITY, hosts),
        hospital.issue("ELSEWHERE", ("localhost", "10.1.2.30")),
        hospital.issue("IMPOSTOR", hosts),
    )


def requester_tls(identity: Issued, ca: Path) -> ssl.SSLContext:
    """The server side of the requester's report SCP: it shows ``identity``
    and wants a client certificate from ``ca``, as a careful modality does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.certificate, identity.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=ca)
    return context


def tls_settings(certificates: Certificates) -> dict[str, object]:
    """The [tls] keys an appliance needs to reach peers over TLS; its own TLS
    port stays off (requests come on the plain port)."""
    return {
        "certificate": str(certificates.appliance.certificate),
        "key": str(certificates.appliance.key),
        "ca_file": str(certificates.ca),
    }


def start_tls_appliance(
    appliance_factory, certificates: Certificates, modality: Requester, retry: dict
) -> Appliance:
    settings = {
        "migration": {"enabled": False},
        "replication": {"enabled": False},
        "commitment": retry,
        "tls": tls_settings(certificates),
    }
    peers = [{**modality.peer, "tls": True}]
    node: Appliance = appliance_factory(settings, peers=peers).start()
    return node


def _lines(text: str, part: str) -> list[str]:
    return [line for line in text.splitlines() if part in line]


def test_a_report_on_a_new_association_goes_over_tls(
    appliance_factory, certificates: Certificates, tmp_path: Path
) -> None:
    modality = Requester()
    modality.listen(requester_tls(certificates.requester, certificates.ca))
    try:
        node = start_tls_appliance(
            appliance_factory, certificates, modality, QUICK_RETRIES
        )
        stored = store(node, tmp_path, "over-tls", 2)
        transaction = generate_uid()

        status = modality.request(
            node.port, action_information(transaction, stored), keep_open=False
        )

        assert status == 0x0000
        report = modality.next_report()
        assert report.how == "new"
        assert report.tls_version == "TLSv1.3"
        assert report.client_certificate == "APPLIANCE"
        assert report.event_type == 1
        assert report.transaction_uid == transaction
        assert report.committed() == set(stored)
        wait_for_log(
            node,
            f"storage commitment {transaction}: report (event type 1) delivered "
            f"to MODALITY at 127.0.0.1:{modality.port} on a new association",
        )
        assert "TLS handshake with" not in node.log()
    finally:
        modality.stop()


def test_a_requester_with_a_certificate_of_another_ca_gets_no_report(
    appliance_factory, certificates: Certificates, tmp_path: Path
) -> None:
    modality = Requester()
    modality.listen(requester_tls(certificates.rogue_requester, certificates.ca))
    try:
        # One attempt within the test: the next one is due in ten minutes.
        retry = {"retry_initial": 600.0, "retry_max": 600.0}
        node = start_tls_appliance(appliance_factory, certificates, modality, retry)
        stored = store(node, tmp_path, "rogue", 1)
        transaction = generate_uid()

        status = modality.request(
            node.port, action_information(transaction, stored), keep_open=False
        )

        assert status == 0x0000
        wait_for_log(node, f"{transaction}: report to MODALITY not delivered")
        modality.no_report(wait=0.5)
        log = node.log()
        (handshake,) = _lines(log, "TLS handshake with")
        assert f"TLS handshake with 127.0.0.1:{modality.port} failed" in handshake
        assert "CERTIFICATE_VERIFY_FAILED" in handshake
        (undelivered,) = _lines(log, f"{transaction}: report to MODALITY not")
        # Attempt 1 was on the requester's own association, gone at once.
        assert "attempt 2, next in 600.0 s" in undelivered
        # pynetdicom's own lines and tracebacks stay out of the log.
        assert "TCP Initialisation Error" not in log
        assert "Traceback" not in log
        assert node.status()["commitment"] == {"pending_reports": 1}
        assert client.echo(node.port) == 0x0000
        assert node.process is not None and node.process.poll() is None
    finally:
        modality.stop()


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [
        ("rogue_requester", "unable to get local issuer certificate"),
        ("elsewhere", "IP address mismatch"),
    ],
    ids=["other-ca", "other-host"],
)
def test_a_report_refused_over_tls_is_delivered_once_the_certificate_is_right(
    certificates: Certificates,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    wrong: str,
    reason: str,
) -> None:
    modality = Requester()
    values = config_defaults()
    values["storage.data_dir"] = str(tmp_path / "data")
    values.update({f"tls.{key}": value for key, value in
                   tls_settings(certificates).items()})  # fmt: skip
    peer = Peer(MODALITY, "127.0.0.1", modality.port, tls=True)
    settings = Config(values, peers=(peer,))
    catalog = Catalog(settings.catalog_path, 2**26)
    transaction = _decided(time.time())
    commitments.open_transaction(catalog, transaction)
    reporter = Reporter(settings, catalog)
    try:
        modality.listen(requester_tls(getattr(certificates, wrong), certificates.ca))
        reporter.one_pass(threading.Event())
        modality.stop()
        pending = commitments.get(catalog, transaction.uid)
        handshakes = [r for r in caplog.records if r.name == "appliance.tls"]

        modality.listen(requester_tls(certificates.requester, certificates.ca))
        commitments.update(catalog, transaction.uid, _due_now)
        reporter.one_pass(threading.Event())
        report = modality.next_report()
        delivered = commitments.get(catalog, transaction.uid)
    finally:
        modality.stop()
        catalog.close()

    assert pending is not None
    assert (pending.state, pending.attempts) == (commitments.DECIDED, 1)
    assert "no association" in pending.last_error
    assert len(handshakes) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in handshakes[0].getMessage()
    assert reason in handshakes[0].getMessage()
    assert (report.tls_version, report.event_type) == ("TLSv1.3", 1)
    assert report.transaction_uid == transaction.uid
    assert delivered is not None and delivered.state == commitments.REPORTED


def test_a_report_to_a_requester_bound_to_a_certificate_needs_that_certificate(
    certificates: Certificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    modality = Requester()
    values = config_defaults()
    values["storage.data_dir"] = str(tmp_path / "data")
    values.update({f"tls.{key}": value for key, value in
                   tls_settings(certificates).items()})  # fmt: skip
    peer = Peer(MODALITY, "127.0.0.1", modality.port, tls=True, certificate_cn=MODALITY)
    settings = Config(values, peers=(peer,))
    catalog = Catalog(settings.catalog_path, 2**26)
    transaction = _decided(time.time())
    commitments.open_transaction(catalog, transaction)
    reporter = Reporter(settings, catalog)
    try:
        modality.listen(requester_tls(certificates.impostor, certificates.ca))
        reporter.one_pass(threading.Event())
        modality.stop()
        pending = commitments.get(catalog, transaction.uid)
        refusals = [r.getMessage() for r in caplog.records if r.name == "appliance.tls"]
        nothing_reported = modality.reports.empty()

        modality.listen(requester_tls(certificates.requester, certificates.ca))
        commitments.update(catalog, transaction.uid, _due_now)
        reporter.one_pass(threading.Event())
        report = modality.next_report()
        delivered = commitments.get(catalog, transaction.uid)
    finally:
        modality.stop()
        catalog.close()

    assert nothing_reported
    assert pending is not None
    assert (pending.state, pending.attempts) == (commitments.DECIDED, 1)
    assert refusals == [
        f"TLS connection to {MODALITY} at 127.0.0.1:{modality.port} refused: "
        f"AE title {MODALITY} is bound to certificate CN '{MODALITY}'; "
        "the certificate is for IMPOSTOR"
    ]
    assert report.transaction_uid == transaction.uid
    assert delivered is not None and delivered.state == commitments.REPORTED


# -- the commitment process and the catalog records, without a service ----------


@pytest.fixture
def reporting(tmp_path: Path) -> Iterator[tuple[Config, Catalog]]:
    """A configuration whose only peer listens nowhere, and its catalog."""
    values = config_defaults()
    values["storage.data_dir"] = str(tmp_path / "data")
    values["commitment.retry_initial"] = 5.0
    values["commitment.retry_max"] = 12.0
    values["commitment.retention_days"] = 1
    # Held for the test, so that nothing listens there.
    with held_port() as nowhere:
        peer = Peer(MODALITY, "127.0.0.1", nowhere.port)
        settings = Config(values, peers=(peer,))
        catalog = Catalog(settings.catalog_path, 2**26)
        yield settings, catalog
        catalog.close()


def _decided(received: float) -> Transaction:
    reference = [CT_IMAGE, generate_uid()]
    transaction = Transaction(generate_uid(), MODALITY, [reference], received)
    transaction.decide([reference], [], deliver_after=0.0)
    return transaction


def test_an_unreachable_requester_is_tried_again_later_and_later(
    reporting: tuple[Config, Catalog],
) -> None:
    settings, catalog = reporting
    transaction = _decided(time.time())
    commitments.open_transaction(catalog, transaction)
    reporter = Reporter(settings, catalog)
    waits = []
    for _attempt in range(4):
        started = time.time()
        reporter.one_pass(threading.Event())
        stored = commitments.get(catalog, transaction.uid)
        assert stored is not None
        waits.append(round(stored.deliver_after - started))
        # Due again at once, as if the wait had passed.
        commitments.update(catalog, transaction.uid, _due_now)

    assert waits == [5, 10, 12, 12]
    assert stored.attempts == 4
    assert stored.state == commitments.DECIDED
    assert "connection refused" in stored.last_error
    assert [t.uid for t in commitments.pending(catalog)] == [transaction.uid]


def _due_now(transaction: Transaction) -> bool:
    transaction.deliver_after = 0.0
    return True


def test_a_report_undelivered_for_the_retention_time_is_given_up_then_forgotten(
    reporting: tuple[Config, Catalog], caplog: pytest.LogCaptureFixture
) -> None:
    settings, catalog = reporting
    old = _decided(time.time() - 2 * 86400)
    recent = _decided(time.time())
    recent.deliver_after = time.time() + 3600
    for transaction in (old, recent):
        commitments.open_transaction(catalog, transaction)

    Reporter(settings, catalog).one_pass(threading.Event())

    expired = commitments.get(catalog, old.uid)
    assert expired is not None and expired.state == commitments.EXPIRED
    assert f"storage commitment {old.uid}: report to MODALITY given up" in caplog.text
    assert [t.uid for t in commitments.pending(catalog)] == [recent.uid]
    assert commitments.prune(catalog, time.time() - 86400) == 1
    assert commitments.get(catalog, old.uid) is None
    assert commitments.get(catalog, recent.uid) is not None


def test_a_transaction_uid_is_recorded_once(reporting: tuple[Config, Catalog]) -> None:
    _settings, catalog = reporting
    first = _decided(time.time())
    first.state = commitments.REPORTED
    commitments.open_transaction(catalog, first)
    again = Transaction(first.uid, MODALITY, first.references, time.time())
    other = Transaction(first.uid, MODALITY, [[CT_IMAGE, "1.2.3"]], time.time())

    stored, new = commitments.open_transaction(catalog, again)
    refused, new_too = commitments.open_transaction(catalog, other)

    assert not new and not new_too
    assert stored.requests == 2
    assert stored.state == commitments.DECIDED  # its report is due again
    assert stored.committed == first.committed
    assert refused.references == first.references
    assert commitments.get(catalog, first.uid).requests == 2  # type: ignore[union-attr]


def test_require_offsite_needs_replication(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(
        "[commitment]\nrequire_offsite = true\n[replication]\nenabled = false\n"
    )
    with pytest.raises(ConfigError) as raised:
        config_load(path)
    assert [key for key, _why in raised.value.problems] == [
        "commitment.require_offsite"
    ]

    path.write_text("[commitment]\nrequire_offsite = true\ntimeout = 600\n")
    assert config_load(path).get("commitment.timeout") == 600


def test_a_requester_not_reached_is_tried_once_per_pass(
    reporting: tuple[Config, Catalog],
) -> None:
    settings, catalog = reporting
    first, second = _decided(time.time()), _decided(time.time() + 1)
    for transaction in (first, second):
        commitments.open_transaction(catalog, transaction)

    Reporter(settings, catalog).one_pass(threading.Event())

    tried = [commitments.get(catalog, t.uid) for t in (first, second)]
    assert [t.attempts for t in tried if t is not None] == [1, 0]


def test_a_request_over_max_references_is_refused_before_it_is_recorded(
    appliance_factory, tmp_path: Path
) -> None:
    modality = Requester()
    modality.listen()
    node = appliance_factory(
        {"replication": {"enabled": False}, "commitment": {"max_references": 3}},
        peers=[modality.peer],
    ).start()
    try:
        stored = store(node, tmp_path, "bounded", 3)
        unknown = [(CT_IMAGE, generate_uid()) for _ in range(200)]

        # One over: decoded and counted. Far over: refused from its size.
        one_over = modality.request(
            node.port,
            action_information(generate_uid(), [*stored, unknown[0]]),
            keep_open=False,
        )
        far_over = modality.request(
            node.port, action_information(generate_uid(), unknown), keep_open=False
        )
        allowed = modality.request(node.port, action_information("1.2.3.9", stored))

        assert (one_over, far_over, allowed) == (0x0213, 0x0213, 0x0000)
        report = modality.next_report()
        assert report.transaction_uid == "1.2.3.9" and report.event_type == 1
        modality.no_report(wait=0.5)
        log = node.log()
        assert "refused (0x0213): 4 references, over commitment.max_references" in log
        assert "refused (0x0213): more than 3 references" in log
        assert log.count("storage commitment 1.2.3.9 from") == 1
        catalog = Catalog(node.data_dir / "catalog", readonly=True)
        try:
            with catalog.read() as txn:
                recorded = [uid for uid, _ in catalog.all_records(txn, "commitments")]
        finally:
            catalog.close()
        assert recorded == ["1.2.3.9"]
    finally:
        modality.stop()


def test_a_deflated_request_is_measured_inflated() -> None:
    information = action_information(
        generate_uid(), [(CT_IMAGE, f"1.2.3.{n}") for n in range(300)]
    )
    deflated = encode(information, False, True, deflated=True)
    assert deflated is not None
    # Compressed, 300 references take fewer bytes than 3 may.
    messages.check_size(deflated, False, 3)

    with pytest.raises(messages.BadRequest) as refused:
        messages.check_size(deflated, True, 3)
    assert refused.value.status == 0x0213
    messages.check_size(deflated, True, 300)
