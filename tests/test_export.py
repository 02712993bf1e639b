"""``appliance export`` end to end, beside a running ``appliance serve``.

Real receivers on loopback: DCMTK's storescp (bit-preserving), and a
pynetdicom Storage SCP that refuses a SOP class, answers failures for
chosen instances, aborts the association after some instances, or answers
slowly so that the export can be stopped in the middle. A study that lives
only on nearline is recalled on the way; one on a shelved volume waits.

All patients, names and IDs are made up.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from appliance.catalog.store import Catalog
from appliance.errors import ExportError
from appliance.export.destination import Destination, parse_destination
from appliance.export.sender import chunks
from appliance.export.state import ExportState
from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance, free_port, require_dcmtk
from tests.ports import held_port, port_for
from tests.read_only import read_only
from tests.test_retrieve import assert_same_data_sets, dcmtk_storescp, received_files

CT = datasets.CT_IMAGE_STORAGE
SC = datasets.SECONDARY_CAPTURE
OUT_OF_RESOURCES = 0xA700
TO_NEARLINE = """
[[rules]]
name = "all-to-nearline"
action = "move"
from = "online"
to = "nearline"
"""
TO_OFFLINE = TO_NEARLINE.replace("nearline", "offline")


# -- the archive ---------------------------------------------------------------


@dataclass
class Archive:
    """A running appliance, what it holds by label, and its command line."""

    appliance: Appliance
    directory: Path
    studies: dict[str, list[Path]]

    def export(self, *args: str, rules: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command("export", *args, rules=rules),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def command(self, *args: str, rules: str = "") -> list[str]:
        config = self.directory / f"cli-{len(rules)}.toml"
        config.write_text(self.appliance.config_path.read_text() + rules)
        return [sys.executable, "-m", "appliance", *args, "--config", str(config)]

    def migrate(self, rules: str) -> None:
        done = subprocess.run(
            self.command("migrate", "--now", rules=rules),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def files(self) -> list[Path]:
        return [path for paths in self.studies.values() for path in paths]

    def uids(self, label: str) -> list[str]:
        return [_sop_uid(path) for path in self.studies[label]]

    def study_uid(self, label: str) -> str:
        return datasets.uid("study", label)

    def store(self, label: str, count: int, **attributes: object) -> None:
        folder = self.directory / "source" / label
        files = datasets.study_files(folder, label, count, **attributes)
        statuses = client.store_files(self.appliance.port, files)
        assert set(statuses.values()) == {0}, self.appliance.log()[-2000:]
        self.studies[label] = files

    def online_studies(self) -> int:
        done = subprocess.run(
            self.command("tiers", "--json"), capture_output=True, text=True
        )
        rows = {row["tier"]: row for row in json.loads(done.stdout)}
        return int(rows["online"]["studies"])


def _sop_uid(path: Path) -> str:
    return str(client.file_meta(path).MediaStorageSOPInstanceUID)


def _secondary_capture(directory: Path, label: str, count: int) -> list[Path]:
    """Instances of another SOP class, stored in implicit VR little endian."""
    study, series = datasets.uid("study", label), datasets.uid("series", label)
    paths = []
    for number in range(1, count + 1):
        dataset = datasets.instance(study, series, number, pixel_bytes=2048)
        dataset.SOPClassUID = SC
        dataset.file_meta.MediaStorageSOPClassUID = SC
        dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        paths.append(datasets.write(dataset, directory))
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One serving appliance: a study only on nearline, two online CT
    studies and a secondary capture study in implicit VR."""
    root = tmp_path_factory.mktemp("export")
    settings = {
        "migration": {"enabled": False, "min_copies": 1},
        "timeouts": {"dimse": 10},
    }
    appliance = Appliance(root, settings)
    appliance.start()
    try:
        archive = Archive(appliance, root, {})
        archive.store("nearline", 3, pixel_bytes=20000)
        archive.migrate(TO_NEARLINE)
        archive.store("ct-a", 4)
        archive.store("ct-b", 2, patient_id="TEST-0002", study_date="20250101")
        files = _secondary_capture(root / "source" / "sc", "sc", 2)
        assert set(client.store_files(appliance.port, files).values()) == {0}
        archive.studies["sc"] = files
        assert archive.online_studies() == 3
        yield archive
    finally:
        appliance.stop()


def _report(result: subprocess.CompletedProcess[str]) -> dict:
    path = result.stdout.strip().splitlines()[-1].removeprefix("report: ")
    return json.loads(Path(path).read_text())


def _assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


# -- receivers -----------------------------------------------------------------


