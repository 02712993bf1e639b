"""C-FIND through the network, end to end, against a real ``appliance serve``.

A small archive of made-up patients is stored once per module over C-STORE;
then queries go out with pynetdicom (Study Root and Patient Root) and with
DCMTK's findscu. A last test runs the catalog query in-process to show that
the common study queries read an index instead of every study.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND

from appliance.catalog import query as catalog_query
from appliance.catalog.store import Catalog
from appliance.dicom.find import answer_find
from appliance.ingest import Ingest
from appliance.storage.online import OnlineTier
from tests import dicom_client as client
from tests.conftest import Appliance, dcmtk, require_dcmtk
from tests.datasets import instance, uid, write

STUDY_FIND = client.STUDY_FIND
PATIENT_FIND = client.PATIENT_FIND
PENDING = 0xFF00
SUCCESS = 0x0000
CANCELLED = 0xFE00
FAILURES = {0xA900, 0xC000}

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
# Non-conformant Study Instance UIDs the archive must keep and find as sent.
UID_WITH_LETTER = "1.2.826.0.1.3680043.10.1009.4004.5a"
UID_TOO_LONG = "1.2.826.0.1.3680043.10.1009." + "1234567890" * 4 + ".7"


@dataclass
class StudySpec:
    """One made-up study: its patient, when it happened, and its series."""

    patient_id: str
    issuer: str
    name: str
    charset: str | None
    date: str
    time: str
    accession: str
    series: list[tuple[str, int]]
    study_uid: str | None = None
    description: str | None = None


STUDIES = {
    "A": StudySpec(
        "P-1001",
        "HOSP-A",
        "Müller^Jürgen",
        "ISO_IR 100",
        "20260110",
        "091500",
        "ACC-1001",
        [("CT", 2), ("MR", 1)],
        description="Chest CT",
    ),
    "B": StudySpec(
        "P-1001",
        "HOSP-B",
        "Smith^Anna",
        None,
        "20260111",
        "233000",
        "ACC-1002",
        [("MR", 1)],
    ),
    "C": StudySpec(
        "P-2002",
        "",
        "Gößmann^Björn",
        "ISO_IR 192",
        "20260112",
        "001500",
        "ACC-2002",
        [("US", 2)],
    ),
    "D": StudySpec(
        "P-3003",
        "",
        JAPANESE,
        "\\ISO 2022 IR 87",
        "20260201",
        "140000",
        "ACC-3003",
        [("CT", 1)],
    ),
    "E": StudySpec(
        "P-4004",
        "",
        "Doe^John",
        None,
        "20251231",
        "120000",
        "ACC-4004",
        [("MR", 1)],
        UID_WITH_LETTER,
    ),
    "F": StudySpec(
        "P-4004",
        "",
        "Doe^John",
        None,
        "20260301",
        "080000",
        "ACC-4005",
        [("US", 1)],
        UID_TOO_LONG,
    ),
}


@dataclass
class Archive:
    """The running appliance and the UIDs of what was stored in it."""

    appliance: Appliance
    studies: dict[str, str] = field(default_factory=dict)
    series: dict[tuple[str, int], str] = field(default_factory=dict)
    instances: dict[str, list[str]] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.appliance.port

    def label_of(self, study_uid: str) -> str:
        return next(k for k, v in self.studies.items() if v == study_uid)


# -- the archive ---------------------------------------------------------------


def study_datasets(label: str, spec: StudySpec) -> Iterator[Dataset]:
    """The instances of one study of :data:`STUDIES`, series by series."""
    study = spec.study_uid or uid("find-study", label)
    for index, (modality, count) in enumerate(spec.series):
        series = uid("find-series", label, index)
        for number in range(1, count + 1):
            dataset = instance(
                study,
                series,
                number,
                patient_id=spec.patient_id,
                patient_name=spec.name,
                modality=modality,
                study_date=spec.date,
                study_time=spec.time,
                accession=spec.accession,
                pixel_bytes=64,
                charset=spec.charset,
            )
            dataset.SeriesNumber = index + 1
            if spec.issuer:
                dataset.IssuerOfPatientID = spec.issuer
            if spec.description:
                dataset.StudyDescription = spec.description
            yield dataset


def write_archive(directory: Path, archive: Archive) -> list[Path]:
    """Write every study of :data:`STUDIES`; note their UIDs in ``archive``."""
    paths = []
    with pydicom.config.disable_value_validation():
        for label, spec in STUDIES.items():
            for dataset in study_datasets(label, spec):
                series_key = (label, int(dataset.SeriesNumber) - 1)
                archive.studies[label] = dataset.StudyInstanceUID
                archive.series[series_key] = dataset.SeriesInstanceUID
                sops = archive.instances.setdefault(dataset.SeriesInstanceUID, [])
                sops.append(dataset.SOPInstanceUID)
                paths.append(write(dataset, directory))
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """An appliance holding :data:`STUDIES`, stored over C-STORE; the one
    whose Study Instance UID is longer than 64 characters, which C-STORE
    refuses, imported as from an old archive (``appliance import``)."""
    directory = tmp_path_factory.mktemp("find")
    node_dir = directory / "node"
    node_dir.mkdir()
    appliance = Appliance(node_dir)
    archive = Archive(appliance)
    paths = write_archive(directory / "files", archive)
    imported = [path for path in paths if _study_of(path) == UID_TOO_LONG]
    (directory / "import").mkdir()
    for path in imported:
        path.rename(directory / "import" / path.name)

    appliance.start()
    try:
        sent = [path for path in paths if path not in imported]
        statuses = client.store_files(appliance.port, sent)
        assert set(statuses.values()) == {SUCCESS}
        appliance.cli("import", str(directory / "import"))
        yield archive
    finally:
        appliance.stop()


def _study_of(path: Path) -> str:
    with pydicom.config.disable_value_validation():
        return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_non_conformant_uids_are_stored_with_a_warning(archive: Archive) -> None:
    log = archive.appliance.log()
    warnings = [
        line
        for line in log.splitlines()
        if " WARNING " in line and f"StudyInstanceUID {UID_WITH_LETTER!r}" in line
    ]
    instance_count = sum(
        len(archive.instances[archive.series[key]])
        for key in archive.series
        if archive.studies[key[0]] == UID_WITH_LETTER
    )
    assert instance_count and len(warnings) == instance_count


def test_a_study_uid_over_64_characters_is_refused_over_c_store(
    archive: Archive,
) -> None:
    """Kept when imported (and found, below), refused when sent."""
    imported = sorted((archive.appliance.directory.parent / "import").iterdir())
    assert len(imported) == 1
    statuses = client.store_files(archive.port, imported)
    assert set(statuses.values()) == {0xA900}


# -- helpers -------------------------------------------------------------------


def identifier(level: str | None, charset: str | None = None, **keys: Any) -> Dataset:
    """A C-FIND identifier; values are set as given, even invalid ones."""
    dataset = Dataset()
    with pydicom.config.disable_value_validation():
        if charset is not None:
            dataset.SpecificCharacterSet = charset
        if level is not None:
            dataset.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(dataset, keyword, value)
    return dataset


def run_find(
    port: int, query: Dataset, model: str = STUDY_FIND
) -> tuple[list[Dataset], int]:
    """The matches and final status of one C-FIND on a new association."""
    with pydicom.config.disable_value_validation():
        return client.find(port, query, model)


def study_labels(archive: Archive, matches: list[Dataset]) -> list[str]:
    return sorted(archive.label_of(str(m.StudyInstanceUID)) for m in matches)


def problems_since(appliance: Appliance, offset: int) -> list[str]:
    """WARNING and ERROR lines the appliance logged after ``offset``."""
    lines = appliance.log()[offset:].splitlines()
    return [line for line in lines if " WARNING " in line or " ERROR " in line]


def wait_for_problems(appliance: Appliance, offset: int) -> list[str]:
    """Problem lines after ``offset``, once logging has had a moment."""
    deadline = time.monotonic() + 5
    found = problems_since(appliance, offset)
    while not found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = problems_since(appliance, offset)
    time.sleep(0.2)  # a second line, if one were coming, would be here now
    return problems_since(appliance, offset)


def assert_still_serving(archive: Archive) -> None:
    """A normal C-FIND on a new association still gets the right answer."""
    query = identifier("STUDY", PatientID="P-2002", StudyInstanceUID="")
    matches, status = run_find(archive.port, query)
    assert status == SUCCESS
    assert study_labels(archive, matches) == ["C"]


# -- matching rules at STUDY level ---------------------------------------------

ALL = ["A", "B", "C", "D", "E", "F"]
STUDY_MATCHING = [
    ("single PatientID", None, {"PatientID": "P-2002"}, ["C"]),
    ("shared PatientID", None, {"PatientID": "P-1001"}, ["A", "B"]),
    (
        "PatientID with issuer",
        None,
        {"PatientID": "P-1001", "IssuerOfPatientID": "HOSP-B"},
        ["B"],
    ),
    ("universal empty", None, {"PatientID": "", "AccessionNumber": ""}, ALL),
    ("universal star", None, {"PatientName": "*"}, ALL),
    ("single accession", None, {"AccessionNumber": "ACC-4005"}, ["F"]),
    ("wildcard star", None, {"AccessionNumber": "ACC-10*"}, ["A", "B"]),
    ("wildcard question", None, {"AccessionNumber": "ACC-?002"}, ["B", "C"]),
    ("wildcard both", None, {"PatientID": "P-?00*"}, ALL),
    ("single date", None, {"StudyDate": "20260112"}, ["C"]),
    ("closed date range", None, {"StudyDate": "20260110-20260111"}, ["A", "B"]),
    ("open start date", None, {"StudyDate": "-20260110"}, ["A", "E"]),
    ("open end date", None, {"StudyDate": "20260201-"}, ["D", "F"]),
    ("late evening", None, {"StudyTime": "2300-2359"}, ["B"]),
    ("after midnight", None, {"StudyTime": "0000-0100"}, ["C"]),
    ("open end time", None, {"StudyTime": "1400-"}, ["B", "D"]),
    ("open start time", None, {"StudyTime": "-0900"}, ["C", "F"]),
    ("time across midnight", None, {"StudyTime": "2200-0100"}, ["B", "C"]),
    (
        "date and time",
        None,
        {"StudyDate": "20260101-20260131", "StudyTime": "0900-1000"},
        ["A"],
    ),
    ("UID list", None, {"StudyInstanceUID": "{A}\\{C}"}, ["A", "C"]),
    ("UID with a letter", None, {"StudyInstanceUID": UID_WITH_LETTER}, ["E"]),
    ("UID over 64 chars", None, {"StudyInstanceUID": UID_TOO_LONG}, ["F"]),
    ("name prefix", None, {"PatientName": "Doe*"}, ["E", "F"]),
    ("name exact", None, {"PatientName": "Smith^Anna"}, ["B"]),
    ("name case", None, {"PatientName": "DOE^JOHN"}, ["E", "F"]),
    ("latin-1 name", "ISO_IR 100", {"PatientName": "Mül*"}, ["A"]),
    ("latin-1 name case", "ISO_IR 100", {"PatientName": "müller^jürgen"}, ["A"]),
    ("latin-1 query, utf-8 name", "ISO_IR 100", {"PatientName": "Gößmann*"}, ["C"]),
    ("utf-8 query, 2022 name", "ISO_IR 192", {"PatientName": "やまだ*"}, ["D"]),
    ("utf-8 kanji group", "ISO_IR 192", {"PatientName": "山田^太郎"}, ["D"]),
    ("name groups", "ISO_IR 192", {"PatientName": "Yamada*=山田*"}, ["D"]),
    ("modality in study", None, {"ModalitiesInStudy": "US"}, ["C", "F"]),
    ("modality list", None, {"ModalitiesInStudy": "CT\\US"}, ["A", "C", "D", "F"]),
    (
        "several keys",
        None,
        {"PatientID": "P-4004", "StudyDate": "20260101-"},
        ["F"],
    ),
    ("no match", None, {"AccessionNumber": "ACC-9999"}, []),
]


def with_uids(archive: Archive, keys: dict[str, str]) -> dict[str, str]:
    """``keys`` with ``{A}``-style placeholders replaced by study UIDs."""
    return {k: v.format(**archive.studies) for k, v in keys.items()}


@pytest.mark.parametrize(
    ("charset", "keys", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in STUDY_MATCHING],
)
@pytest.mark.parametrize("model", [STUDY_FIND, PATIENT_FIND], ids=["study", "pat"])
def test_study_level_matching(
    archive: Archive,
    model: str,
    charset: str | None,
    keys: dict[str, str],
    expected: list[str],
) -> None:
    query = identifier(
        "STUDY", charset, **{"StudyInstanceUID": "", **with_uids(archive, keys)}
    )

    matches, status = run_find(archive.port, query, model)

    assert status == SUCCESS
    assert study_labels(archive, matches) == expected


# -- PATIENT level ---------------------------------------------------------------

PATIENT_MATCHING = [
    (
        "by id",
        None,
        {"PatientID": "P-1001"},
        [("P-1001", "HOSP-A"), ("P-1001", "HOSP-B")],
    ),
    ("by name", None, {"PatientName": "Doe*"}, [("P-4004", "")]),
    ("by phonetic name", "ISO_IR 192", {"PatientName": "やまだ*"}, [("P-3003", "")]),
    ("by latin-1 name", "ISO_IR 100", {"PatientName": "GÖSSMANN*"}, [("P-2002", "")]),
]


@pytest.mark.parametrize(
    ("charset", "keys", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in PATIENT_MATCHING],
)
def test_patient_level(
    archive: Archive,
    charset: str | None,
    keys: dict[str, str],
    expected: list[tuple[str, str]],
) -> None:
    query = identifier("PATIENT", charset, PatientID="", IssuerOfPatientID="")
    query.update(identifier(None, **keys))

    matches, status = run_find(archive.port, query, PATIENT_FIND)

    assert status == SUCCESS
    found = sorted((str(m.PatientID), str(m.IssuerOfPatientID)) for m in matches)
    assert found == expected


def test_patient_level_counts_studies(archive: Archive) -> None:
    query = identifier(
        "PATIENT", PatientID="P-4004", PatientName="", NumberOfPatientRelatedStudies=""
    )

    matches, status = run_find(archive.port, query, PATIENT_FIND)

    assert status == SUCCESS
    assert len(matches) == 1
    assert str(matches[0].PatientName) == "Doe^John"
    assert int(matches[0].NumberOfPatientRelatedStudies) == 2


def test_patient_level_is_refused_in_study_root(archive: Archive) -> None:
    offset = len(archive.appliance.log())
    query = identifier("PATIENT", PatientID="P-1001")

    matches, status = run_find(archive.port, query, STUDY_FIND)

    assert matches == []
    assert status in FAILURES
    assert len(wait_for_problems(archive.appliance, offset)) == 1
    assert_still_serving(archive)


def test_failure_carries_an_error_comment(archive: Archive) -> None:
    query = identifier("PATIENT", PatientID="P-1001")

    with client.associate(archive.port, [(STUDY_FIND, [])]) as assoc:
        responses = list(assoc.send_c_find(query, STUDY_FIND))

    assert len(responses) == 1
    status, found = responses[0]
    assert int(status.Status) in FAILURES
    assert "PATIENT" in str(status.ErrorComment)
    assert found is None


# -- SERIES and IMAGE levels ---------------------------------------------------


@pytest.mark.parametrize("model", [STUDY_FIND, PATIENT_FIND], ids=["study", "pat"])
def test_series_level_by_study(archive: Archive, model: str) -> None:
    query = identifier(
        "SERIES",
        PatientID="P-1001",
        StudyInstanceUID=archive.studies["A"],
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
        NumberOfSeriesRelatedInstances="",
    )

    matches, status = run_find(archive.port, query, model)

    assert status == SUCCESS
    found = sorted(
        (
            str(m.SeriesInstanceUID),
            m.Modality,
            int(m.SeriesNumber),
            int(m.NumberOfSeriesRelatedInstances),
        )
        for m in matches
    )
    expected = sorted(
        [
            (archive.series[("A", 0)], "CT", 1, 2),
            (archive.series[("A", 1)], "MR", 2, 1),
        ]
    )
    assert found == expected


def test_series_level_with_modality(archive: Archive) -> None:
    query = identifier(
        "SERIES",
        StudyInstanceUID=archive.studies["A"],
        SeriesInstanceUID="",
        Modality="MR",
    )

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    assert [str(m.SeriesInstanceUID) for m in matches] == [archive.series[("A", 1)]]


@pytest.mark.parametrize(("label", "index"), [("A", 0), ("C", 0), ("E", 0)])
def test_image_level_by_series(archive: Archive, label: str, index: int) -> None:
    series_uid = archive.series[(label, index)]
    query = identifier(
        "IMAGE",
        StudyInstanceUID=archive.studies[label],
        SeriesInstanceUID=series_uid,
        SOPInstanceUID="",
        InstanceNumber="",
    )

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    found = sorted((str(m.SOPInstanceUID), int(m.InstanceNumber)) for m in matches)
    expected = archive.instances[series_uid]
    assert found == sorted(zip(expected, range(1, len(expected) + 1), strict=True))


# -- response shape --------------------------------------------------------------

STUDY_KEYS = {
    "PatientName": "",
    "PatientID": "",
    "StudyDate": "",
    "StudyTime": "",
    "AccessionNumber": "",
    "StudyInstanceUID": "",
    "StudyDescription": "",
    "ReferringPhysicianName": "",
    "PatientMotherBirthName": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedSeries": "",
    "NumberOfStudyRelatedInstances": "",
    "NumberOfPatientRelatedStudies": "",
}
EXPECTED_STUDIES = {
    "A": ("P-1001", "20260110", "ACC-1001", ["CT", "MR"], 2, 3, 1),
    "B": ("P-1001", "20260111", "ACC-1002", ["MR"], 1, 1, 1),
    "C": ("P-2002", "20260112", "ACC-2002", ["US"], 1, 2, 1),
    "D": ("P-3003", "20260201", "ACC-3003", ["CT"], 1, 1, 1),
    "E": ("P-4004", "20251231", "ACC-4004", ["MR"], 1, 1, 2),
    "F": ("P-4004", "20260301", "ACC-4005", ["US"], 1, 1, 2),
}
RESPONSE_ONLY = {"QueryRetrieveLevel", "RetrieveAETitle"}


def keywords(dataset: Dataset) -> set[str]:
    return {element.keyword for element in dataset}


def study_summary(match: Dataset) -> tuple[object, ...]:
    modalities = match.ModalitiesInStudy
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    return (
        match.PatientID,
        match.StudyDate,
        match.AccessionNumber,
        sorted(modalities),
        int(match.NumberOfStudyRelatedSeries),
        int(match.NumberOfStudyRelatedInstances),
        int(match.NumberOfPatientRelatedStudies),
    )


def test_study_response_has_exactly_the_requested_keys(archive: Archive) -> None:
    query = identifier("STUDY", "ISO_IR 192", **STUDY_KEYS)

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    assert len(matches) == len(STUDIES)
    expected = set(STUDY_KEYS) | RESPONSE_ONLY | {"SpecificCharacterSet"}
    for match in matches:
        assert keywords(match) == expected
        assert match.QueryRetrieveLevel == "STUDY"
        assert match.RetrieveAETitle == archive.appliance.ae_title


def test_unknown_values_are_present_but_empty(archive: Archive) -> None:
    query = identifier("STUDY", **STUDY_KEYS)

    matches, _status = run_find(archive.port, query)

    assert len(matches) == len(STUDIES)
    for match in matches:
        for keyword in ("ReferringPhysicianName", "PatientMotherBirthName"):
            assert keyword in match
            assert match[keyword].value in ("", None)
        label = archive.label_of(str(match.StudyInstanceUID))
        assert match.StudyDescription == (STUDIES[label].description or "")


def test_computed_study_keys(archive: Archive) -> None:
    query = identifier("STUDY", **STUDY_KEYS)

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    found = {
        archive.label_of(str(m.StudyInstanceUID)): study_summary(m) for m in matches
    }
    assert found == EXPECTED_STUDIES


def test_ascii_response_has_no_character_set(archive: Archive) -> None:
    query = identifier("STUDY", PatientID="P-4004", PatientName="", StudyDate="")

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    assert len(matches) == 2
    for match in matches:
        assert keywords(match) == {"PatientID", "PatientName", "StudyDate"} | (
            RESPONSE_ONLY
        )


def test_series_response_shape(archive: Archive) -> None:
    query = identifier(
        "SERIES",
        StudyInstanceUID=archive.studies["C"],
        SeriesInstanceUID="",
        SeriesDescription="",
        NumberOfSeriesRelatedInstances="",
    )

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    assert len(matches) == 1
    assert (
        keywords(matches[0])
        == {
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SeriesDescription",
            "NumberOfSeriesRelatedInstances",
        }
        | RESPONSE_ONLY
    )
    assert matches[0].SeriesDescription in ("", None)
    assert int(matches[0].NumberOfSeriesRelatedInstances) == 2


# -- transfer syntaxes and PDU sizes -------------------------------------------


def find_with(
    port: int, query: Dataset, syntax: str, max_pdu: int = 16384
) -> list[Dataset]:
    """The matches of one C-FIND over one transfer syntax and PDU size."""
    ae = AE(ae_title="FINDSCU")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(STUDY_FIND, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(query, STUDY_FIND))
    finally:
        assoc.release()
    assert int(responses[-1][0].Status) == SUCCESS
    return [found for status, found in responses if int(status.Status) == PENDING]


def by_study(matches: list[Dataset]) -> dict[str, dict[str, Any]]:
    return {
        str(m.StudyInstanceUID): {e.keyword: e.value for e in m if e.keyword}
        for m in matches
    }


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian],
    ids=lambda s: UID(s).name,
)
def test_every_transfer_syntax_gives_the_same_answers(
    archive: Archive, syntax: str
) -> None:
    query = identifier("STUDY", "ISO_IR 192", **STUDY_KEYS)
    reference = by_study(find_with(archive.port, query, ImplicitVRLittleEndian))

    matches = find_with(archive.port, query, syntax)

    assert len(reference) == len(STUDIES)
    assert by_study(matches) == reference


def test_responses_larger_than_the_peer_pdu_are_fragmented(archive: Archive) -> None:
    query = identifier("STUDY", "ISO_IR 192", **STUDY_KEYS)
    reference = by_study(find_with(archive.port, query, ImplicitVRLittleEndian))

    matches = find_with(archive.port, query, ImplicitVRLittleEndian, max_pdu=64)

    assert by_study(matches) == reference


# -- character sets of responses -----------------------------------------------

CHARSET_CASES = [
    ("latin-1 asked, latin-1 fits", "A", "ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
    ("utf-8 asked", "A", "ISO_IR 192", "Müller^Jürgen", "ISO_IR 192"),
    ("nothing asked, latin-1 name", "A", None, "Müller^Jürgen", "ISO_IR 192"),
    (
        "latin-1 asked for utf-8 name",
        "C",
        "ISO_IR 100",
        "Gößmann^Björn",
        "ISO_IR 100",
    ),
    ("latin-1 asked, japanese name", "D", "ISO_IR 100", JAPANESE, "ISO_IR 192"),
    ("utf-8 asked, japanese name", "D", "ISO_IR 192", JAPANESE, "ISO_IR 192"),
]


@pytest.mark.parametrize(
    ("label", "charset", "name", "used"),
    [pytest.param(*case[1:], id=case[0]) for case in CHARSET_CASES],
)
def test_response_character_set(
    archive: Archive,
    monkeypatch: pytest.MonkeyPatch,
    label: str,
    charset: str | None,
    name: str,
    used: str,
) -> None:
    # Logging a response would decode its values before the test sees them.
    monkeypatch.setattr(_config, "LOG_RESPONSE_IDENTIFIERS", False)
    query = identifier(
        "STUDY", charset, StudyInstanceUID=archive.studies[label], PatientName=""
    )

    matches, status = run_find(archive.port, query)

    assert status == SUCCESS
    assert len(matches) == 1
    match = matches[0]
    assert match.SpecificCharacterSet == used
    raw = match.get_item("PatientName").value
    assert raw.rstrip(b" ") == name.encode(pydicom.charset.python_encoding[used])
    assert str(match.PatientName) == name


# -- bad requests ----------------------------------------------------------------

BAD_REQUESTS = [
    ("no level", None, {"PatientID": "P-1001"}),
    ("level FOO", "FOO", {"PatientID": "P-1001"}),
    ("bad date range", "STUDY", {"StudyDate": "2026-13-99x"}),
    ("bad time", "STUDY", {"StudyTime": "2561"}),
    ("wildcard in UID", "STUDY", {"StudyInstanceUID": "1.2.*"}),
]


@pytest.mark.parametrize(
    ("level", "keys"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_request_is_refused_and_logged(
    archive: Archive, level: str | None, keys: dict[str, str]
) -> None:
    offset = len(archive.appliance.log())
    query = identifier(level, **keys)

    with client.associate(archive.port, [(STUDY_FIND, [])]) as assoc:
        responses = list(assoc.send_c_find(query, STUDY_FIND))

    assert len(responses) == 1
    status, found = responses[0]
    assert int(status.Status) in FAILURES
    assert status.ErrorComment
    assert found is None
    problems = wait_for_problems(archive.appliance, offset)
    assert len(problems) == 1
    assert f"C-FIND from {client.CLIENT_AE}@127.0.0.1 refused" in problems[0]
    assert_still_serving(archive)


LEVEL_ELEMENT = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
# Implicit VR Little Endian identifiers that are not valid encodings.
# Rows (US) with three bytes of value: not a whole number of values.
ODD_LENGTH_IDENTIFIER = LEVEL_ELEMENT + b"\x28\x00\x10\x00\x03\x00\x00\x00\x01\x02\x03"
# PatientName claims 256 bytes of value but only 8 follow.
TRUNCATED_IDENTIFIER = LEVEL_ELEMENT + b"\x10\x00\x10\x00\x00\x01\x00\x00Doe^John"


def send_raw_find(assoc: Association, raw: bytes) -> list[tuple[Dataset, Any]]:
    """Send a C-FIND whose identifier is ``raw`` as it is; return responses.

    This is what ``Association.send_c_find`` does after it has encoded the
    identifier, so the bytes reach the appliance unchecked.
    """
    context = assoc._get_valid_context(STUDY_FIND, "", "scu")
    request = C_FIND()
    request.MessageID = 3
    request.AffectedSOPClassUID = STUDY_FIND
    request.Priority = 2
    request.Identifier = BytesIO(raw)

    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, context.context_id)
    syntax = context.transfer_syntax[0]
    return list(assoc._wrap_find_responses(syntax, STUDY_FIND))


def garbage_find(archive: Archive, raw: bytes) -> list[int]:
    """The statuses the appliance answers a raw identifier with."""
    contexts = [(STUDY_FIND, [ImplicitVRLittleEndian])]
    with client.associate(archive.port, contexts) as assoc:
        responses = send_raw_find(assoc, raw)
    return [int(status.Status) for status, _found in responses if status]


def test_undecodable_identifier_is_refused_and_logged(archive: Archive) -> None:
    offset = len(archive.appliance.log())

    statuses = garbage_find(archive, ODD_LENGTH_IDENTIFIER)

    assert statuses == [0xC000]
    problems = wait_for_problems(archive.appliance, offset)
    assert len(problems) == 1
    assert "cannot decode" in problems[0]
    assert f"from {client.CLIENT_AE}@127.0.0.1" in problems[0]
    assert_still_serving(archive)


def test_truncated_identifier_is_refused(archive: Archive) -> None:
    offset = len(archive.appliance.log())

    statuses = garbage_find(archive, TRUNCATED_IDENTIFIER)

    assert statuses == [0xC000]
    assert len(wait_for_problems(archive.appliance, offset)) == 1


# -- C-CANCEL --------------------------------------------------------------------

BULK = 400


def bulk_files(directory: Path) -> list[Path]:
    """One single-instance study each for :data:`BULK` made-up studies."""
    return [
        write(
            instance(
                uid("bulk-study", n),
                uid("bulk-series", n),
                1,
                patient_id="BULK-1",
                patient_name="Bulk^Patient",
                accession=f"B{n:05d}",
                pixel_bytes=16,
            ),
            directory,
        )
        for n in range(BULK)
    ]


def cancel_after_first(port: int, query: Dataset) -> tuple[int, int]:
    """Send a C-FIND, C-CANCEL it at the first pending response; return the
    number of pending responses and the final status."""
    pending, final = 0, -1
    with client.associate(port, [(STUDY_FIND, [])]) as assoc:
        context_id = assoc.accepted_contexts[0].context_id
        for status, _found in assoc.send_c_find(query, STUDY_FIND, msg_id=5):
            code = int(status.Status)
            if code != PENDING:
                final = code
                continue
            pending += 1
            if pending == 1:
                assoc.send_c_cancel(5, context_id)
    return pending, final


def import_bulk(appliance: Appliance, directory: Path) -> None:
    """Put :data:`BULK` studies straight into a stopped appliance's data
    directory, in parallel so that catalog commits are shared."""
    catalog = Catalog(appliance.data_dir / "catalog", map_size=2**28)
    online = OnlineTier(appliance.data_dir / "online")
    online.open()
    ingest = Ingest(catalog, online, "refuse")
    try:
        with ThreadPoolExecutor(16) as pool:
            paths = bulk_files(directory)
            results = list(pool.map(lambda p: ingest.import_file(p, "bulk"), paths))
    finally:
        ingest.close()
        catalog.close()
    assert [result.ok for result in results] == [True] * BULK


def test_c_cancel_stops_the_search(appliance_factory: Any, tmp_path: Path) -> None:
    appliance = appliance_factory()
    import_bulk(appliance, tmp_path / "bulk")
    appliance.start()
    query = identifier("STUDY", PatientID="BULK-1", StudyInstanceUID="")
    everything, status = run_find(appliance.port, query)
    assert (len(everything), status) == (BULK, SUCCESS)

    # On a loaded machine every answer may be sent before the C-CANCEL is
    # even written (the search then ends in success, rightly): a few tries,
    # of which one must be cancelled. A C-CANCEL never read cancels none.
    tries = [cancel_after_first(appliance.port, query) for _ in range(3)]
    cancelled = [pending for pending, final in tries if final == CANCELLED]

    assert cancelled, tries
    # How many answers are on their way when the C-CANCEL arrives is up to
    # the scheduler of a loaded machine; a C-CANCEL left unread until the
    # last answer (as when pynetdicom's network thread only sent) gives all.
    assert all(1 <= pending < BULK for pending in cancelled)
    assert all(final in (CANCELLED, SUCCESS) for _pending, final in tries)
    assert len(run_find(appliance.port, query)[0]) == BULK

    # The search itself stops at its next answer once cancelled.
    cancelled = False
    catalog = Catalog(appliance.data_dir / "catalog")
    try:
        answers = answer_find(
            catalog,
            query,
            STUDY_FIND,
            appliance.ae_title,
            lambda: cancelled,
            ExplicitVRLittleEndian,
        )
        assert next(answers)[0] == PENDING
        cancelled = True
        assert [status for status, _encoded, _comment in answers] == [CANCELLED]
    finally:
        catalog.close()


# -- DCMTK findscu ---------------------------------------------------------------


def findscu(archive: Archive, *args: str) -> list[dict[str, str]]:
    """Run findscu against the archive; one {tag: value} dict per response."""
    require_dcmtk()
    result = dcmtk(
        "findscu",
        "-v",
        "-aet",
        "FINDSCU",
        "-aec",
        archive.appliance.ae_title,
        *args,
        "127.0.0.1",
        str(archive.port),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return parse_findscu(result.stdout + result.stderr)


RESPONSE_START = re.compile(r"Find Response: \d+ \(Pending\)")
ELEMENT = re.compile(r"\(([0-9a-f]{4},[0-9a-f]{4})\) \w\w (?:\[(.*?)\]|\(no value)")


def parse_findscu(output: str) -> list[dict[str, str]]:
    """The response identifiers findscu printed, as {'gggg,eeee': value}."""
    responses: list[dict[str, str]] = []
    for line in output.splitlines():
        if RESPONSE_START.search(line):
            responses.append({})
            continue
        found = ELEMENT.search(line)
        if found and responses:
            responses[-1][found.group(1)] = (found.group(2) or "").rstrip()
    return responses


def test_findscu_study_root_by_patient_id(archive: Archive) -> None:
    responses = findscu(
        archive,
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=P-1001",
        "-k",
        "AccessionNumber",
        "-k",
        "StudyDate",
    )

    found = sorted((r["0008,0050"], r["0008,0020"]) for r in responses)
    assert found == [("ACC-1001", "20260110"), ("ACC-1002", "20260111")]


def test_findscu_study_root_date_range(archive: Archive) -> None:
    responses = findscu(
        archive,
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyDate=20260112-20260301",
        "-k",
        "ModalitiesInStudy",
        "-k",
        "NumberOfStudyRelatedInstances",
        "-k",
        "AccessionNumber",
    )

    found = sorted((r["0008,0050"], r["0008,0061"], r["0020,1208"]) for r in responses)
    assert found == [
        ("ACC-2002", "US", "2"),
        ("ACC-3003", "CT", "1"),
        ("ACC-4005", "US", "1"),
    ]


def test_findscu_patient_root(archive: Archive) -> None:
    responses = findscu(
        archive,
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        "PatientName=DOE*",
        "-k",
        "PatientID",
        "-k",
        "NumberOfPatientRelatedStudies",
    )

    found = [(r["0010,0010"], r["0010,0020"], r["0020,1200"]) for r in responses]
    assert found == [("Doe^John", "P-4004", "2")]


def test_findscu_image_level(archive: Archive) -> None:
    series_uid = archive.series[("A", 0)]
    responses = findscu(
        archive,
        "-S",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={archive.studies['A']}",
        "-k",
        f"SeriesInstanceUID={series_uid}",
        "-k",
        "SOPInstanceUID",
    )

    found = sorted(r["0008,0018"] for r in responses)
    assert found == sorted(archive.instances[series_uid])


# -- index use, in-process -------------------------------------------------------


@pytest.fixture
def filled_catalog(tmp_path: Path) -> Iterator[Catalog]:
    """A catalog in ``tmp_path`` holding :data:`STUDIES`, imported in-process."""
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    ingest = Ingest(catalog, online, "refuse")
    archive = Archive(appliance=None)  # type: ignore[arg-type]
    try:
        for path in write_archive(tmp_path / "files", archive):
            assert ingest.import_file(path, "test").ok
        yield catalog
    finally:
        ingest.close()
        catalog.close()


INDEXED_QUERIES = [
    ("PatientID", {"PatientID": "P-1001"}, ["A", "B"]),
    ("AccessionNumber", {"AccessionNumber": "ACC-2002"}, ["C"]),
    ("StudyDate range", {"StudyDate": "20260111-20260201"}, ["B", "C", "D"]),
    ("PatientName prefix", {"PatientName": "doe*"}, ["E", "F"]),
    ("PatientName exact", {"PatientName": "gößmann^björn"}, ["C"]),
]


def study_query_records(
    catalog: Catalog, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str]]:
    """Run a STUDY query in-process; the study UIDs it found, and the
    databases it scanned whole with ``Catalog.all_records``."""
    scanned: list[str] = []
    original = Catalog.all_records

    def counting(self: Catalog, txn: Any, db: str) -> Any:
        scanned.append(db)
        return original(self, txn, db)

    monkeypatch.setattr(Catalog, "all_records", counting)
    query = catalog_query.Query(level="STUDY", keys={"StudyInstanceUID": None, **keys})
    rows = list(catalog_query.find(catalog, query, lambda: False))
    return [str(row["StudyInstanceUID"]) for row in rows], scanned


@pytest.mark.parametrize(
    ("keys", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in INDEXED_QUERIES],
)
def test_indexed_study_queries_scan_no_table(
    filled_catalog: Catalog,
    monkeypatch: pytest.MonkeyPatch,
    keys: dict[str, str],
    expected: list[str],
) -> None:
    found, scanned = study_query_records(filled_catalog, keys, monkeypatch)

    labels = {uid_: label for label, uid_ in study_uids().items()}
    assert sorted(labels[u] for u in found) == expected
    assert scanned == []


def test_study_description_query_scans_studies(
    filled_catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    found, scanned = study_query_records(
        filled_catalog, {"StudyDescription": "Chest*"}, monkeypatch
    )

    assert found == [study_uids()["A"]]
    assert scanned == ["studies"]


def study_uids() -> dict[str, str]:
    """The Study Instance UID of each study of :data:`STUDIES`."""
    return {
        label: spec.study_uid or uid("find-study", label)
        for label, spec in STUDIES.items()
    }
