"""Patient updates and merges from HL7 ADT.

Against a real ``appliance serve``: an A08 changes the C-FIND answers and
what C-GET and C-MOVE send, while the online files stay byte for byte as
stored; an A40 moves the studies to the surviving patient, a later C-STORE
with the retired ID is filed under the survivor, and a later ADT naming the
retired ID is answered AE; an A47 changes the identifier; bad ADT messages
change nothing. In this process: the issuer rule, the coercion's fast
path and character sets, and a merge that survives a restore from the
mirror. All patients, names and IDs are made up.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from appliance import config as configuration
from appliance.audit.messages import summarize
from appliance.audit.trail import Trail
from appliance.catalog import patients, replication
from appliance.catalog.coercion import coerce, coerced_bytes
from appliance.catalog.query import Query, find
from appliance.catalog.records import patient_key
from appliance.catalog.store import (
    POINTERS_BY_TARGET,
    Catalog,
    encode_key,
    merged_into,
)
from appliance.ingest import Ingest
from appliance.prefetch.intake import Intake
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore.replay import replay_journal
from appliance.storage.online import OnlineTier
from tests import datasets, web_site
from tests import dicom_client as client
from tests.conftest import Appliance, free_port
from tests.ports import held_port
from tests.restore_site import Origin, Restored, answers, mirror_settings
from tests.restore_site import appliance as run_appliance

CT = datasets.CT_IMAGE_STORAGE
ALMA = "PAT-A1"  # Testperson^Alma
BRUNO = "PAT-B2"  # Sample^Bruno


# -- HL7 --------------------------------------------------------------------------


def adt(
    event: str,
    control_id: str,
    pid3: str,
    name: str = "",
    birth: str = "",
    sex: str = "",
    mrg: str | None = None,
) -> str:
    """A made-up ADT message; ``mrg`` None leaves the MRG segment out."""
    structure = {"A08": "ADT_A01", "A31": "ADT_A05", "A40": "ADT_A39"}
    segments = [
        "MSH|^~\\&|ADT|CITYHOSP|PACS|CITYHOSP|20261205031500||"
        f"ADT^{event}^{structure.get(event, 'ADT_A30')}|{control_id}|P|2.5",
        f"EVN|{event}|20261205031500",
        f"PID|1||{pid3}||{name}||{birth}|{sex}",
    ]
    if mrg is not None:
        segments.append(f"MRG|{mrg}")
    return "\r".join(segments) + "\r"


def send_hl7(port: int, text: str) -> list[list[str]]:
    """Send one message over MLLP; the ACK's segments, as fields."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x0b" + text.encode() + b"\x1c\x0d")
        answer = b""
        while not answer.endswith(b"\x1c\x0d"):
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the ACK"
            answer += chunk
    segments = answer.strip(b"\x0b\x1c\x0d").decode().split("\r")
    return [segment.split("|") for segment in segments if segment]


def msa(ack: list[list[str]]) -> list[str]:
    return next(fields for fields in ack if fields[0] == "MSA")


def err(ack: list[list[str]]) -> list[str]:
    return next(fields for fields in ack if fields[0] == "ERR")


# -- the appliance --------------------------------------------------------------


class Destination:
    """A pynetdicom Storage SCP that keeps the data sets it receives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: dict[str, bytes] = {}
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
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received[uid] = event.request.DataSet.getvalue()
        return 0x0000


@dataclass
class Site:
    appliance: Appliance
    hl7_port: int
    destination_port: int
    source: Path

    def store(self, label: str, count: int, **attributes: str) -> list[Path]:
        paths = datasets.study_files(self.source / label, label, count, **attributes)
        statuses = client.store_files(self.appliance.port, paths)
        assert set(statuses.values()) == {0x0000}
        return paths

    def hl7(self, text: str) -> list[list[str]]:
        return send_hl7(self.hl7_port, text)

    def studies(self, **keys: str) -> list[Dataset]:
        wanted = {"PatientName": "", "PatientBirthDate": "", "PatientSex": ""}
        wanted |= {"PatientID": "", "StudyInstanceUID": "", **keys}
        identifier = client.study_identifier("STUDY", **wanted)
        found, status = client.find(self.appliance.port, identifier)
        assert status == 0x0000
        return found

    def patients(self, **keys: str) -> list[Dataset]:
        wanted = {"PatientName": "", "NumberOfPatientRelatedStudies": ""}
        identifier = client.study_identifier("PATIENT", **(wanted | keys))
        identifier.PatientID = identifier.get("PatientID", "")
        found, status = client.find(
            self.appliance.port, identifier, client.PATIENT_FIND
        )
        assert status == 0x0000
        return found

    def get_study(self, study_uid: str) -> dict[str, Dataset]:
        identifier = client.study_identifier("STUDY", StudyInstanceUID=study_uid)
        received, responses = client.get(
            self.appliance.port, identifier, [(CT, [ExplicitVRLittleEndian])]
        )
        assert int(responses[-1].Status) == 0x0000
        return {uid: _decode(raw) for uid, raw in received.items()}

    def online_files(self) -> dict[str, bytes]:
        """Every instance's online file, read from disk."""
        config = configuration.load(self.appliance.config_path)
        online = OnlineTier(config.online_path)
        catalog = Catalog(config.catalog_path, readonly=True)
        found = {}
        try:
            with catalog.read() as txn:
                for uid, _data in catalog.all_records(txn, "instances"):
                    record = catalog.instance(txn, uid)
                    assert record is not None
                    copy = record.copy_on("online")
                    assert copy is not None
                    found[uid] = online.path_of(copy.location).read_bytes()
        finally:
            catalog.close()
        return found


