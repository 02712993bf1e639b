"""Generated test instances with made-up patients; never real patient data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ROOT = "1.2.826.0.1.3680043.10.1009."  # a test root; generate_uid adds a hash


@contextmanager
def unvalidated() -> Iterator[None]:
    """Let tests build deliberately non-conformant values without warnings."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def uid(*parts: object) -> str:
    """A deterministic, conformant UID for the given parts."""
    return generate_uid(prefix=ROOT, entropy_srcs=[str(p) for p in parts])


def instance(
    study: str,
    series: str,
    number: int,
    *,
    patient_id: str = "TEST-0001",
    patient_name: str = "Doe^Jane",
    modality: str = "CT",
    study_date: str = "20260115",
    study_time: str = "101500",
    accession: str = "ACC0001",
    pixel_bytes: int = 8192,
    charset: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """One instance of a made-up study, with a small, distinct pixel payload."""
    with unvalidated():
        return _instance(
            study,
            series,
            number,
            patient_id,
            patient_name,
            modality,
            study_date,
            study_time,
            accession,
            pixel_bytes,
            charset,
            sop_instance_uid,
        )


def _instance(
    study: str,
    series: str,
    number: int,
    patient_id: str,
    patient_name: str,
    modality: str,
    study_date: str,
    study_time: str,
    accession: str,
    pixel_bytes: int,
    charset: str | None,
    sop_instance_uid: str | None,
) -> Dataset:
    dataset = Dataset()
    if charset:
        dataset.SpecificCharacterSet = charset
    dataset.SOPClassUID = CT_IMAGE_STORAGE
    dataset.SOPInstanceUID = sop_instance_uid or uid(study, series, number)
    dataset.StudyInstanceUID = study
    dataset.SeriesInstanceUID = series
    dataset.PatientName = patient_name
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = "19700101"
    dataset.PatientSex = "O"
    dataset.StudyDate = study_date
    dataset.StudyTime = study_time
    dataset.AccessionNumber = accession
    dataset.StudyID = "1"
    dataset.Modality = modality
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = number
    # Rows x Columns x 2 bytes; Columns stays within US range.
    columns = min(pixel_bytes // 2, 1000)
    dataset.Rows = max(1, pixel_bytes // (2 * columns))
    dataset.Columns = columns
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    seed = hashlib.sha256(dataset.SOPInstanceUID.encode()).digest()
    size = dataset.Rows * dataset.Columns * 2
    dataset.PixelData = (seed * (size // len(seed) + 1))[:size]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    return dataset


def write(dataset: Dataset, directory: Path) -> Path:
    """Save as a Part 10 file named by a counter-free hash (not by a UID)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(dataset.SOPInstanceUID.encode()).hexdigest()[:16]
    path = directory / f"{name}.dcm"
    with unvalidated():
        dataset.save_as(path, enforce_file_format=True)
    return path


def study_files(
    directory: Path, label: str, count: int, **attributes: object
) -> list[Path]:
    """``count`` instances of one study in one series, written to ``directory``."""
    study = uid("study", label)
    series = uid("series", label)
    return [
        write(instance(study, series, n + 1, **attributes), directory)  # type: ignore
        for n in range(count)
    ]
