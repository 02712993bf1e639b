"""Which studies a restore brings back first, and where each one goes.

Patients expected soon come first: the studies of every patient with an
upcoming appointment, earliest appointment first, newest study first
within it. Then every other study, newest first (by study date, or the
day it was received when it has none, then by when it was received). A
study older than ``online_days`` (by the same day) is left on the mirror
until asked for, or packed onto the nearline tier, as the configuration
says; ``online_days`` 0 brings every study back online. A study of a
patient expected soon comes back online however old it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.catalog.records import patient_key
from appliance.catalog.store import Catalog
from appliance.prefetch.appointments import APPOINTMENTS, Appointment

# An appointment begun this long ago still makes its patient's studies
# urgent: the patient may be in the department now.
_STILL_UPCOMING = 6 * 3600.0

ONLINE_TARGET = "online"
NEARLINE_TARGET = "nearline"
MIRROR_TARGET = "mirror"


@dataclass(frozen=True)
class StudyFacts:
    """What the order needs to know about a study still to restore."""

    study_uid: str
    patient: str
    study_date: str  # YYYYMMDD, or "" when the study has none
    received: float


@dataclass
class Order:
    """Studies to restore, first first; each with where it goes."""

    studies: list[str] = field(default_factory=list)
    to_nearline: set[str] = field(default_factory=set)
    left_on_mirror: list[str] = field(default_factory=list)
    expected: int = 0  # studies of patients with an upcoming appointment


def upcoming_patients(catalog: Catalog, now: float | None = None) -> dict[str, float]:
    """Patient key -> start of the earliest active appointment not past."""
    now = time.time() if now is None else now
    found: dict[str, float] = {}
    with catalog.read() as txn:
        for _key, data in catalog.all_records(txn, APPOINTMENTS):
            appointment = Appointment.from_json(data)
            start = appointment.start
            if not appointment.active or start is None:
                continue
            if start < now - _STILL_UPCOMING:
                continue
            for patient in appointment.patients:
                key = patient_key(patient.patient_id, patient.issuer)
                found[key] = min(found.get(key, start), start)
    return found


def order(
    facts: list[StudyFacts],
    expected: dict[str, float],
    online_days: int,
    older_studies: str,
    now: float | None = None,
) -> Order:
    """The order of ``facts`` (see the module), and where each goes."""
    now = time.time() if now is None else now
    cutoff = _cutoff(online_days, now)
    result = Order()

    def newest_first(study: StudyFacts) -> tuple[str, float]:
        return (_day_of(study), study.received)

    soon = [s for s in facts if s.patient in expected]
    soon.sort(key=newest_first, reverse=True)
    soon.sort(key=lambda s: expected[s.patient])
    later = [s for s in facts if s.patient not in expected]
    later.sort(key=newest_first, reverse=True)
    result.expected = len(soon)

    for study in soon + later:
        old = cutoff is not None and _day_of(study) < cutoff
        # A study someone is expected for comes back online, however old.
        if old and study.patient not in expected:
            if older_studies == MIRROR_TARGET:
                result.left_on_mirror.append(study.study_uid)
                continue
            result.to_nearline.add(study.study_uid)
        result.studies.append(study.study_uid)
    return result


def facts_of(uid: str, study: dict[str, Any]) -> StudyFacts:
    """The facts of a study from its catalog record."""
    attrs = study.get("attrs", {})
    date = str(attrs.get("StudyDate", "") or "")
    patient = str(study.get("patient", ""))
    return StudyFacts(uid, patient, date, float(study.get("received", 0.0)))


def _cutoff(online_days: int, now: float) -> str | None:
    """The oldest study date that still comes back online, as YYYYMMDD."""
    if online_days <= 0:
        return None
    day = datetime.fromtimestamp(now, UTC) - timedelta(days=online_days)
    return day.strftime("%Y%m%d")


def _day_of(study: StudyFacts) -> str:
    if len(study.study_date) >= 8 and study.study_date[:8].isdigit():
        return study.study_date[:8]
    return datetime.fromtimestamp(study.received, UTC).strftime("%Y%m%d")
