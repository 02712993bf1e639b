"""DICOM and HL7 over TLS with certificates made here.

A real ``appliance serve`` with its TLS port on, talked to with DCMTK's own
TLS options (storescu, findscu, echoscu as clients; storescp as a C-MOVE
destination), Python's ssl module for the protocol versions and suites
BCP 195 rules out, and MLLP over TLS. One appliance asks clients for a
certificate only to check AE titles bound to one; a second verifies every
client.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from appliance import config, tls
from appliance.errors import ConfigError
from appliance.hl7.framing import frame
from tests import dicom_client as client
from tests.certificates import Authority, Issued
from tests.conftest import (
    TEST_FILES,
    Appliance,
    config_text,
    dcmtk,
    free_port,
    require_dcmtk,
)
from tests.hl7_samples import siu
from tests.loopback import connect_from, new_address
from tests.ports import held_port, wait_listening

CT_FILE = TEST_FILES / "CT_small.dcm"
MR_FILE = TEST_FILES / "MR_small.dcm"


@dataclass(frozen=True)
class Pki:
    """The hospital's CA and what it issued; a CA nobody trusts, and its
    certificate for CT1."""

    ca: Authority
    server: Issued
    destination: Issued
    ct1: Issued
    ws9: Issued
    rogue_ct1: Issued
    rogue_destination: Issued
    # From the hospital's CA, for the destination's address, but not the
    # certificate BOUND and PINNED are bound to.
    impostor: Issued


@dataclass
class Node:
    appliance: Appliance
    tls_port: int
    hl7_tls_port: int = 0
    destination_port: int = 0
    bound_port: int = 0

    def new_log(self, since: int) -> str:
        return self.appliance.log()[since:]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "hospital")
    rogue = Authority(folder, "rogue")
    return Pki(
        ca=ca,
        server=ca.issue("APPLIANCE", ("127.0.0.1", "localhost")),
        destination=ca.issue("DEST", ("127.0.0.1",)),
        ct1=ca.issue("CT1"),
        ws9=ca.issue("WS9"),
        rogue_ct1=rogue.issue("CT1"),
        rogue_destination=rogue.issue("DEST", ("127.0.0.1",)),
        impostor=ca.issue("WS7", ("127.0.0.1",)),
    )


def _tls_settings(pki: Pki, port: int, verify_clients: bool) -> dict[str, object]:
    return {
        "enabled": True,
        "port": port,
        "certificate": str(pki.server.certificate),
        "key": str(pki.server.key),
        "ca_file": str(pki.ca.certificate),
        "verify_clients": verify_clients,
    }


@contextlib.contextmanager
def _running(appliance: Appliance) -> Iterator[Appliance]:
    try:
        yield appliance.start()
    finally:
        appliance.stop()


@pytest.fixture(scope="module")
def open_node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Clients need no certificate, except as CT1 (bound by common name) and
    MR1 (bound by WS9's fingerprint); HL7 over TLS too; DEST is a C-MOVE
    destination over TLS, and so are BOUND (bound to DEST's certificate by
    common name) and PINNED (by fingerprint), which share a port."""
    node = Node(Appliance(tmp_path_factory.mktemp("open"), {}), free_port())
    node.hl7_tls_port = free_port()
    # Held for the module: the destinations listen only in their tests.
    destination_hold, bound_hold = held_port(), held_port()
    node.destination_port = destination_hold.port
    node.bound_port = bound_hold.port
    hl7 = {"enabled": True, "port": free_port(), "tls": True}
    node.appliance.settings = {
        "tls": _tls_settings(pki, node.tls_port, verify_clients=False),
        "hl7": {**hl7, "tls_port": node.hl7_tls_port},
        "prefetch": {"enabled": False},
    }
    fingerprint = hashlib.sha256(pki.ws9.der).hexdigest().upper()
    destination = hashlib.sha256(pki.destination.der).hexdigest().upper()
    bound = {"host": "127.0.0.1", "port": node.bound_port, "tls": True}
    node.appliance.peers = [
        {"ae_title": "CT1", "host": "127.0.0.1", "port": 104, "certificate_cn": "CT1"},
        {
            "ae_title": "MR1",
            "host": "127.0.0.1",
            "port": 104,
            "certificate_sha256": ":".join(re.findall("..", fingerprint)),
        },
        {
            "ae_title": "DEST",
            "host": "127.0.0.1",
            "port": node.destination_port,
            "tls": True,
        },
        {**bound, "ae_title": "BOUND", "certificate_cn": "DEST"},
        {**bound, "ae_title": "PINNED", "certificate_sha256": destination},
    ]
    with destination_hold, bound_hold, _running(node.appliance):
        yield node


