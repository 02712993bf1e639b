"""C-STORE requests the Storage SCP must refuse with a status, sent by
pynetdicom as a faulty sender puts them on the wire.

Each gets the status PS3.7 9.1.1.1.9 names for it, with an Error Comment
and one WARNING log line; nothing of it is stored, the next good instance
on the same association is, and the service stays up:

* 0x0122 (SOP class not supported): the request names a storage SOP class
  on a presentation context negotiated for another abstract syntax;
* 0xA900 (data set does not match SOP class): the data set's SOP Class or
  SOP Instance UID differs from the request's, or its Study or Series
  Instance UID is longer than 64 characters or holds '/', '\\', '*' or '?';
* 0x0117 (invalid SOP instance): the SOP Instance UID is longer than 64
  characters (which pynetdicom cannot even decode into its request), or
  holds '/', '\\', '*' or '?', which no C-FIND or DICOMweb URL could
  carry back as one UID.

``appliance import`` refuses a file with such a character too, and says so
in its summary. UIDs that are otherwise non-conformant (letters, leading
zeros) are stored with a warning (test_store).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from tests import datasets
from tests import dicom_client as client
from tests.conftest import Appliance, dcmtk, incoming_files, require_dcmtk, started

CT = datasets.CT_IMAGE_STORAGE
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
SOP_CLASS_NOT_SUPPORTED = 0x0122
INVALID_SOP_INSTANCE = 0x0117
DOES_NOT_MATCH = 0xA900
CONTEXTS = [(uid, [ExplicitVRLittleEndian]) for uid in (CT, MR, VERIFICATION)]
# Over 64 characters, and otherwise a valid UID.
LONG_UID = datasets.ROOT + "4" * 45


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("store-refusals")
    with started(root / "appliance") as node:
        yield node


def instance(label: str, **attributes: str) -> Dataset:
    """A CT instance of a study of its own, under patient ID ``label``;
    ``attributes`` replace any of its values, valid or not."""
    dataset = datasets.instance(
        datasets.uid("study", label),
        datasets.uid("series", label),
        1,
        patient_id=label,
    )
    with datasets.unvalidated():
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)
            if keyword == "SOPInstanceUID":
                dataset.file_meta.MediaStorageSOPInstanceUID = value
    return dataset


def send_as_is(
    assoc: Association,
    context_syntax: str,
    dataset: Dataset,
    sop_class: str | None = None,
    sop_instance: str | None = None,
) -> Dataset:
    """One C-STORE on the context accepted for ``context_syntax``, its
    command's UIDs as given (by default the data set's) where pynetdicom
    would check them; returns the response's Status and Error Comment."""
    context = next(
        cx for cx in assoc.accepted_contexts if cx.abstract_syntax == context_syntax
    )
    request = C_STORE()
    request.MessageID = 11
    request.Priority = 2
    # Set past pynetdicom's checks, as a faulty sender's bytes arrive.
    request._affected_sop_class_uid = UID(sop_class or dataset.SOPClassUID)
    request._affected_sop_instance_uid = UID(sop_instance or dataset.SOPInstanceUID)
    with datasets.unvalidated():
        request.DataSet = BytesIO(encode(dataset, False, True))

    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, context.context_id)
    _context_id, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    # As in test_dicom_bad_requests: the next send waits until the reactor
    # has seen this one's end, or it would take this response for its own.
    deadline = time.monotonic() + 1
    while assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    assert response is not None, "no C-STORE response"
    answer = Dataset()
    answer.Status = response.Status
    answer.ErrorComment = response.ErrorComment
    return answer


def found(appliance: Appliance, patient_id: str) -> list[str]:
    """The SOP Instance UIDs a C-FIND finds for ``patient_id``."""
    identifier = client.study_identifier("IMAGE", PatientID=patient_id)
    identifier.SOPInstanceUID = ""
    with datasets.unvalidated():
        matches, status = client.find(appliance.port, identifier)
        assert status == 0x0000
        return [str(match.SOPInstanceUID) for match in matches]


def object_files(appliance: Appliance) -> set[str]:
    objects = appliance.data_dir / "online" / "objects"
    return {str(path) for path in objects.rglob("*.dcm")}


def problems_since(
    appliance: Appliance, start: int, caller: str = client.CLIENT_AE
) -> list[str]:
    """Log lines other than INFO since ``start``, once the closing line of
    the association from ``caller`` is there."""
    deadline = time.monotonic() + 20
    while f"association from {caller}@" not in appliance.log()[start:]:
        assert time.monotonic() < deadline, appliance.log()[start:]
        time.sleep(0.05)
    log = appliance.log()[start:]
    assert "Traceback" not in log
    return [line for line in log.splitlines() if " INFO " not in line]


