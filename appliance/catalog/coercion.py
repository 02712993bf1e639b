"""What to send of a stored instance whose patient registration corrected.

Stored bytes are never rewritten, on any tier: an instance is coerced when
it is sent (C-GET, C-MOVE, WADO), so that what leaves the archive carries
the patient attributes the catalog holds now (PS3.4 C.4.2.1.4.1 lets a
Storage SCP coerce attributes; IHE PIR asks for it after an update or a
merge). Only the attributes registration owns are coerced
(:data:`appliance.catalog.patients.MANAGED`); an instance of a patient
never corrected is sent as stored, without being read here.
"""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path
from typing import Any

import lmdb
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from appliance.catalog.patients import MANAGED, is_corrected
from appliance.catalog.records import text_of
from appliance.catalog.store import Catalog

logger = logging.getLogger(__name__)

_UTF8 = "ISO_IR 192"


class CorrectedPatients:
    """The catalog records of corrected patients, read once per patient for
    one retrieval: None for a patient whose instances go as stored."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._read: dict[str, dict[str, Any] | None] = {}

    def record(self, txn: lmdb.Transaction, patient_key: str) -> dict[str, Any] | None:
        if patient_key not in self._read:
            patient = self.catalog.get(txn, "patients", patient_key)
            self._read[patient_key] = patient if is_corrected(patient) else None
        return self._read[patient_key]


def coerce(stored: Path | bytes, patient: dict[str, Any] | None) -> Dataset | None:
    """The stored instance (a Part 10 file or its bytes) with the patient
    attributes of ``patient`` (its catalog record), or None when it is to
    be sent exactly as stored: the patient was never corrected, or the
    instance carries the corrected values already."""
    if not is_corrected(patient):
        return None
    assert patient is not None
    source = BytesIO(stored) if isinstance(stored, bytes) else stored
    dataset = pydicom.dcmread(source)
    return dataset if apply(dataset, patient) else None


def apply(dataset: Dataset, patient: dict[str, Any]) -> bool:
    """Set the patient attributes of ``dataset`` to those of the catalog's
    record ``patient`` (of a corrected patient); whether any changed."""
    wanted = {keyword: patient["attrs"].get(keyword) for keyword in MANAGED}
    differing = {
        keyword: value
        for keyword, value in wanted.items()
        if text_of(dataset, keyword) != value
    }
    if not differing:
        return False
    _make_room(dataset, differing)
    for keyword, value in differing.items():
        _set(dataset, keyword, value)
    return True


def coerced_bytes(stored: bytes, patient: dict[str, Any] | None) -> bytes:
    """The Part 10 bytes to send for ``stored``: coerced as :func:`coerce`
    says, or ``stored`` itself (the fast path)."""
    dataset = coerce(stored, patient)
    if dataset is None:
        return stored
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _set(dataset: Dataset, keyword: str, value: str | None) -> None:
    if value is None:
        if keyword in dataset:
            del dataset[keyword]
        return
    if "\\" in value:
        setattr(dataset, keyword, value.split("\\"))
    else:
        setattr(dataset, keyword, value)


def _make_room(dataset: Dataset, values: dict[str, str | None]) -> None:
    """Switch the instance to UTF-8 when its character set cannot hold the
    new values: every text element is decoded first, so that the others
    keep their characters."""
    current = dataset.get("SpecificCharacterSet", "")
    charsets = [current] if isinstance(current, str) else list(current)
    codecs = [_codec(str(charset).strip()) for charset in charsets]
    texts = [v for k, v in values.items() if v and dictionary_VR(k) != "CS"]
    if all(_fits(text, codecs) for text in texts):
        return
    dataset.decode()
    dataset.SpecificCharacterSet = _UTF8


def _codec(charset: str) -> str | None:
    # The default repertoire is ASCII (PS3.5 6.1.2.1), not ISO 8859-1.
    if charset in ("", "ISO_IR 6", "ISO 2022 IR 6"):
        return "ascii"
    return pydicom.charset.python_encoding.get(charset)


def _fits(text: str, codecs: list[str | None]) -> bool:
    for codec in codecs:
        if codec is None:
            return False
        try:
            text.encode(codec)
            return True
        except UnicodeEncodeError:
            continue
    return False