@pytest.fixture(scope="module")
def strict_node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Every TLS client must show a certificate from the hospital's CA."""
    node = Node(Appliance(tmp_path_factory.mktemp("strict"), {}), free_port())
    node.appliance.settings = {
        "tls": _tls_settings(pki, node.tls_port, verify_clients=True),
        # Short, for the test of a client that never says hello.
        "timeouts": {"association": 5.0},
    }
    with _running(node.appliance):
        yield node


# -- clients ----------------------------------------------------------------------


def _tls_options(pki: Pki, identity: Issued | None) -> list[str]:
    """DCMTK's TLS options: a certificate (+tls) or none (+tla), and the CA
    that the appliance's certificate must come from."""
    shown = ["+tls", str(identity.key), str(identity.certificate)] if identity else []
    return [*(shown or ["+tla"]), "+cf", str(pki.ca.certificate)]


def storescu(
    port: int, options: list[str], calling: str = "STORESCU", path: Path = CT_FILE
) -> subprocess.CompletedProcess[str]:
    require_dcmtk()
    return dcmtk(
        "storescu", "-v", *options, "-aet", calling, "-aec", "APPLIANCE",
        "127.0.0.1", str(port), str(path),
    )  # fmt: skip


def _stored(result: subprocess.CompletedProcess[str]) -> bool:
    output = result.stdout + result.stderr
    return result.returncode == 0 and "Received Store Response (Success)" in output


