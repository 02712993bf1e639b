"""WADO-RS metadata (PS3.18 10.4.1.1.2): each instance's attributes in the
DICOM JSON model, read from its online file without the pixel data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydicom

logger = logging.getLogger(__name__)


def metadata_of(paths: list[Path]) -> list[dict[str, Any]]:
    """One JSON object per file, in order. Pixel data is left out (bulk
    data is not offered); other binary values are sent inline."""
    return [_one(path) for path in paths]


def _one(path: Path) -> dict[str, Any]:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return dataset.to_json_dict(suppress_invalid_tags=True)