def _data_set(part10: bytes) -> bytes:
    """The bytes of a Part 10 file after its file meta."""
    handle = BytesIO(part10)
    pydicom.filereader.read_preamble(handle, False)
    pydicom.filereader._read_file_meta_info(handle)
    return handle.read()


def _decode(raw: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(raw), force=True)


@pytest.fixture
def site(appliance_factory: Callable[..., Appliance], tmp_path: Path) -> Iterator[Site]:
    hl7_port = free_port()
    # Held for the test: the destination listens only late in it.
    with held_port() as destination:
        peer = {"ae_title": "PYDEST", "host": "127.0.0.1", "port": destination.port}
        settings = {
            "hl7": {"enabled": True, "port": hl7_port},
            "prefetch": {"enabled": False},
            "web": {"accounts": web_site.accounts()},
        }
        appliance = appliance_factory(settings, [peer]).start()
        wait_for(lambda: "HL7 (MLLP) listening on" in appliance.log())
        yield Site(appliance, hl7_port, destination.port, tmp_path / "source")


def wait_for(condition: Callable[[], object], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def uids_of(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path).SOPInstanceUID) for path in paths}


def study_of(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0]).StudyInstanceUID)


def multipart_parts(response: httpx.Response) -> list[bytes]:
    """The parts of a multipart/related answer."""
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
    chunks = response.content.split(f"--{boundary}".encode())[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[1][:-2] for chunk in chunks]


# -- over the network ------------------------------------------------------------