def _lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def wait_for(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _handshake(port: int, pki: Pki, setup: Callable[[ssl.SSLContext], None]) -> str:
    """A Python TLS client's handshake with the appliance: the version it got.
    Each from a loopback address of its own: a failed one gets its line."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca.certificate))
    setup(context)
    raw = connect_from(new_address(), port, timeout=10)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as secured:
        assert secured.compression() is None
        return str(secured.version())


# -- DICOM over TLS ---------------------------------------------------------------


def test_store_then_find_over_tls(open_node: Node, pki: Pki) -> None:
    stored = storescu(open_node.tls_port, _tls_options(pki, pki.ws9))
    study = str(pydicom.dcmread(CT_FILE).StudyInstanceUID)
    found = dcmtk(
        "findscu", "-v", "-S", *_tls_options(pki, pki.ws9),
        "-aet", "FINDSCU", "-aec", "APPLIANCE",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "127.0.0.1", str(open_node.tls_port),
    )  # fmt: skip

    assert _stored(stored), stored.stderr
    assert found.returncode == 0, found.stderr
    assert "Find Response: 1 (Pending)" in found.stdout + found.stderr
    assert "Find Response: 2 (Pending)" not in found.stdout + found.stderr


def test_the_plain_port_serves_alongside_the_tls_port(open_node: Node) -> None:
    plain = open_node.appliance.port

    assert client.echo(plain) == 0x0000
    assert _stored(storescu(plain, [], path=MR_FILE))


def test_tls_13_is_negotiated_and_12_only_with_ecdhe_aead(
    open_node: Node, pki: Pki
) -> None:
    port = open_node.tls_port

    def tls12(ciphers: str) -> Callable[[ssl.SSLContext], None]:
        def setup(context: ssl.SSLContext) -> None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers)

        return setup

    since = len(open_node.appliance.log())
    assert _handshake(port, pki, lambda context: None) == "TLSv1.3"
    assert _handshake(port, pki, tls12("ECDHE-RSA-AES128-GCM-SHA256")) == "TLSv1.2"
    assert _handshake(port, pki, tls12("ECDHE-RSA-CHACHA20-POLY1305")) == "TLSv1.2"
    for weak in ("ECDHE-RSA-AES128-SHA", "AES128-GCM-SHA256", "AES256-SHA256"):
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            _handshake(port, pki, tls12(weak))

    def refusals() -> list[str]:
        return _lines(open_node.new_log(since), "TLS handshake with .*NO_SHARED_CIPHER")

    wait_for(lambda: len(refusals()) == 3)
    assert len(_lines(open_node.new_log(since), "TLS handshake with")) == 3


def test_renegotiation_is_refused(open_node: Node, pki: Pki) -> None:
    """OpenSSL 3 refuses a client's renegotiation unless told otherwise; the
    appliance also sets OP_NO_RENEGOTIATION, for OpenSSL builds that allow
    it. This checks the outcome, whichever of the two gives it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing; apt-get install openssl")
    command = ["openssl", "s_client", "-tls1_2", "-CAfile", str(pki.ca.certificate),
               "-connect", f"127.0.0.1:{open_node.tls_port}"]  # fmt: skip
    with subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as s_client:
        assert s_client.stdin is not None and s_client.stdout is not None
        # "R" asks s_client to renegotiate; stdin stays open until it has
        # the answer, since its end would close the connection first.
        s_client.stdin.write("R\n")
        s_client.stdin.flush()
        try:
            s_client.wait(timeout=60)
        finally:
            s_client.kill()
        output = s_client.stdout.read()

    assert "Verify return code: 0 (ok)" in output
    assert "RENEGOTIATING" in output
    assert "no renegotiation" in output


# Python warns that it deprecates TLS 1.1: that is the point of this client.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
def test_a_tls_11_client_is_refused(open_node: Node, pki: Pki) -> None:
    def tls11(context: ssl.SSLContext) -> None:
        # Level 0 lets this client offer TLS 1.1: the refusal is the server's.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1

    since = len(open_node.appliance.log())
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        _handshake(open_node.tls_port, pki, tls11)

    wait_for(lambda: "failed" in open_node.new_log(since))
    refused = _lines(open_node.new_log(since), "TLS handshake with 127.")
    assert len(refused) == 1
    # TLS 1.1 has no AEAD suites either: OpenSSL may name either reason.
    assert re.search("UNSUPPORTED_PROTOCOL|NO_SHARED_CIPHER", refused[0])


def test_a_plain_client_on_the_tls_port_fails_and_the_service_stays_up(
    open_node: Node, pki: Pki
) -> None:
    require_dcmtk()
    since = len(open_node.appliance.log())
    plain = dcmtk("echoscu", "-to", "10", "-aec", "APPLIANCE",
                  "127.0.0.1", str(open_node.tls_port))  # fmt: skip
    wait_for(lambda: "TLS handshake with" in open_node.new_log(since))
    secured = dcmtk("echoscu", *_tls_options(pki, None), "-aec", "APPLIANCE",
                    "127.0.0.1", str(open_node.tls_port))  # fmt: skip

    assert plain.returncode != 0
    assert len(_lines(open_node.new_log(since), "TLS handshake with")) == 1
    assert secured.returncode == 0, secured.stderr
    assert "TLS handshake failed" in _alerts(open_node)
    assert client.echo(open_node.appliance.port) == 0x0000
    assert open_node.appliance.process is not None
    assert open_node.appliance.process.poll() is None


def _plain_on_tls_port(source: str, port: int) -> None:
    """Bytes that are no TLS hello, from ``source``; returns once the
    appliance has closed the connection."""
    with connect_from(source, port, timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            while raw.recv(4096):
                pass


def test_failed_handshakes_from_one_address_are_logged_once(
    open_node: Node,
) -> None:
    """A client that fails handshake after handshake gets one line a minute,
    not one per connection; each failure is still a security alert, and
    another address gets its own line."""
    since = len(open_node.appliance.log())
    alerts_before = len(_tls_alerts(open_node))
    flooding, other = new_address(), new_address()
    for source in [flooding] * 3 + [other]:
        _plain_on_tls_port(source, open_node.tls_port)
    wait_for(lambda: len(_tls_alerts(open_node)) >= alerts_before + 4)

    log = open_node.new_log(since)
    assert len(_lines(log, f"TLS handshake with {flooding}:")) == 1
    assert len(_lines(log, f"TLS handshake with {other}:")) == 1
    alerts = _tls_alerts(open_node)[alerts_before:]
    assert sum(flooding in alert for alert in alerts) == 3
    assert client.echo(open_node.appliance.port) == 0x0000


# -- client certificates ----------------------------------------------------------


def test_verify_clients_refuses_clients_without_a_certificate_of_the_ca(
    strict_node: Node, pki: Pki
) -> None:
    since = len(strict_node.appliance.log())
    alerts_before = len(_tls_alerts(strict_node))
    anonymous = storescu(strict_node.tls_port, _tls_options(pki, None))
    foreign = storescu(strict_node.tls_port, _tls_options(pki, pki.rogue_ct1))
    wait_for(lambda: len(_tls_alerts(strict_node)) >= alerts_before + 2)
    valid = storescu(strict_node.tls_port, _tls_options(pki, pki.ct1))

    assert not _stored(anonymous)
    assert not _stored(foreign)
    assert _stored(valid), valid.stderr
    # Both clients came from 127.0.0.1 within a minute: the first failure
    # is logged, the second counted; the audit trail has each.
    failures = _lines(strict_node.new_log(since), "TLS handshake with 127.0.0.1:")
    assert len(failures) == 1
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in failures[0].upper()
    alerts = _tls_alerts(strict_node)[alerts_before:]
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in alerts[0].upper()
    assert "CERTIFICATE_VERIFY_FAILED" in alerts[1].upper()


def test_a_silent_client_holds_up_no_one_and_is_cut_off(
    strict_node: Node, pki: Pki
) -> None:
    since = len(strict_node.appliance.log())
    with connect_from(new_address(), strict_node.tls_port) as silent:
        served = storescu(strict_node.tls_port, _tls_options(pki, pki.ws9))
        wait_for(lambda: "TLS handshake with" in strict_node.new_log(since))
        silent.settimeout(10)
        closed = silent.recv(1) == b""

    assert _stored(served), served.stderr
    assert closed
    (cut_off,) = _lines(strict_node.new_log(since), "TLS handshake with")
    assert "no complete handshake within timeouts.association" in cut_off


def test_an_ae_title_bound_to_a_certificate_needs_that_certificate(
    open_node: Node, pki: Pki
) -> None:
    tls_port, plain = open_node.tls_port, open_node.appliance.port
    since = len(open_node.appliance.log())

    assert _stored(storescu(tls_port, _tls_options(pki, pki.ct1), "CT1"))
    assert _stored(storescu(tls_port, _tls_options(pki, pki.ws9), "MR1"))

    wrong_name = storescu(tls_port, _tls_options(pki, pki.ws9), "CT1")
    wrong_fingerprint = storescu(tls_port, _tls_options(pki, pki.ct1), "MR1")
    anonymous = storescu(tls_port, _tls_options(pki, None), "CT1")
    without_tls = storescu(plain, [], "CT1")

    for refused in (wrong_name, wrong_fingerprint, anonymous, without_tls):
        assert not _stored(refused)
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    rejected = _lines(open_node.new_log(since), "rejected: AE title")
    assert len(rejected) == 4
    assert "certificate is for WS9" in rejected[0]
    assert "none was sent" in rejected[2]
    assert "came without TLS" in rejected[3]


def test_bound_peers_the_appliance_calls_without_tls_are_warned_of(
    open_node: Node,
) -> None:
    # CT1 and MR1 are bound, but called without TLS; BOUND and PINNED use it.
    caveat = "is bound to a certificate, but tls = false"
    logged = _lines(open_node.appliance.log(), caveat)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "config",
            "check",
            str(open_node.appliance.config_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert [line.split("peer ")[1].split()[0] for line in logged] == ["CT1", "MR1"]
    assert all("WARNING" in line for line in logged)
    assert checked.returncode == 0, checked.stderr
    warned = [line for line in checked.stderr.splitlines() if caveat in line]
    assert [line.split("peer ")[1].split()[0] for line in warned] == ["CT1", "MR1"]


# -- C-MOVE to a destination over TLS ------------------------------------------


@contextlib.contextmanager
def storescp_tls(port: int, identity: Issued, ca: Path, out: Path) -> Iterator[None]:
    """DCMTK storescp over TLS, requiring a client certificate from ``ca``."""
    require_dcmtk()
    command = [
        "storescp", "+tls", str(identity.key), str(identity.certificate),
        "+cf", str(ca), "-aet", "DEST", "-od", str(out), str(port),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(process, port, "storescp")
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def to_move(open_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study of its own on the open node, for the C-MOVE tests."""
    dataset = pydicom.dcmread(CT_FILE)
    dataset.StudyInstanceUID = pydicom.uid.generate_uid()
    dataset.SeriesInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = tmp_path_factory.mktemp("move") / "ct.dcm"
    dataset.save_as(path)
    assert client.store_files(open_node.appliance.port, [path]) == {path: 0}
    return path


def _move_study(
    node: Node, path: Path, destination: str = "DEST"
) -> subprocess.CompletedProcess[str]:
    study = str(pydicom.dcmread(path).StudyInstanceUID)
    return dcmtk(
        "movescu", "-v", "-S", "-aec", "APPLIANCE", "-aem", destination,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "127.0.0.1", str(node.appliance.port),
    )  # fmt: skip


def test_c_move_to_a_destination_over_tls(
    open_node: Node, pki: Pki, to_move: Path, tmp_path: Path
) -> None:
    received = tmp_path / "received"
    received.mkdir()
    with storescp_tls(
        open_node.destination_port, pki.destination, pki.ca.certificate, received
    ):
        moved = _move_study(open_node, to_move)

    assert "Received Final Move Response (Success)" in moved.stderr, moved.stderr
    files = list(received.iterdir())
    assert len(files) == 1
    got, sent = pydicom.dcmread(files[0]), pydicom.dcmread(to_move)
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.PixelData == sent.PixelData


def test_c_move_refuses_a_destination_with_a_certificate_of_another_ca(
    open_node: Node, pki: Pki, to_move: Path, tmp_path: Path
) -> None:
    since = len(open_node.appliance.log())
    with storescp_tls(
        open_node.destination_port,
        pki.rogue_destination,
        pki.ca.certificate,
        tmp_path,
    ):
        moved = _move_study(open_node, to_move)

    assert "Received Final Move Response (Success)" not in moved.stderr
    assert list(tmp_path.iterdir()) == []
    log = open_node.new_log(since)
    assert len(_lines(log, "cannot associate with DEST .* over TLS")) == 1
    failed = _lines(log, "TLS handshake with 127.0.0.1:")
    assert len(failed) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in failed[0]
    assert "Traceback" not in log


@contextlib.contextmanager
def tls_listener(port: int, identity: Issued) -> Iterator[list[bytes]]:
    """A TLS server presenting ``identity`` on ``port``. Once the block
    ends, the list holds what each client that completed the handshake sent
    after it (a connection that never starts TLS leaves nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.certificate, identity.key)
    received: list[bytes] = []
    done = threading.Event()

    def converse(connection: socket.socket) -> None:
        # The client closing at any point ends the conversation.
        with connection, contextlib.suppress(OSError):
            connection.settimeout(30)
            with context.wrap_socket(connection, server_side=True) as secured:
                received.append(b"")
                index = len(received) - 1
                while chunk := secured.recv(65536):
                    received[index] += chunk

    def serve(listener: socket.socket) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                converse(listener.accept()[0])

    with socket.create_server(("127.0.0.1", port)) as listener:
        listener.settimeout(0.1)
        thread = threading.Thread(target=serve, args=(listener,))
        thread.start()
        try:
            yield received
        finally:
            done.set()
            thread.join(timeout=60)


BINDINGS = {
    "BOUND": "is bound to certificate CN 'DEST'; the certificate is for WS7",
    "PINNED": "is bound to the certificate of SHA-256 ",
}


@pytest.mark.parametrize("destination", list(BINDINGS))
def test_c_move_to_a_bound_destination_needs_its_certificate(
    open_node: Node, pki: Pki, to_move: Path, tmp_path: Path, destination: str
) -> None:
    received = tmp_path / "received"
    received.mkdir()
    with storescp_tls(
        open_node.bound_port, pki.destination, pki.ca.certificate, received
    ):
        moved = _move_study(open_node, to_move, destination)
    since = len(open_node.appliance.log())
    study = str(pydicom.dcmread(to_move).StudyInstanceUID)
    identifier = client.study_identifier(StudyInstanceUID=study)
    with tls_listener(open_node.bound_port, pki.impostor) as sent:
        refused = client.move(open_node.appliance.port, identifier, destination)

    assert "Received Final Move Response (Success)" in moved.stderr, moved.stderr
    assert len(list(received.iterdir())) == 1
    assert [int(response.Status) for response in refused] == [0xA702]
    assert refused[0].NumberOfFailedSuboperations == 1
    assert sent == [b""], "a PDU was sent to the wrong certificate"
    log = open_node.new_log(since)
    where = f"{destination} at 127.0.0.1:{open_node.bound_port}"
    (line,) = _lines(log, f"TLS connection to {where} refused")
    assert f"AE title {destination} {BINDINGS[destination]}" in line
    assert len(_lines(log, f"cannot associate with {destination} .* over TLS")) == 1
    assert not _lines(log, "TLS handshake with")
    assert "Traceback" not in log


def test_export_to_a_bound_peer_refuses_another_certificate(
    open_node: Node, pki: Pki, to_move: Path
) -> None:
    target = f"BOUND@127.0.0.1:{open_node.bound_port}"
    with tls_listener(open_node.bound_port, pki.impostor) as sent:
        exported = open_node.appliance.cli("export", "--to", target, check=False)

    assert exported.returncode != 0
    assert sent == [b""], "a PDU was sent to the wrong certificate"


# -- PDU lengths over TLS ------------------------------------------------------


@pytest.mark.parametrize("a_byte_at_a_time", [False, True], ids=["whole", "split"])
def test_a_pdu_longer_than_announced_over_tls_aborts_with_one_line(
    open_node: Node, pki: Pki, a_byte_at_a_time: bool
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca.certificate))
    since = len(open_node.appliance.log())
    header = b"\x04\x00\xff\xff\xff\xf0"
    with client.associate(
        open_node.tls_port,
        [(client.Verification, [])],
        tls_args=(context, "127.0.0.1"),
    ) as assoc:
        assert assoc.is_established
        assert assoc.dul.socket is not None
        connection = assoc.dul.socket.socket
        assert isinstance(connection, ssl.SSLSocket)
        if a_byte_at_a_time:
            client.send_a_byte_at_a_time(connection, header)
        else:
            connection.sendall(header + bytes(4096))
        assert client.wait_until_aborted(assoc)

    wait_for(lambda: "more than the" in open_node.new_log(since))
    log = open_node.new_log(since)
    (line,) = _lines(log, "more than the")
    assert "aborting association with TESTCLIENT@127.0.0.1" in line
    assert "PDU type 0x04 of 4294967280 bytes" in line
    assert "pynetdicom" not in log
    with client.associate(
        open_node.tls_port,
        [(client.Verification, [])],
        tls_args=(context, "127.0.0.1"),
    ) as assoc:
        assert int(assoc.send_c_echo().Status) == 0x0000


# -- HL7 over TLS -----------------------------------------------------------------


def test_an_hl7_message_over_mllp_tls_is_acknowledged(
    open_node: Node, pki: Pki
) -> None:
    wait_for(lambda: "HL7 (MLLP over TLS) listening" in open_node.appliance.log())
    context = ssl.create_default_context(cafile=str(pki.ca.certificate))
    message = siu(control_id="TLS1").encode()
    raw = socket.create_connection(("127.0.0.1", open_node.hl7_tls_port), 10)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as secured:
        secured.sendall(frame(message))
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = secured.recv(4096)
            assert chunk, "the connection closed before the ACK"
            answer += chunk

    segments = answer.strip(b"\x0b\x1c\r").decode().split("\r")
    msa = next(s for s in segments if s.startswith("MSA|")).split("|")
    assert msa[1:3] == ["AA", "TLS1"]


def test_a_plain_client_on_the_hl7_tls_port_is_logged_once(open_node: Node) -> None:
    since = len(open_node.appliance.log())
    with socket.create_connection(("127.0.0.1", open_node.hl7_tls_port), 10) as raw:
        raw.sendall(frame(siu(control_id="PLAIN").encode()))
        raw.settimeout(10)
        # The server gives up on the handshake and closes.
        with contextlib.suppress(ConnectionResetError):
            while raw.recv(4096):
                pass

    wait_for(lambda: "HL7 TLS handshake with" in open_node.new_log(since))
    assert len(_lines(open_node.new_log(since), "HL7 TLS handshake with")) == 1
    assert "HL7 TLS handshake failed" in _alerts(open_node)


def test_failed_hl7_handshakes_from_one_address_are_logged_once(
    open_node: Node,
) -> None:
    """As on the DICOM TLS port: one line a minute per address, and a
    security alert for each failure."""
    wait_for(lambda: "HL7 (MLLP over TLS) listening" in open_node.appliance.log())
    since = len(open_node.appliance.log())
    alerts_before = _alerts(open_node).count("HL7 TLS handshake failed")
    flooding, other = new_address(), new_address()
    for source in [flooding] * 3 + [other]:
        _plain_on_tls_port(source, open_node.hl7_tls_port)
    wait_for(
        lambda: (
            _alerts(open_node).count("HL7 TLS handshake failed") >= alerts_before + 4
        )
    )

    log = open_node.new_log(since)
    assert len(_lines(log, f"HL7 TLS handshake with {flooding}:")) == 1
    assert len(_lines(log, f"HL7 TLS handshake with {other}:")) == 1


def _alerts(node: Node) -> str:
    """The security alerts of the audit trail, as ``audit show`` prints them."""
    shown = node.appliance.cli("audit", "show", "--event", "security-alert", "--json")
    return shown.stdout


def _tls_alerts(node: Node) -> list[str]:
    """The lines of ``_alerts`` about a failed TLS handshake, oldest first."""
    return _lines(_alerts(node), "TLS handshake failed")


# -- appliance config check -------------------------------------------------------


def _file_problems(tmp_path: Path, tls_keys: dict[str, object]) -> str:
    path = tmp_path / "appliance.toml"
    path.write_text(config_text({"tls": {"enabled": True, **tls_keys}}, []))
    found = tls.file_problems(config.load(path))
    return "\n".join(f"{key}: {message}" for key, message in found)


def test_certificate_problems_are_named_with_their_key(
    pki: Pki, tmp_path: Path
) -> None:
    expired = pki.ca.issue("OLD", days=-1)
    good = {
        "certificate": str(pki.server.certificate),
        "key": str(pki.server.key),
        "ca_file": str(pki.ca.certificate),
        "verify_clients": True,
    }

    assert _file_problems(tmp_path, good) == ""
    missing = _file_problems(tmp_path, {**good, "ca_file": str(tmp_path / "x.pem")})
    mismatch = _file_problems(tmp_path, {**good, "key": str(pki.ct1.key)})
    swapped = _file_problems(tmp_path, {**good, "certificate": str(pki.server.key)})
    old = _file_problems(tmp_path, {**good, "certificate": str(expired.certificate),
                                    "key": str(expired.key)})  # fmt: skip

    assert missing == f"tls.ca_file: {tmp_path / 'x.pem'} does not exist"
    assert mismatch == "tls.key: does not match the key of tls.certificate"
    assert swapped.startswith("tls.certificate: ")
    assert swapped.endswith("holds no PEM certificate")
    assert old.startswith("tls.certificate: the certificate expired on")


def test_config_check_reads_the_certificate_files(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    keys = {"enabled": True, "certificate": str(pki.server.certificate),
            "key": str(pki.ct1.key)}  # fmt: skip
    path.write_text(config_text({"tls": keys}, []))
    checked = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert checked.returncode == 1
    assert "tls.key: does not match the key of tls.certificate" in checked.stderr
    assert "1 error(s)" in checked.stderr


def test_tls_keys_that_need_each_other(pki: Pki, tmp_path: Path) -> None:
    files = {
        "certificate": str(pki.server.certificate),
        "key": str(pki.server.key),
    }
    bound = {"ae_title": "CT1", "host": "h", "port": 104, "certificate_cn": "CT1"}
    path = tmp_path / "appliance.toml"

    def problems(settings: dict[str, dict[str, object]], peers: list[dict]) -> str:
        path.write_text(config_text(settings, peers))
        with pytest.raises(ConfigError) as raised:
            config.load(path)
        return str(raised.value)

    same_port = problems({"tls": {"enabled": True, "port": 11112, **files}}, [])
    unbindable = problems({"tls": {"ca_file": str(pki.ca.certificate)}}, [bound])
    bad_fingerprint = problems(
        {}, [{**bound, "certificate_cn": "", "certificate_sha256": "12:AB"}]
    )
    untrusting = problems({"tls": files}, [{**bound, "tls": True}])
    unset = problems({"tls": {"verify_clients": True, "enabled": True}}, [])

    assert "tls.port: must differ from node.port (11112)" in same_port
    assert "binds a certificate, which only tls.enabled can check" in unbindable
    assert "certificate_sha256: must be a SHA-256 fingerprint" in bad_fingerprint
    assert "tls.ca_file: is required by peer CT1" in untrusting
    for name in ("tls.certificate", "tls.key", "tls.ca_file"):
        assert f"{name}: is required by" in unset


def test_export_to_a_peer_over_tls(
    open_node: Node, pki: Pki, to_move: Path, tmp_path: Path
) -> None:
    received = tmp_path / "received"
    received.mkdir()
    target = f"DEST@127.0.0.1:{open_node.destination_port}"
    with storescp_tls(
        open_node.destination_port, pki.destination, pki.ca.certificate, received
    ):
        exported = open_node.appliance.cli("export", "--to", target, check=False)

    assert exported.returncode == 0, exported.stderr
    sent = re.search(r"(\d+) instance\(s\) sent", exported.stdout)
    assert sent is not None, exported.stdout
    files = list(received.iterdir())
    assert int(sent.group(1)) == len(files)
    uids = {pydicom.dcmread(path).SOPInstanceUID for path in files}
    assert pydicom.dcmread(to_move).SOPInstanceUID in uids


def test_a_peer_context_names_files_it_cannot_load(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    keys = {"certificate": str(pki.server.certificate), "key": str(pki.server.key),
            "ca_file": str(tmp_path / "gone.pem")}  # fmt: skip
    peer = {"ae_title": "DEST", "host": "127.0.0.1", "port": 2762, "tls": True}
    path.write_text(config_text({"tls": keys}, [peer]))
    loaded = config.load(path)

    assert tls.client_context(loaded, None) is None
    with pytest.raises(ConfigError, match=r"cannot load tls\.certificate"):
        tls.client_context(loaded, loaded.peer("DEST"))
