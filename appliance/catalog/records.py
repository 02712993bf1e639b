"""What the catalog keeps about patients, studies, series and instances.

Attributes are kept as decoded text (multiple values joined with a
backslash), so that queries compare characters, not bytes, whatever
character set the sender used. The keyword lists below are the C-FIND keys
the catalog can answer at each level (PS3.4 C.6.1.1 and C.6.2.1).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from appliance.catalog import rawtext

logger = logging.getLogger(__name__)

PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "InstitutionName",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Laterality",
    "ProtocolName",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "StationName",
    "Manufacturer",
)
INSTANCE_KEYWORDS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ImageType",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
)

# Keys the catalog computes rather than copies (PS3.4 C.3.4).
COMPUTED_KEYWORDS = {
    "PATIENT": (
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ),
    "STUDY": (
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": ("AvailableTransferSyntaxUID",),
}


def text_of(dataset: Dataset, keyword: str | int) -> str | None:
    """The element's value as decoded text, or None when absent or empty."""
    tag = _tag_of(keyword) if isinstance(keyword, str) else keyword
    if tag is None or tag not in dataset:
        return None
    raw = dataset.get_item(tag)
    if isinstance(raw, RawDataElement):
        found = rawtext.text(dataset, raw)
        if found is not rawtext.UNDECIDED:
            return cast(str | None, found)
    element = dataset[tag]
    value = element if not hasattr(element, "value") else element.value
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(item) for item in value)
    elif isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    else:
        text = str(value)
    text = text.rstrip(" \x00")
    return text or None


def collect(dataset: Dataset, keywords: tuple[str, ...]) -> dict[str, str]:
    """The non-empty values of ``keywords`` in ``dataset`` as text."""
    wanted = _tags_of(keywords)
    found: dict[str, str] = {}
    # Only the elements present are looked at: most wanted keys are absent,
    # and this runs for every stored instance.
    for tag in wanted.keys() & dataset.keys():
        keyword = wanted[tag]
        try:
            text = text_of(dataset, tag)
        except Exception as exc:  # a damaged element must not stop the store
            logger.warning("cannot decode %s: %s; recorded as empty", keyword, exc)
            continue
        if text is not None:
            found[keyword] = text
    return found


@functools.cache
def _tag_of(keyword: str) -> int | None:
    tag = tag_for_keyword(keyword)
    return None if tag is None else int(tag)


@functools.cache
def _tags_of(keywords: tuple[str, ...]) -> dict[int, str]:
    tags = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"{keyword} is not a DICOM keyword")
        tags[tag] = keyword
    return tags


def patient_key(patient_id: str, issuer: str) -> str:
    """The catalog key of a patient: PatientID and IssuerOfPatientID."""
    return f"{patient_id}\x00{issuer}"


@dataclass
class Copy:
    """One copy of an instance on a tier, at a tier-specific location."""

    tier: str
    location: str
    verified: bool = True

    def as_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "location": self.location, "verified": self.verified}


@dataclass
class InstanceRecord:
    """Everything the catalog knows about one stored instance."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    patient: str
    transfer_syntax: str
    size: int
    sha256: str
    content_sha256: str
    received: float
    attributes: dict[str, str]
    copies: list[Copy] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "series": self.series_uid,
            "study": self.study_uid,
            "patient": self.patient,
            "ts": self.transfer_syntax,
            "size": self.size,
            "sha256": self.sha256,
            "content_sha256": self.content_sha256,
            "received": self.received,
            "attrs": self.attributes,
            "copies": [copy.as_json() for copy in self.copies],
        }

    @classmethod
    def from_json(cls, uid: str, data: dict[str, Any]) -> InstanceRecord:
        return cls(
            sop_instance_uid=uid,
            series_uid=data["series"],
            study_uid=data["study"],
            patient=data["patient"],
            transfer_syntax=data["ts"],
            size=data["size"],
            sha256=data["sha256"],
            content_sha256=data["content_sha256"],
            received=data["received"],
            attributes=data["attrs"],
            copies=[Copy(**copy) for copy in data["copies"]],
        )

    def copy_on(self, tier: str) -> Copy | None:
        return next((c for c in self.copies if c.tier == tier and c.verified), None)


@dataclass
class NewInstance:
    """An instance ready to be recorded: its record and its level attributes."""

    record: InstanceRecord
    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, str]
    # The AE title that sent it, for policies by calling AE ("" for imports).
    calling_ae: str = ""