def refused_then_next_stored(
    appliance: Appliance,
    bad: Dataset,
    context_syntax: str,
    sop_class: str | None = None,
    sop_instance: str | None = None,
) -> tuple[Dataset, list[str]]:
    """Send ``bad`` as given, then a good instance on the same association;
    returns the first's answer and the log's problem lines. Checks that the
    good one is stored and findable, and ``bad`` is not."""
    files = object_files(appliance)
    good = instance(f"{bad.PatientID}-next")
    start = len(appliance.log())

    with client.associate(appliance.port, CONTEXTS) as assoc:
        assert assoc.is_established
        assoc.dimse_timeout = 20
        answer = send_as_is(assoc, context_syntax, bad, sop_class, sop_instance)
        assert assoc.is_established
        assert int(assoc.send_c_store(good).Status) == 0x0000

    problems = problems_since(appliance, start)
    assert found(appliance, str(bad.PatientID)) == []
    assert found(appliance, str(good.PatientID)) == [str(good.SOPInstanceUID)]
    assert len(object_files(appliance) - files) == 1
    assert incoming_files(appliance.data_dir / "online") == []
    assert client.echo(appliance.port) == 0x0000
    return answer, problems


@pytest.mark.parametrize("context", [VERIFICATION, MR], ids=["Verification", "MR"])
def test_a_sop_class_on_another_classes_context_is_refused(
    appliance: Appliance, context: str
) -> None:
    bad = instance(f"context-{context}")
    answer, problems = refused_then_next_stored(appliance, bad, context)

    assert answer.Status == SOP_CLASS_NOT_SUPPORTED
    assert "presentation context" in answer.ErrorComment
    assert len(problems) == 1, problems
    assert "C-STORE" in problems[0] and str(bad.SOPInstanceUID) in problems[0]
    assert "CT Image Storage" in problems[0]


def test_a_data_set_of_another_sop_class_than_the_request_is_refused(
    appliance: Appliance,
) -> None:
    """The request says MR, on an MR context; the data set is a CT image."""
    bad = instance("class-mismatch")
    answer, problems = refused_then_next_stored(appliance, bad, MR, sop_class=MR)

    assert answer.Status == DOES_NOT_MATCH
    assert "SOP Class UID" in answer.ErrorComment
    assert len(problems) == 1, problems
    assert "differs from the announced" in problems[0]


def test_a_data_set_of_another_sop_instance_than_the_request_is_refused(
    appliance: Appliance,
) -> None:
    bad = instance("instance-mismatch")
    announced = datasets.uid("announced", "instance-mismatch")
    answer, problems = refused_then_next_stored(
        appliance, bad, CT, sop_instance=announced
    )

    assert answer.Status == DOES_NOT_MATCH
    assert "SOP Instance UID" in answer.ErrorComment
    assert len(problems) == 1, problems
    assert announced in problems[0]


INVALID_UIDS = {
    "instance over 64": ("SOPInstanceUID", LONG_UID, INVALID_SOP_INSTANCE, "64"),
    "study over 64": ("StudyInstanceUID", LONG_UID, DOES_NOT_MATCH, "64"),
    "series over 64": ("SeriesInstanceUID", LONG_UID, DOES_NOT_MATCH, "64"),
}


@pytest.mark.parametrize("case", list(INVALID_UIDS), ids=list(INVALID_UIDS))
def test_an_invalid_uid_is_refused_with_a_status(
    appliance: Appliance, case: str
) -> None:
    keyword, value, status, why = INVALID_UIDS[case]
    bad = instance(f"invalid-{case.replace(' ', '-')}", **{keyword: value})
    answer, problems = refused_then_next_stored(appliance, bad, CT)

    assert answer.Status == status
    assert answer.ErrorComment.startswith(keyword)
    assert why in answer.ErrorComment
    assert len(problems) == 1, problems
    assert "refused instance" in problems[0] and value in problems[0]


UNSENDABLE_UIDS = {
    "instance asterisk": (
        "SOPInstanceUID",
        datasets.ROOT + "71.1*",
        INVALID_SOP_INSTANCE,
    ),
    "instance backslash": (
        "SOPInstanceUID",
        datasets.ROOT + "71.1\\2",
        INVALID_SOP_INSTANCE,
    ),
    "study slash": ("StudyInstanceUID", datasets.ROOT + "71/2", DOES_NOT_MATCH),
    "series question mark": (
        "SeriesInstanceUID",
        datasets.ROOT + "71.?",
        DOES_NOT_MATCH,
    ),
}


@pytest.mark.parametrize("case", list(UNSENDABLE_UIDS), ids=list(UNSENDABLE_UIDS))
def test_a_uid_no_query_could_name_is_refused_with_a_status(
    appliance: Appliance, case: str
) -> None:
    """As STOW-RS refuses it: a C-FIND would take the UID for a pattern or
    a list, a DICOMweb URL for two path segments."""
    keyword, value, status = UNSENDABLE_UIDS[case]
    bad = instance(f"unsendable-{case.replace(' ', '-')}", **{keyword: value})
    # The request names the instance as its data set does, several values
    # and all.
    sop_instance = value if keyword == "SOPInstanceUID" else None
    answer, problems = refused_then_next_stored(
        appliance, bad, CT, sop_instance=sop_instance
    )

    assert answer.Status == status
    assert answer.ErrorComment.startswith(f"{keyword} holds ")
    assert "\\" not in answer.ErrorComment
    assert len(problems) == 1, problems
    assert (
        "refused instance" in problems[0]
        and f"from {client.CLIENT_AE}@" in (problems[0])
    )
    assert f"{keyword} holds " in problems[0] and repr(value) in problems[0]


