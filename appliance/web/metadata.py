"""WADO-RS metadata (PS3.18 10.4.1.1.2): each instance's attributes in the
DICOM JSON model, read from its online file without the pixel data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydicom

from appliance.catalog.coercion import apply

logger = logging.getLogger(__name__)


def metadata_of(
    instances: list[tuple[Path, dict[str, Any] | None]],
) -> list[dict[str, Any]]:
    """One JSON object per file, in order, with the patient attributes of
    its catalog record when registration corrected them (``instances``:
    the file and that record, or None). Pixel data is left out (bulk data
    is not offered); other binary values are sent inline."""
    return [_one(path, patient) for path, patient in instances]


def _one(path: Path, patient: dict[str, Any] | None) -> dict[str, Any]:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    if patient is not None:
        apply(dataset, patient)
    return dataset.to_json_dict(suppress_invalid_tags=True)