def test_an_update_changes_the_answers_and_what_is_sent_not_the_files(
    site: Site,
) -> None:
    alma = site.store("alma", 2, patient_id=ALMA, patient_name="Testperson^Alma")
    bruno = site.store("bruno", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    stored = site.online_files()
    # The online files hold the data sets as sent (their file meta is the
    # appliance's own).
    assert {uid: _data_set(raw) for uid, raw in stored.items()} == {
        str(pydicom.dcmread(p).SOPInstanceUID): client.dataset_bytes(p)
        for p in alma + bruno
    }

    ack = site.hl7(adt("A08", "U1", f"{ALMA}^^^^MR", "Newname^Alma^B", "19700202", "F"))

    assert msa(ack)[1:3] == ["AA", "U1"]
    (study,) = site.studies(PatientID=ALMA)
    assert (study.PatientName, study.PatientBirthDate, study.PatientSex) == (
        "Newname^Alma^B",
        "19700202",
        "F",
    )
    assert len(site.studies(PatientName="NEWNAME*")) == 1
    assert site.studies(PatientName="Testperson*") == []
    (patient,) = site.patients(PatientName="newname^alma^b")
    assert patient.PatientID == ALMA

    sent = site.get_study(study_of(alma))
    assert set(sent) == uids_of(alma)
    for dataset in sent.values():
        assert dataset.PatientName == "Newname^Alma^B"
        assert dataset.PatientBirthDate == "19700202"
        assert dataset.PatientSex == "F"
    original = pydicom.dcmread(alma[0])
    resent = sent[str(original.SOPInstanceUID)]
    assert resent.PixelData == original.PixelData
    assert resent.StudyDate == original.StudyDate

    # An unchanged patient's instances go out as they were stored.
    received, responses = client.get(
        site.appliance.port,
        client.study_identifier("STUDY", StudyInstanceUID=study_of(bruno)),
        [(CT, [ExplicitVRLittleEndian])],
    )
    assert int(responses[-1].Status) == 0x0000
    (bruno_sent,) = received.values()
    assert bruno_sent == client.dataset_bytes(bruno[0])

    with Destination(site.destination_port) as destination:
        identifier = client.study_identifier("STUDY", StudyInstanceUID=study_of(alma))
        responses = client.move(site.appliance.port, identifier, "PYDEST")
    assert int(responses[-1].Status) == 0x0000
    moved = [_decode(raw) for raw in destination.received.values()]
    assert [d.PatientName for d in moved] == ["Newname^Alma^B"] * 2

    # Web access carries the corrected attributes too; the other patient's
    # instance goes out byte for byte.
    web = web_site.Site(site.appliance)
    with web.client(web_site.VIEWER) as http:
        studies = f"/studies/{study_of(alma)}"
        wado = http.get(studies, headers={"Accept": "multipart/related"})
        metadata = http.get(f"{studies}/metadata").json()
        one = pydicom.dcmread(alma[0])
        uri = http.get(
            "/wado",
            params={
                "requestType": "WADO",
                "studyUID": study_of(alma),
                "seriesUID": str(one.SeriesInstanceUID),
                "objectUID": str(one.SOPInstanceUID),
            },
        )
        unchanged = http.get(
            f"/studies/{study_of(bruno)}", headers={"Accept": "multipart/related"}
        )
    wado_parts = multipart_parts(wado)
    assert len(wado_parts) == 2
    for part in [*wado_parts, uri.content]:
        dataset = pydicom.dcmread(BytesIO(part))
        assert (dataset.PatientName, dataset.PatientSex) == ("Newname^Alma^B", "F")
    assert {m["00100010"]["Value"][0]["Alphabetic"] for m in metadata} == {
        "Newname^Alma^B"
    }
    assert multipart_parts(unchanged) == [stored[next(iter(uids_of(bruno)))]]

    assert site.online_files() == stored
    log = site.appliance.log()
    assert "ADT^A08 control ID U1" in log
    assert "Newname" not in log and "Testperson" not in log and ALMA not in log


def test_a_merge_moves_the_studies_and_keeps_the_old_id_as_a_pointer(
    site: Site,
) -> None:
    alma = site.store("alma", 2, patient_id=ALMA, patient_name="Testperson^Alma")
    site.store("bruno", 1, patient_id=BRUNO, patient_name="Sample^Bruno")

    merge = adt("A40", "M1", f"{ALMA}^^^^MR", "Testperson^Alma", mrg=f"{BRUNO}^^^^MR")
    ack = site.hl7(merge)

    assert msa(ack)[1:3] == ["AA", "M1"]
    assert len(site.studies(PatientID=ALMA)) == 2
    assert site.studies(PatientID=BRUNO) == []
    assert site.patients(PatientID=BRUNO) == []
    (patient,) = site.patients(PatientID=ALMA)
    assert patient.NumberOfPatientRelatedStudies == 2
    assert site.studies(PatientName="Sample*") == []
    assert {str(s.PatientName) for s in site.studies(PatientID=ALMA)} == {
        "Testperson^Alma"
    }
    # The RIS sends the merge again: the same answer, nothing more.
    assert site.hl7(merge) == ack

    # A modality still using the retired ID: filed under the survivor.
    late = site.store("late", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    assert len(site.studies(PatientID=ALMA)) == 3
    assert site.studies(PatientID=BRUNO) == []
    (late_sent,) = site.get_study(study_of(late)).values()
    assert (late_sent.PatientID, late_sent.PatientName) == (ALMA, "Testperson^Alma")
    on_disk = site.online_files()[str(late_sent.SOPInstanceUID)]
    assert _data_set(on_disk) == client.dataset_bytes(late[0])

    # Registration using the retired ID again is answered AE.
    refused = site.hl7(adt("A08", "U2", f"{BRUNO}^^^^MR", "Other^Name"))
    assert msa(refused)[1] == "AE"
    assert "retired" in msa(refused)[3]
    assert err(refused)[3].startswith("204^")
    assert {str(s.PatientName) for s in site.studies(PatientID=ALMA)} == {
        "Testperson^Alma"
    }

    # A47: the survivor gets a new identifier; the pointers follow.
    ack = site.hl7(adt("A47", "C1", "PAT-A9^^^^MR", mrg=f"{ALMA}^^^^MR"))
    assert msa(ack)[1:3] == ["AA", "C1"]
    assert len(site.studies(PatientID="PAT-A9")) == 3
    assert site.studies(PatientID=ALMA) == []
    for sent in site.get_study(study_of(alma)).values():
        assert sent.PatientID == "PAT-A9"
    again = site.hl7(adt("A08", "U3", f"{ALMA}^^^^MR", "Other^Name"))
    assert msa(again)[1] == "AE"
    site.store("later", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    assert len(site.studies(PatientID="PAT-A9")) == 4
    log = site.appliance.log()
    assert "ADT^A40 control ID M1" in log and "merged, 1 study" in log
    assert BRUNO not in log and "Sample" not in log

    # Each change left one audit record, sent again messages none.
    shown = site.appliance.cli("audit", "show", "--patient", ALMA, "--json")
    changes = [
        json.loads(line)
        for line in shown.stdout.splitlines()
        if "patient record" in line
    ]
    assert len(changes) == 2, shown.stdout
    assert "ADT^A40: patient record merged" in json.dumps(changes[0])
    assert BRUNO in json.dumps(changes[0])


def test_bad_adt_messages_change_nothing(site: Site) -> None:
    site.store("alma", 1, patient_id=ALMA, patient_name="Testperson^Alma")
    site.store("bruno", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    before = site.studies()
    files = site.online_files()

    no_pid3 = site.hl7(adt("A08", "B1", "", "Newname^Alma"))
    no_mrg = site.hl7(adt("A40", "B2", f"{ALMA}^^^^MR"))
    empty_mrg = site.hl7(adt("A40", "B3", f"{ALMA}^^^^MR", mrg=""))
    unsupported = site.hl7(adt("A01", "B4", f"{ALMA}^^^^MR", "Newname^Alma"))
    taken = site.hl7(adt("A47", "B5", f"{BRUNO}^^^^MR", mrg=f"{ALMA}^^^^MR"))
    itself = site.hl7(adt("A40", "B6", f"{ALMA}^^^^MR", mrg=f"{ALMA}^^^^MR"))
    bad_date = site.hl7(adt("A08", "B7", f"{ALMA}^^^^MR", birth="19701345"))

    assert msa(no_pid3)[1] == "AE" and "PID-3" in msa(no_pid3)[3]
    assert err(no_pid3)[3].startswith("101^")
    assert msa(no_mrg)[1] == "AE" and "MRG" in msa(no_mrg)[3]
    assert msa(empty_mrg)[1] == "AE" and "MRG-1" in msa(empty_mrg)[3]
    assert msa(unsupported)[1] == "AR" and "A01" in msa(unsupported)[3]
    assert msa(taken)[1] == "AE" and err(taken)[3].startswith("205^")
    assert msa(itself)[1] == "AE" and "same" in msa(itself)[3]
    assert err(itself)[3].startswith("205^")
    assert msa(bad_date)[1] == "AE" and "PID-7" in msa(bad_date)[3]
    assert site.studies() == before
    assert site.online_files() == files
    # A patient the archive does not hold: nothing to change, and AA.
    unknown = site.hl7(adt("A08", "B8", "PAT-ZZ^^^^MR", "Nobody^Here"))
    assert msa(unknown)[1] == "AA"
    assert site.studies() == before


# -- in this process -----------------------------------------------------------------


@dataclass
class Local:
    catalog: Catalog
    ingest: Ingest
    intake: Intake
    folder: Path

    def store(self, label: str, patient_id: str, issuer: str = "", **more: str) -> str:
        study = datasets.uid("study", label)
        dataset = datasets.instance(
            study, datasets.uid("series", label), 1, patient_id=patient_id, **more
        )
        if issuer:
            dataset.IssuerOfPatientID = issuer
        path = datasets.write(dataset, self.folder / label)
        assert self.ingest.import_file(path, "test").ok
        return study

    def hl7(self, text: str) -> list[list[str]]:
        raw = self.intake(text.encode(), "test")
        return [s.split("|") for s in raw.decode().split("\r") if s]

    def names(self, patient_id: str) -> dict[str, str]:
        """Study UID -> PatientName, for the studies filed under an ID."""
        query = Query("STUDY", {"PatientID": patient_id})
        rows = find(self.catalog, query, lambda: False)
        return {str(r["StudyInstanceUID"]): str(r["PatientName"]) for r in rows}


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    catalog = Catalog(tmp_path / "catalog", 2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    ingest = Ingest(catalog, online, "replace")
    try:
        yield Local(catalog, ingest, Intake(catalog), tmp_path / "files")
    finally:
        ingest.close()
        catalog.close()


def test_patients_of_different_issuers_are_not_mixed(local: Local) -> None:
    north = local.store("north", "PAT-7", "NORTH", patient_name="North^Ann")
    south = local.store("south", "PAT-7", "SOUTH", patient_name="South^Bea")

    ambiguous = local.hl7(adt("A08", "I1", "PAT-7^^^^MR", "Changed^Ann"))
    updated = local.hl7(adt("A08", "I2", "PAT-7^^^NORTH^MR", "Changed^Ann"))
    merged = local.hl7(adt("A40", "I3", "PAT-8^^^SOUTH", mrg="PAT-7^^^SOUTH"))

    assert msa(ambiguous)[1] == "AE" and err(ambiguous)[3].startswith("205^")
    assert msa(updated)[1] == msa(merged)[1] == "AA"
    assert local.names("PAT-7") == {north: "Changed^Ann"}
    assert local.names("PAT-8") == {south: "South^Bea"}
    # Later instances: the retired ID of SOUTH follows its pointer; NORTH's
    # patient, still live under the same ID, keeps its own.
    late_south = local.store("late-s", "PAT-7", "SOUTH", patient_name="South^Bea")
    late_north = local.store("late-n", "PAT-7", "NORTH", patient_name="North^Ann")
    assert set(local.names("PAT-8")) == {south, late_south}
    assert set(local.names("PAT-7")) == {north, late_north}
    # Without an issuer, the ID is held by NORTH's patient: no pointer taken.
    with local.catalog.read() as txn:
        assert merged_into(local.catalog, txn, patient_key("PAT-7", "")) is None


def test_a_merge_into_a_patient_not_held_yet_and_of_one_not_held(
    local: Local,
) -> None:
    study = local.store("only", "PAT-1", patient_name="Only^One")

    first = local.hl7(adt("A40", "N1", "PAT-2^^^^MR", "Only^One", mrg="PAT-1"))
    second = local.hl7(adt("A40", "N2", "PAT-2^^^^MR", mrg="PAT-GONE"))
    later = local.store("later", "PAT-GONE", patient_name="Gone^Person")

    assert msa(first)[1] == msa(second)[1] == "AA"
    assert local.names("PAT-2") == {study: "Only^One", later: "Only^One"}
    assert local.names("PAT-1") == local.names("PAT-GONE") == {}


def pointers(catalog: Catalog) -> dict[str, str]:
    """Retired patient key -> the key its pointer names."""
    with catalog.read() as txn:
        return {key: data["into"] for key, data in catalog.all_records(txn, "merged")}


def pointer_index(catalog: Catalog) -> dict[str, set[str]]:
    """The index of pointers as stored: key -> the retired keys filed under it."""
    found: dict[str, set[str]] = {}
    with catalog.read() as txn:
        for raw_key, raw_value in txn.cursor(db=catalog.db[POINTERS_BY_TARGET]):
            retired = found.setdefault(bytes(raw_key).decode(), set())
            retired.add(bytes(raw_value).decode())
    return found


def test_a_chain_of_merges_leaves_one_step_pointers_and_their_index(
    local: Local,
) -> None:
    studies = [local.store(p.lower(), p) for p in ("PAT-A", "PAT-B", "PAT-C")]

    # A into B, a patient not held into B, then B (with A's study) into C.
    for number, (survivor, retired) in enumerate(
        [("PAT-B", "PAT-A"), ("PAT-B", "PAT-X"), ("PAT-C", "PAT-B")]
    ):
        ack = local.hl7(adt("A40", f"K{number}", survivor, mrg=retired))
        assert msa(ack)[1] == "AA", ack
    c, d = patient_key("PAT-C", ""), patient_key("PAT-D", "")
    retired = {patient_key(p, "") for p in ("PAT-A", "PAT-B", "PAT-X")}
    assert pointers(local.catalog) == dict.fromkeys(retired, c)
    assert pointer_index(local.catalog) == {c: retired}

    # C's identifier changed to D: every pointer follows.
    assert msa(local.hl7(adt("A47", "K9", "PAT-D", mrg="PAT-C")))[1] == "AA"

    assert set(local.names("PAT-D")) == set(studies)
    assert pointers(local.catalog) == dict.fromkeys({*retired, c}, d)
    assert pointer_index(local.catalog) == {d: {*retired, c}}
    # Replaying the journal again changes neither.
    replay_journal(local.catalog, list(replication.journal_after(local.catalog, 0)))
    assert pointer_index(local.catalog) == {d: {*retired, c}}


def test_pointers_with_overlong_keys_are_moved_on_too(local: Local) -> None:
    """Keys longer than LMDB allows are filed hashed, in the index too."""
    long_id = "PAT-" + "9" * 450
    with local.catalog.env.begin(write=True) as txn:
        patients.merge(local.catalog, txn, ("PAT-B", ""), (long_id, ""), {}, "A40")
        patients.merge(local.catalog, txn, ("PAT-C", ""), ("PAT-B", ""), {}, "A40")

    long_key, b, c = (patient_key(p, "") for p in (long_id, "PAT-B", "PAT-C"))
    with local.catalog.read() as txn:
        assert merged_into(local.catalog, txn, long_key) == c
    assert pointers(local.catalog) == {long_key: c, b: c}
    assert pointer_index(local.catalog) == {c: {encode_key(long_key).decode(), b}}


def test_coercion_keeps_unchanged_patients_on_the_fast_path(tmp_path: Path) -> None:
    dataset = datasets.instance(datasets.uid("s"), datasets.uid("se"), 1)
    path = datasets.write(dataset, tmp_path)
    stored = path.read_bytes()
    attrs = {"PatientID": "TEST-0001", "PatientName": "Doe^Jane"}
    attrs |= {"PatientBirthDate": "19700101", "PatientSex": "O"}

    assert coerce(path, None) is None
    assert coerce(path, {"attrs": attrs}) is None  # never corrected
    assert coerced_bytes(stored, {"attrs": attrs, "corrected": 1.0}) == stored
    corrected = {"attrs": {**attrs, "PatientName": "Müller^Zoë"}, "corrected": 1.0}
    sent = pydicom.dcmread(BytesIO(coerced_bytes(stored, corrected)))

    assert sent.PatientName == "Müller^Zoë"
    assert sent.SpecificCharacterSet == "ISO_IR 192"
    assert sent.PixelData == dataset.PixelData
    assert path.read_bytes() == stored
    cleared = {"attrs": {"PatientID": "TEST-0001"}, "corrected": 1.0}
    bare = coerce(path, cleared)
    assert bare is not None and "PatientSex" not in bare and "PatientName" not in bare


# -- restore from the mirror -----------------------------------------------------------


def test_a_merge_is_replayed_by_a_restore_from_the_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    origin = Origin(tmp_path, DirectoryTransport(mirror), mirror_settings(mirror))
    intake = Intake(origin.catalog)

    def hl7(text: str) -> str:
        answer = intake(text.encode(), "test").decode()
        return msa([segment.split("|") for segment in answer.split("\r")])[1]

    origin.store("alma", 2, patient_id=ALMA, patient_name="Testperson^Alma")
    origin.store("bruno", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    origin.replicate()
    origin.replicator.send_snapshot()
    assert hl7(adt("A08", "R1", ALMA, "Newname^Alma")) == "AA"
    assert hl7(adt("A40", "R2", ALMA, mrg=BRUNO)) == "AA"
    origin.store("late", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    origin.replicate()
    # A change with no instance after it reaches the mirror on its own.
    assert hl7(adt("A47", "R3", "PAT-A9", mrg=ALMA)) == "AA"
    _replicate_until_idle(origin)
    escrow = origin.escrow()
    _held, found = origin.lose()

    (tmp_path / "new").mkdir()
    restored = Restored(tmp_path / "new", mirror_settings(mirror), escrow)
    done = restored.restore()

    assert done.returncode == 0, done.stderr
    catalog = restored.catalog()
    try:
        assert answers(catalog) == found
        rows = list(
            find(catalog, Query("STUDY", {"PatientID": "PAT-A9"}), lambda: False)
        )
        assert len(rows) == 3
        assert {r["PatientName"] for r in rows} == {"Newname^Alma"}
        with catalog.read() as txn:
            for old in (ALMA, BRUNO):
                pointer = merged_into(catalog, txn, patient_key(old, ""))
                assert pointer == patient_key("PAT-A9", "")
            survivor = catalog.get(txn, "patients", patient_key("PAT-A9", ""))
        assert patients.is_corrected(survivor)
        retired = {patient_key(ALMA, ""), patient_key(BRUNO, "")}
        assert pointer_index(catalog) == {patient_key("PAT-A9", ""): retired}
    finally:
        catalog.close()


def _replicate_until_idle(origin: Origin) -> None:
    """Run the replicator's loop until the journal is on the mirror."""
    stop = threading.Event()
    runner = threading.Thread(target=origin.replicator._run, args=(stop, 0.05))
    runner.start()
    try:
        wait_for(
            lambda: (
                replication.mirror_mark(origin.catalog, "journal_sent")
                == replication.last_journal_number(origin.catalog)
            )
        )
    finally:
        stop.set()
        runner.join(30)


def test_journal_entries_name_the_change(local: Local) -> None:
    local.store("alma", ALMA, patient_name="Testperson^Alma")
    local.hl7(adt("A08", "J1", ALMA, "Newname^Alma"))
    local.hl7(adt("A40", "J2", "PAT-A9", mrg=ALMA))

    entries = list(replication.journal_after(local.catalog, 0))

    changes = [e for e in entries if e["op"] in patients.JOURNAL_OPS]
    assert [e["op"] for e in changes] == ["patient-update", "patient-merge"]
    assert changes[0]["attrs"]["PatientName"] == "Newname^Alma"
    assert changes[1]["merged"] == patient_key(ALMA, "")
    assert changes[1]["into"] == patient_key("PAT-A9", "")


def test_a_restore_drill_after_a_merge_compares_what_would_be_sent(
    tmp_path: Path,
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    origin = Origin(tmp_path, DirectoryTransport(mirror), mirror_settings(mirror))
    intake = Intake(origin.catalog)
    origin.store("alma", 2, patient_id=ALMA, patient_name="Testperson^Alma")
    origin.store("bruno", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    origin.replicate()
    for text in (
        adt("A08", "D1", ALMA, "Newname^Alma"),
        adt("A40", "D2", ALMA, mrg=BRUNO),
    ):
        assert b"MSA|AA|" in intake(text.encode(), "test")

    try:
        done = run_appliance(
            "dr", "drill", "--studies", "10", config=origin.config_path
        )
    finally:
        origin.lose()

    assert done.returncode == 0, done.stdout + done.stderr
    assert "restore drill passed: 2 studies, 3 instances" in done.stdout


def test_hl7_names_dates_and_nulls_become_dicom_values(local: Local) -> None:
    study = local.store("alma", ALMA, patient_name="Testperson^Alma")
    name = "Newname&Mrs^Alma^Beth^Jr^Dr"

    first = local.hl7(adt("A31", "H1", f"{ALMA}~PAT-X^^^OTHER", name, "19700203", "A"))
    cleared = local.hl7(adt("A08", "H2", ALMA, birth='""', sex="U"))

    assert msa(first)[1] == msa(cleared)[1] == "AA"
    rows = list(find(local.catalog, Query("STUDY", {"PatientID": ALMA}), _never))
    assert [r["StudyInstanceUID"] for r in rows] == [study]
    (row,) = rows
    assert row["PatientName"] == "Newname^Alma^Beth^Dr^Jr"
    assert row["OtherPatientIDs"] == "PAT-X"
    assert row["PatientBirthDate"] is None and row["PatientSex"] is None


def test_replaying_patient_changes_again_changes_nothing(local: Local) -> None:
    local.store("alma", ALMA, patient_name="Testperson^Alma")
    local.store("bruno", BRUNO, patient_name="Sample^Bruno")
    local.hl7(adt("A08", "P1", ALMA, "Newname^Alma"))
    local.hl7(adt("A40", "P2", ALMA, mrg=BRUNO))
    local.hl7(adt("A47", "P3", "PAT-A9", mrg=ALMA))
    before = answers(local.catalog)
    entries = list(replication.journal_after(local.catalog, 0))
    last = replication.last_journal_number(local.catalog)

    replay_journal(local.catalog, entries)

    assert answers(local.catalog) == before
    assert replication.last_journal_number(local.catalog) == last
    with local.catalog.read() as txn:
        for old in (ALMA, BRUNO):
            pointer = merged_into(local.catalog, txn, patient_key(old, ""))
            assert pointer == patient_key("PAT-A9", "")


def _never() -> bool:
    return False


def test_an_escape_in_a_name_or_a_backslash_in_an_id_is_refused(
    local: Local,
) -> None:
    study = local.store("alma", ALMA, patient_name="Testperson^Alma")
    # ISO 2022 JIS bytes sent as UTF-8: the text holds ESC characters.
    jis = "\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"

    escaped = local.hl7(adt("A08", "E1", ALMA, jis))
    other_id = local.hl7(adt("A08", "E2", f"{ALMA}~PAT\\E\\X^^^^MR", "New^Alma"))
    new_id = local.hl7(adt("A47", "E3", "NEW\\E\\ID^^^^MR", mrg=ALMA))
    issuer = local.hl7(adt("A40", "E4", "PAT-B^^^CITY\\E\\X", mrg=ALMA))

    assert msa(escaped)[1] == "AE" and err(escaped)[2:4] == [
        "PID^1^5",
        "102^Data type error^HL70357",
    ]
    for ack, field in ((other_id, "PID^1^3"), (new_id, "PID^1^3"), (issuer, "PID^1^3")):
        assert msa(ack)[1] == "AE" and err(ack)[2] == field
        assert "backslash in PID-3" in msa(ack)[3]
    assert local.names(ALMA) == {study: "Testperson^Alma"}
    rows = list(find(local.catalog, Query("STUDY", {"PatientID": ALMA}), _never))
    assert [r["OtherPatientIDs"] for r in rows] == [None]
    assert list(replication.journal_after(local.catalog, 0))[-1]["op"] == "store"


def test_each_applied_change_is_audited_once_naming_the_sender(local: Local) -> None:
    local.store("alma", ALMA, patient_name="Testperson^Alma")
    local.store("bruno", BRUNO, patient_name="Sample^Bruno")
    trail = Trail(local.folder.parent / "audit", "APPLIANCE")
    intake = Intake(local.catalog, trail)

    def send(text: str) -> str:
        ack = intake(text.encode(), "192.0.2.9:40123").decode()
        return ack.split("\r")[1].split("|")[1]

    updated = send(adt("A08", "T1", ALMA, "Newname^Alma"))
    merged = send(adt("A40", "T2", ALMA, mrg=BRUNO))
    resent = send(adt("A40", "T2", ALMA, mrg=BRUNO))
    refused = send(adt("A08", "T3", BRUNO, "Other^Name"))

    assert (updated, merged, resent, refused) == ("AA", "AA", "AA", "AE")
    records = [r for r in trail.log.records() if r.event == "patient-record"]
    summaries = [summarize(r.message) for r in records]
    assert [s.patients for s in summaries] == [[ALMA], [ALMA, BRUNO]]
    for record, summary in zip(records, summaries, strict=True):
        # The RIS's application and host: no AE title, no port.
        assert summary.users[0] == "ADT^CITYHOSP@192.0.2.9"
        root = ET.fromstring(record.message)
        (sender,) = root.findall("ActiveParticipant[@UserIsRequestor='true']")
        assert sender.get("NetworkAccessPointTypeCode") == "2"
        assert sender.get("AlternativeUserID") is None


# A process that dies as soon as a patient change is committed, before it
# writes the audit record: as a kill -9 at that instant would leave it.
_KILLED_AFTER_COMMIT = """
import os, sys
from pathlib import Path
from appliance.audit import owed
from appliance.audit.trail import Trail
from appliance.catalog.store import Catalog
from appliance.prefetch.intake import Intake

catalog = Catalog(Path(sys.argv[1]), 2**26)
intake = Intake(catalog, Trail(Path(sys.argv[2]), "APPLIANCE"))
owed.settle = lambda *args: os._exit(9)
intake(sys.argv[3].encode(), "192.0.2.9:40123")
"""


def test_a_patient_change_killed_before_its_audit_record_gets_it_at_the_next_start(
    local: Local,
) -> None:
    local.store("alma", ALMA, patient_name="Testperson^Alma")
    local.store("bruno", BRUNO, patient_name="Sample^Bruno")
    local.catalog.close()
    audit_folder = local.folder.parent / "audit"
    merge = adt("A40", "K1", ALMA, mrg=BRUNO)
    before = time.time()

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_AFTER_COMMIT,
            str(local.folder.parent / "catalog"),
            str(audit_folder),
            merge,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert killed.returncode == 9, killed.stderr
    ended = time.time()
    time.sleep(1.0)  # the next start comes later than the change
    trail = Trail(audit_folder, "APPLIANCE")
    assert not [r for r in trail.log.records() if r.event == "patient-record"]
    local.catalog = Catalog(local.folder.parent / "catalog", 2**26)
    assert len(local.names(ALMA)) == 2  # the merge is committed
    Intake(local.catalog, trail)
    Intake(local.catalog, trail)  # a second start owes nothing more
    records = [r for r in trail.log.records() if r.event == "patient-record"]
    assert [summarize(r.message).patients for r in records] == [[ALMA, BRUNO]]
    # The time of the change, not of the start that wrote it.
    written = datetime.fromisoformat(records[0].time.replace("Z", "+00:00"))
    assert before - 0.01 <= written.timestamp() <= ended


def test_other_patient_ids_never_hold_the_patients_own_id(local: Local) -> None:
    local.store("alma", ALMA, patient_name="Testperson^Alma")
    local.store("bruno", BRUNO, "NORTH", patient_name="Sample^Bruno")

    # The catalog knows Alma by the second repetition, Bruno by the first.
    alma = local.hl7(adt("A08", "R1", f"PAT-NEW^^^^MR~{ALMA}~PAT-X^^^OTHER", "A^B"))
    bruno = local.hl7(adt("A08", "R2", f"{BRUNO}^^^NORTH~{BRUNO}^^^SOUTH", "C^D"))

    assert msa(alma)[1] == msa(bruno)[1] == "AA"
    found = {}
    for patient_id in (ALMA, BRUNO):
        query = Query("STUDY", {"PatientID": patient_id})
        (row,) = find(local.catalog, query, _never)
        found[patient_id] = row["OtherPatientIDs"]
    assert found == {ALMA: "PAT-NEW\\PAT-X", BRUNO: None}


def test_many_identifiers_among_many_segments_are_read_at_once(local: Local) -> None:
    study = local.store("alma", ALMA, patient_name="Testperson^Alma")
    identifiers = "~".join([ALMA, *(f"PAT-X{n}^^^OTHER" for n in range(2000))])
    text = adt("A08", "M1", identifiers, "Newname^Alma")
    text += "".join(f"ZXX|{n}\r" for n in range(4000))

    started = time.monotonic()
    ack = local.hl7(text)
    took = time.monotonic() - started

    # Each repetition was looked up across every segment: about 13 s.
    assert took < 3
    assert msa(ack)[1] == "AA"
    assert local.names(ALMA) == {study: "Newname^Alma"}