class Receiver:
    """A pynetdicom Storage SCP on loopback that counts what it receives.

    It supports ``sop_classes`` in every transfer syntax, answers
    ``failure`` for the SOP Instance UIDs in ``refuse``, aborts the
    association when the instance numbered ``abort_at`` (counting from 1)
    arrives, and sleeps ``delay`` seconds before each answer.
    """

    def __init__(
        self,
        sop_classes: tuple[str, ...] = (CT, SC),
        refuse: set[str] | None = None,
        abort_at: int | None = None,
        delay: float = 0.0,
        ae_title: str = "PYDEST",
    ) -> None:
        # Held while it lives: a test may listen on it again, later.
        self.port = port_for(self)
        self.ae_title = ae_title
        self.sop_classes = sop_classes
        self.refuse = refuse or set()
        self.abort_at = abort_at
        self.delay = delay
        self.received: dict[str, bytes] = {}
        self.receipts: Counter[str] = Counter()
        self._arrived = 0
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    @property
    def to(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def __enter__(self) -> Receiver:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
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
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self._arrived += 1
            if self._arrived == self.abort_at:
                event.assoc.abort()
                return OUT_OF_RESOURCES
        time.sleep(self.delay)
        if uid in self.refuse:
            return OUT_OF_RESOURCES
        with self._lock:
            self.receipts[uid] += 1
            self.received[uid] = event.request.DataSet.getvalue()
        return 0


def _assert_received_as_stored(receiver: Receiver, files: list[Path]) -> None:
    assert set(receiver.received) == {_sop_uid(path) for path in files}
    for path in files:
        assert receiver.received[_sop_uid(path)] == client.dataset_bytes(path)


# -- the tests -----------------------------------------------------------------


def test_every_instance_arrives_as_stored_with_a_recalled_study(
    archive: Archive, tmp_path: Path
) -> None:
    require_dcmtk()
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()

    with dcmtk_storescp(port, out):
        first = archive.export("--to", f"DCMTK@127.0.0.1:{port}")
        again = archive.export("--to", f"DCMTK@127.0.0.1:{port}")

    assert first.returncode == 0, first.stderr
    assert_same_data_sets(received_files(out), archive.files())
    report = _report(first)
    assert (report["sent"], report["refused"], report["not_sent"]) == (11, [], [])
    assert report["ok"] is True
    assert "11/11 instances" in first.stderr  # the progress bar's last state
    # The recalled study went back below online once it was sent.
    assert archive.online_studies() == 3
    assert again.returncode == 0, again.stderr
    assert "0 instance(s) sent" in again.stdout
    assert "11 accepted by earlier runs" in again.stdout
    assert archive.appliance.process is not None
    assert archive.appliance.process.poll() is None, "serve stopped"


def test_refused_sop_class_and_failure_statuses_are_reported(
    archive: Archive,
) -> None:
    refuse = set(archive.uids("ct-a")[:2])
    with Receiver(sop_classes=(CT,), refuse=refuse) as receiver:
        refused = archive.export("--to", receiver.to)
        expected = (
            {_sop_uid(p) for p in archive.files()} - refuse - set(archive.uids("sc"))
        )
        assert set(receiver.received) == expected

    assert refused.returncode == 1
    _assert_clean(refused)
    statuses = {
        entry["sop_instance_uid"]: (entry["status"], entry["study_uid"])
        for entry in _report(refused)["refused"]
    }
    sc_study = archive.study_uid("sc")
    ct_study = archive.study_uid("ct-a")
    assert statuses == {
        **{uid: ("0xA700", ct_study) for uid in refuse},
        **{uid: ("0x0122", sc_study) for uid in archive.uids("sc")},
    }
    for uid in refuse:
        assert f"refused: instance {uid} of study {ct_study}: status 0xA700" in (
            refused.stderr
        )

    # The same receiver, now accepting everything: only the refused go.
    again = Receiver()
    again.port = receiver.port
    with again:
        resumed = archive.export("--to", again.to)
    assert resumed.returncode == 0, resumed.stderr
    assert set(again.received) == refuse | set(archive.uids("sc"))


def test_since_chooses_studies_by_the_day_they_were_received(
    archive: Archive,
) -> None:
    study = archive.study_uid("ct-b")
    _set_received(archive, study, time.mktime((2024, 6, 1, 12, 0, 0, 0, 0, -1)))
    today = time.strftime("%Y-%m-%d")
    tomorrow = time.strftime("%Y%m%d", time.localtime(time.time() + 86400))

    with Receiver() as receiver:
        later = archive.export("--to", receiver.to, "--since", tomorrow)
        assert later.returncode == 0, later.stderr
        assert receiver.received == {}
        recent = archive.export("--to", receiver.to, "--since", today)
        assert recent.returncode == 0, recent.stderr
        assert set(receiver.received) == {_sop_uid(p) for p in archive.files()} - set(
            archive.uids("ct-b")
        )
        old = archive.export("--to", receiver.to, "--since", "20240601")
    assert old.returncode == 0, old.stderr
    assert "2 instance(s) sent" in old.stdout
    assert set(receiver.received) == {_sop_uid(p) for p in archive.files()}


def _set_received(archive: Archive, study_uid: str, when: float) -> None:
    """Make a study look received on another day (beside the running serve)."""
    catalog = Catalog(archive.appliance.data_dir / "catalog")
    try:
        with catalog.env.begin(write=True) as txn:
            record = catalog.get(txn, "studies", study_uid)
            assert record is not None
            record["received"] = when
            catalog._put(txn, "studies", study_uid, record)
    finally:
        catalog.close()


def test_an_aborted_association_is_resumed_without_sending_twice(
    archive: Archive,
) -> None:
    with Receiver(abort_at=5) as receiver:
        aborted = archive.export("--to", receiver.to)
        assert aborted.returncode == 1
        _assert_clean(aborted)
        assert "run it again" in aborted.stderr
        assert len(receiver.received) == 4
        receiver.abort_at = None
        resumed = archive.export("--to", receiver.to)

    assert resumed.returncode == 0, resumed.stderr
    assert "7 instance(s) sent" in resumed.stdout
    _assert_received_as_stored(receiver, archive.files())
    assert set(receiver.receipts.values()) == {1}


def test_a_stopped_export_resumes_without_sending_twice(archive: Archive) -> None:
    with Receiver(delay=0.2) as receiver:
        process = subprocess.Popen(
            archive.command("export", "--to", receiver.to),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: len(receiver.received) >= 3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, stderr
        assert "interrupted by SIGTERM" in stderr
        assert "report: " in stdout
        assert len(receiver.received) < 11
        receiver.delay = 0.0
        resumed = archive.export("--to", receiver.to)

    assert resumed.returncode == 0, resumed.stderr
    _assert_received_as_stored(receiver, archive.files())
    assert set(receiver.receipts.values()) == {1}


def test_a_killed_export_resumes_and_completes(archive: Archive) -> None:
    with Receiver(delay=0.2) as receiver:
        process = subprocess.Popen(
            archive.command("export", "--to", receiver.to),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: len(receiver.received) >= 3)
        process.kill()
        process.wait(timeout=30)
        receiver.delay = 0.0
        resumed = archive.export("--to", receiver.to)

    assert resumed.returncode == 0, resumed.stderr
    _assert_received_as_stored(receiver, archive.files())
    # At most the instance whose answer was in flight went twice.
    assert sum(receiver.receipts.values()) <= len(archive.files()) + 1


def _wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.parametrize(
    "to",
    ["PACS", "PACS@", "@127.0.0.1:104", "PACS@127.0.0.1", "PACS@host:99999"],
)
def test_a_malformed_destination_is_a_usage_error(archive: Archive, to: str) -> None:
    result = archive.export("--to", to)

    assert result.returncode == 2
    assert "Invalid value for --to" in result.stderr
    _assert_clean(result)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--since", "2024061"),
        ("--since", "2024-02-30"),
        # Before the epoch by more than a time zone: no local timestamp.
        ("--since", "00010101"),
        ("--calling-ae", "A\\B"),
        ("--calling-ae", ""),
    ],
)
def test_a_malformed_date_or_calling_ae_is_a_usage_error(
    archive: Archive, option: str, value: str
) -> None:
    result = archive.export("--to", "PACS@127.0.0.1:104", option, value)

    assert result.returncode == 2
    assert f"Invalid value for {option}" in result.stderr
    _assert_clean(result)


