"""Deterministic made-up DICOM instances for the benchmarks.

Two kinds, both explicit VR little endian Part 10 files:

``ct``
    CT Image Storage, 512 x 512 pixels of 16 bits (12 stored): about 0.5 MB.
    Series of 100 instances, two series per study.
``small``
    Secondary Capture Image Storage, 68 x 68 pixels of 16 bits: about 10 KB.
    Series of 10 instances, five series per study.

Names, IDs, dates, UIDs and pixels all come from a fixed seed, so a set is
the same bytes on every machine. Sets are written under ``bench/out/``
(git-ignored) and reused when a complete one is already there; a set is
complete once its ``manifest.txt`` exists.

Run ``python bench/dataset.py ct 200`` to make (or find) a set by hand.
"""

from __future__ import annotations

import argparse
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

OUT_DIR = Path(__file__).resolve().parent / "out"
SEED = 20240601

_SYLLABLES = (
    "KAL", "DOR", "MEN", "VIS", "TAR", "BEL", "ROS", "NAN", "QUI", "LOR",
    "SEV", "MAR", "TIN", "GAL", "FEN", "HOL", "PRA", "ZEN", "ULM", "WEX",
)  # fmt: skip
_GIVEN = (
    "ARLO", "BRISA", "CAVEN", "DELMA", "EVRIN", "FOSKA", "GRETO", "HALVA",
    "ISOLD", "JORVE", "KESTA", "LUMEN", "MIRTA", "NOVAK", "ORSIN", "PELLA",
)  # fmt: skip
# Keeps the high nibble of each high byte at 0: pixel values fit 12 bits.
_TWELVE_BITS = bytes(value & 0x0F for value in range(256))


@dataclass(frozen=True)
class Kind:
    """What the instances of one kind look like and how they are grouped."""

    name: str
    sop_class: str
    modality: str
    size: int  # rows and columns
    per_series: int
    series_per_study: int


KINDS = {
    "ct": Kind("ct", CTImageStorage, "CT", 512, 100, 2),
    "small": Kind("small", SecondaryCaptureImageStorage, "OT", 68, 10, 5),
}


def made_up_surname(rng: random.Random, syllables: int | None = None) -> str:
    """A surname of made-up syllables (two or three if not told): ``KALDORVIS``."""
    count = syllables or rng.choice((2, 3))
    return "".join(rng.choice(_SYLLABLES) for _ in range(count))


def made_up_given_name(rng: random.Random) -> str:
    """A made-up given name such as ``MIRTA``."""
    return rng.choice(_GIVEN)


def made_up_name(rng: random.Random) -> str:
    """A DICOM person name, family name first: ``KALDOR^MIRTA``."""
    return f"{made_up_surname(rng)}^{made_up_given_name(rng)}"


def uid(*parts: object) -> str:
    """A UID (2.25 form, PS3.5 B.2) that the same ``parts`` always give.

    A name-based UUID: pydicom's ``generate_uid`` ignores its entropy
    sources when given no prefix and returns a random UUID, which made the
    sets differ from one run (and one cache) to the next.
    """
    name = "/".join(str(part) for part in parts)
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def folder_for(kind: str, count: int, seed: int = SEED) -> Path:
    """Where the set of ``count`` instances of ``kind`` lives."""
    return OUT_DIR / f"{kind}-{count}-{seed}"


def generate(kind: str, count: int, seed: int = SEED) -> list[Path]:
    """The files of a set, written first if no complete copy exists."""
    folder = folder_for(kind, count, seed)
    manifest = folder / "manifest.txt"
    if manifest.exists():
        return [folder / name for name in manifest.read_text().split()]

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = _write_set(KINDS[kind], count, seed, folder)
    manifest.write_text("\n".join(names) + "\n")
    return [folder / name for name in names]


def _write_set(kind: Kind, count: int, seed: int, folder: Path) -> list[str]:
    """Write ``count`` instances into ``folder``; their relative paths."""
    rng = random.Random(f"{kind.name}-{seed}")
    per_study = kind.per_series * kind.series_per_study
    names: list[str] = []
    study: Dataset | None = None
    for number in range(count):
        if number % per_study == 0:
            study = _new_study(rng, kind, seed, number // per_study)
        assert study is not None
        instance = _instance(rng, kind, seed, study, number % per_study)
        name = f"{number // per_study:05d}/{number:06d}.dcm"
        (folder / name).parent.mkdir(exist_ok=True)
        instance.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    return names


def _new_study(rng: random.Random, kind: Kind, seed: int, index: int) -> Dataset:
    """Patient and study attributes shared by the instances of one study."""
    study = Dataset()
    study.PatientName = made_up_name(rng)
    study.PatientID = f"BP{rng.randrange(10**7):07d}"
    study.PatientBirthDate = f"{rng.randrange(1930, 2015)}0{rng.randrange(1, 10)}15"
    study.PatientSex = rng.choice("MF")
    study.StudyInstanceUID = uid(kind.name, seed, "study", index)
    study.StudyDate = f"20{rng.randrange(10, 25):02d}{rng.randrange(1, 13):02d}15"
    study.StudyTime = f"{rng.randrange(7, 19):02d}3000"
    study.AccessionNumber = f"ACC{rng.randrange(10**8):08d}"
    study.StudyID = str(index + 1)
    study.StudyDescription = f"BENCH {kind.modality} STUDY"
    study.ReferringPhysicianName = made_up_name(rng)
    return study


def _instance(
    rng: random.Random, kind: Kind, seed: int, study: Dataset, position: int
) -> Dataset:
    """One instance of ``study``: its place in the study is ``position``."""
    series_index = position // kind.per_series
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = kind.sop_class
    ds.SOPInstanceUID = uid(study.StudyInstanceUID, "instance", position)
    ds.SeriesInstanceUID = uid(study.StudyInstanceUID, "series", series_index)
    ds.Modality = kind.modality
    ds.SeriesNumber = series_index + 1
    ds.SeriesDescription = f"SERIES {series_index + 1}"
    ds.InstanceNumber = position % kind.per_series + 1
    ds.Manufacturer = "BENCH"
    _add_image(ds, rng, kind, position % kind.per_series)
    ds.file_meta = _file_meta(ds)
    return ds


def _add_image(ds: Dataset, rng: random.Random, kind: Kind, slice_: int) -> None:
    """Image attributes and 16-bit noise pixels (12 bits stored)."""
    if kind.name == "ct":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-slice_ * 1.0:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["0.977", "0.977"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = kind.size
    ds.Columns = kind.size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = bytearray(rng.randbytes(kind.size * kind.size * 2))
    pixels[1::2] = bytes(pixels[1::2]).translate(_TWELVE_BITS)
    ds.PixelData = bytes(pixels)
    ds["PixelData"].VR = "OW"


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def total_bytes(paths: list[Path]) -> int:
    """The size of all ``paths`` together."""
    return sum(path.stat().st_size for path in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    paths = generate(args.kind, args.count, args.seed)
    size = total_bytes(paths) / 1e6
    print(f"{len(paths)} files, {size:.1f} MB in {folder_for(args.kind, args.count)}")


if __name__ == "__main__":
    main()