def test_import_refuses_a_uid_no_query_could_name_and_says_so(
    appliance: Appliance, tmp_path: Path
) -> None:
    bad = instance("import-unsendable", SOPInstanceUID=datasets.ROOT + "72.1*")
    good = instance("import-unsendable-next")
    with datasets.unvalidated():
        paths = [str(datasets.write(dataset, tmp_path)) for dataset in (bad, good)]
    files = object_files(appliance)

    result = appliance.cli("import", *paths, check=False)

    assert result.returncode == 1, result.stderr
    assert (
        "2 file(s) read: 1 stored, 0 already there, 0 duplicates resolved by "
        "policy, 1 refused"
    ) in result.stdout
    assert (
        f"refused {paths[0]}: SOPInstanceUID holds an asterisk, which no C-FIND "
        f"or DICOMweb URL can carry back as one UID: {str(bad.SOPInstanceUID)!r}"
    ) in result.stdout
    assert found(appliance, "import-unsendable") == []
    assert found(appliance, "import-unsendable-next") == [str(good.SOPInstanceUID)]
    assert len(object_files(appliance) - files) == 1
    assert incoming_files(appliance.data_dir / "online") == []


def test_storescu_gets_a_status_for_an_overlong_uid_and_sends_on(
    appliance: Appliance, tmp_path: Path
) -> None:
    """DCMTK's storescu cuts the UID to 64 characters in its command; the
    data set's UID is judged first, so the answer names what to correct."""
    require_dcmtk()
    bad = instance("storescu-long", SOPInstanceUID=LONG_UID)
    good = instance("storescu-next")
    paths = [str(datasets.write(dataset, tmp_path)) for dataset in (bad, good)]
    files = object_files(appliance)
    start = len(appliance.log())

    result = dcmtk(
        "storescu",
        "-d",
        "--no-halt",
        "-aec",
        appliance.ae_title,
        "127.0.0.1",
        str(appliance.port),
        *paths,
    )
    output = result.stdout + result.stderr
    statuses = re.findall(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", output)
    assert [int(status, 16) for status in statuses] == [INVALID_SOP_INSTANCE, 0]
    assert output.count("Association Accepted") == 1

    problems = problems_since(appliance, start, "STORESCU")
    assert len(problems) == 1, problems
    assert f"SOPInstanceUID is {len(LONG_UID)} characters long" in problems[0]
    assert found(appliance, "storescu-long") == []
    assert found(appliance, "storescu-next") == [str(good.SOPInstanceUID)]
    assert len(object_files(appliance) - files) == 1
    assert incoming_files(appliance.data_dir / "online") == []
    assert client.echo(appliance.port) == 0x0000


def test_a_refused_instance_with_a_non_conformant_uid_has_one_line(
    appliance: Appliance,
) -> None:
    """A UID with letters is stored with a warning, but an instance refused
    for another reason (here a duplicate) is not said to be stored: its
    one WARNING line is the refusal."""
    odd = datasets.ROOT + "dup.a1"
    first = instance("letters-first", SOPInstanceUID=odd)
    with client.associate(appliance.port, CONTEXTS) as assoc:
        assert int(assoc.send_c_store(first).Status) == 0x0000

    bad = instance("letters-second", SOPInstanceUID=odd)
    answer, problems = refused_then_next_stored(appliance, bad, CT)

    assert answer.Status == 0x0111
    assert len(problems) == 1, problems
    assert "refused instance" in problems[0] and odd in problems[0]
    assert "stored as it is" not in problems[0]


def test_an_instance_with_three_non_conformant_uids_has_one_line(
    appliance: Appliance,
) -> None:
    label = "letters-three"
    uids = {
        "SOPInstanceUID": datasets.ROOT + "three.1",
        "StudyInstanceUID": datasets.ROOT + "three.02",
        "SeriesInstanceUID": datasets.ROOT + "three.x",
    }
    odd = instance(label, **uids)
    start = len(appliance.log())
    with client.associate(appliance.port, CONTEXTS) as assoc:
        assert int(assoc.send_c_store(odd).Status) == 0x0000

    problems = problems_since(appliance, start)
    assert found(appliance, label) == [uids["SOPInstanceUID"]]
    assert len(problems) == 1, problems
    assert "stored as it is" in problems[0]
    assert all(f"{key} {value!r}" in problems[0] for key, value in uids.items())


def test_a_refused_uid_with_a_line_break_stays_on_one_log_line(
    appliance: Appliance,
) -> None:
    """The UID is the sender's: its line break, shown raw, would forge a
    line of the log."""
    value = datasets.ROOT + "73.1*\nforged"
    bad = instance("unsendable-line-break", SOPInstanceUID=value)
    answer, problems = refused_then_next_stored(appliance, bad, CT)

    assert answer.Status == INVALID_SOP_INSTANCE
    assert len(problems) == 1, problems
    assert "73.1*\\x0aforged from" in problems[0]
    assert repr(value) in problems[0]