def test_a_receiver_that_is_down_is_named(archive: Archive) -> None:
    # Held for the test, so that nothing listens there.
    with held_port() as nowhere:
        port = nowhere.port
        result = archive.export("--to", f"NOBODY@127.0.0.1:{port}")

    assert result.returncode == 1
    _assert_clean(result)
    assert f"cannot connect to NOBODY at 127.0.0.1:{port}" in result.stderr
    assert "run it again" in result.stderr
    assert _report(result)["sent"] == 0


def test_a_receiver_refusing_the_association_is_named(archive: Archive) -> None:
    with Receiver(ae_title="PYDEST") as receiver:
        result = archive.export("--to", f"WRONGAE@127.0.0.1:{receiver.port}")

    assert result.returncode == 1
    _assert_clean(result)
    assert f"WRONGAE at 127.0.0.1:{receiver.port} rejected the association" in (
        result.stderr
    )
    assert "Called AE title not recognised" in result.stderr
    assert receiver.received == {}


# -- a study on a shelved volume -------------------------------------------------


def test_a_study_on_a_shelved_volume_waits_and_the_others_go(
    tmp_path: Path,
) -> None:
    settings = {"migration": {"enabled": False, "min_copies": 1}}
    appliance = Appliance(tmp_path, settings)
    appliance.start()
    with contextlib.ExitStack() as stack:
        stack.callback(appliance.stop)
        archive = Archive(appliance, tmp_path, {})
        label = subprocess.run(
            archive.command("volumes", "label", "L00007", "--capacity", "1G"),
            capture_output=True,
            text=True,
        )
        assert label.returncode == 0, label.stderr
        archive.store("shelved", 2)
        archive.migrate(TO_OFFLINE)
        archive.store("online", 2)
        volume = appliance.data_dir / "volumes" / "L00007"
        volume.rename(tmp_path / "L00007")

        with Receiver() as receiver:
            waiting = archive.export("--to", receiver.to)
            assert set(receiver.received) == set(archive.uids("online"))
            (tmp_path / "L00007").rename(volume)
            loaded = archive.export("--to", receiver.to)

    assert waiting.returncode == 1
    _assert_clean(waiting)
    not_sent = _report(waiting)["not_sent"]
    assert [(e["study_uid"], e["instances"], e["volumes"]) for e in not_sent] == [
        (archive.study_uid("shelved"), 2, ["L00007"])
    ]
    assert "waiting for volume(s) L00007 to be loaded" in waiting.stderr
    assert loaded.returncode == 0, loaded.stderr
    _assert_received_as_stored(receiver, archive.files())


# -- the state journal and the destination, without a network ---------------------


def test_the_state_keeps_the_latest_answer_and_drops_a_torn_line(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "exports" / "PACS@host-104"
    state = ExportState(folder).open()
    state.record("1.1", "9.9", 0xA700, 10, "no room")
    state.record("1.1", "9.9", 0x0000, 10)
    state.record("1.2", "9.9", 0xB000, 20)
    state.record("1.3", "9.9", 0xC000, 30)
    state.close()
    with open(state.path, "a") as journal:
        journal.write('{"uid":"1.4","study":"9.9","sta')

    again = ExportState(folder).open()
    again.close()

    assert [again.accepted(uid) for uid in ("1.1", "1.2", "1.3", "1.4")] == [
        True,
        True,
        False,
        False,
    ]
    assert again.answers["1.3"].status == 0xC000
    assert len(again.path.read_text().splitlines()) == 3


def test_a_state_damaged_before_its_last_line_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "exports" / "PACS@host-104"
    state = ExportState(folder).open()
    state.record("1.1", "9.9", 0, 10)
    state.close()
    text = state.path.read_text()
    state.path.write_text("not json\n" + text)

    with pytest.raises(ExportError, match="damaged at line 1"):
        ExportState(folder).open()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@10.0.0.5:104", Destination("PACS", "10.0.0.5", 104)),
        ("NEW PACS@pacs.example:11112", Destination("NEW PACS", "pacs.example", 11112)),
        ("PACS@[::1]:104", Destination("PACS", "::1", 104)),
    ],
)
def test_destinations_parse(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected
    assert str(parse_destination(str(expected))) == str(expected)
    assert "/" not in expected.folder_name and " " not in expected.folder_name


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("PACS@::1:104", "IPv6 address in brackets"),
        ("A\\B@host:104", "without backslash"),
        ("PACS@ho st:104", "not a host name"),
        ("PACS@host:x", "port must be a number"),
        ("PACS@:104", "host or port missing"),
        ("PACS@127.0.0.1/../etc:104", "not a host name"),
        ("PACS@" + "a" * 64 + ".example:104", "not a host name"),
        ("PACS@host:\u00b2", "port must be a number"),
        ("PACS@host:\u0661\u0660\u0664", "port must be a number"),
    ],
)
def test_malformed_destinations_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_destination(text)


def test_one_export_per_destination_at_a_time(tmp_path: Path) -> None:
    folder = tmp_path / "exports" / "PACS@host-104"
    first = ExportState(folder).open()
    try:
        with pytest.raises(ExportError, match="another export"):
            ExportState(folder).open()
    finally:
        first.close()
    ExportState(folder).open().close()


def test_pairs_beyond_128_go_on_further_associations() -> None:
    pairs = [(f"1.2.3.{n % 150}", f"1.2.840.10008.1.2.{n // 150}") for n in range(300)]

    groups = chunks(pairs + pairs[:10])

    assert [len(group) for group in groups] == [128, 128, 44]
    assert sorted(pair for group in groups for pair in group) == sorted(set(pairs))


def test_a_read_only_exports_folder_is_named_without_errno(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()

    with read_only(exports), pytest.raises(ExportError) as raised:
        ExportState(exports / "PACS@host-104").open()

    assert str(raised.value) == (
        f"cannot keep the export state in {exports / 'PACS@host-104'}: "
        "Read-only file system"
    )
