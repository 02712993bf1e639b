"""Appointment list files: the same appointments as HL7 carries, as CSV.

For a RIS that cannot send HL7, or a list exported by hand. The first line
names the columns (in any order, case ignored); the others are one
appointment each:

| column | required | meaning |
| --- | --- | --- |
| patient_id | yes | PatientID, as in the images |
| issuer | no | IssuerOfPatientID; empty when the site has one |
| appointment_time | unless cancelled | 2027-01-15 09:30, ISO 8601, or HL7 digits |
| modality | no | CT, MR, ... |
| procedure_code | no | the site's procedure code |
| accession | no | accession number |
| appointment_id | no | the RIS's ID; else the accession, else patient and time |
| status | no | booked (the default) or cancelled |

Values are held to the length of the DICOM attribute they become, as from
HL7 (:mod:`appliance.hl7.bounds`). A file is taken whole or not at all:
every line is checked first, and one bad line refuses the file with the
line numbers and reasons of all of them.
Importing the same file again changes nothing: each appointment is keyed
by its ID.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from appliance.hl7 import bounds
from appliance.hl7.messages import (
    BOOK,
    CANCEL,
    MessageError,
    PatientIdentifier,
    ScheduleMessage,
    parse_time,
    printable,
)

logger = logging.getLogger(__name__)

COLUMNS = (
    "patient_id",
    "issuer",
    "appointment_time",
    "modality",
    "procedure_code",
    "accession",
    "appointment_id",
    "status",
)
REQUIRED = ("patient_id", "appointment_time")
# Each value becomes a DICOM attribute or is matched with one: held to its
# length as the same value from HL7 is (appliance.hl7.bounds), never cut.
LIMITS = {
    "patient_id": bounds.LONG_STRING,
    "issuer": bounds.LONG_STRING,
    "appointment_id": bounds.LONG_STRING,
    "procedure_code": bounds.LONG_STRING,
    "accession": bounds.SHORT_STRING,
    "modality": bounds.CODE_STRING,
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A day's list is kilobytes. A file this large is something else (a whole
# RIS export dropped in by mistake), and checking it whole, as a list file
# is, would take some fifty times its size in memory.
MAX_BYTES = 8 * 1024 * 1024
STATES = {"booked": BOOK, "cancelled": CANCEL}


@dataclass
class ListFile:
    """What a file holds: appointments, or the reasons it is refused."""

    appointments: list[ScheduleMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "line N: reason"


def load(path: Path, regular_only: bool = False) -> str:
    """The text of the list file at ``path``: OSError when it cannot be read,
    ValueError when it is not UTF-8 or larger than MAX_BYTES. With
    ``regular_only`` (the watched folder), a symbolic link or anything but
    a regular file put there since the folder was looked at is refused,
    rather than followed or waited on (a FIFO)."""
    flags = os.O_RDONLY
    if regular_only:
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK
    with os.fdopen(os.open(path, flags), "rb") as handle:
        if regular_only and not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(
            f"larger than {MAX_BYTES // 2**20} MB, more than a list of "
            "appointments: split it"
        )
    return data.decode("utf-8")


def read(text: str, source: str) -> ListFile:
    """Check every line of ``text``; ``source`` names the file in IDs."""
    found = ListFile()
    rows = _records(io.StringIO(text.lstrip("\ufeff")), found)
    header = [name.strip().lower() for name in next(rows, (0, []))[1]]
    missing = [name for name in REQUIRED if name not in header]
    unknown = [name for name in header if name not in COLUMNS]
    twice = sorted({name for name in header if header.count(name) > 1})
    if missing or unknown or twice:
        if not found.problems:
            found.problems.append(_header_problem(missing, unknown, twice))
        return found
    lines: dict[str, int] = {}  # appointment -> the line that gave it
    for number, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            found.problems.append(
                f"line {number}: {len(row)} fields, the header names {len(header)}"
            )
            continue
        values = {name: cell.strip() for name, cell in zip(header, row, strict=True)}
        if any(_CONTROL.search(value) for value in values.values()):
            found.problems.append(f"line {number}: a line break or control character")
            continue
        try:
            appointment = _appointment(values, source, number)
        except ValueError as exc:
            found.problems.append(f"line {number}: {exc}")
            continue
        # One line per appointment: a second would overwrite the first
        # unseen (an accession given to two patients, say).
        key = appointment.appointment_id
        if key in lines:
            found.problems.append(
                f"line {number}: the same appointment as line {lines[key]} "
                "(appointment_id, else accession, else patient and time)"
            )
            continue
        lines[key] = number
        found.appointments.append(appointment)
    return found


def _records(lines: io.StringIO, found: ListFile) -> Iterator[tuple[int, list[str]]]:
    """Each record with the line it starts on, as an editor counts lines (a
    quoted value may span several). A record the csv module cannot read
    (a value over its size limit, say) ends the file with a problem."""
    rows = csv.reader(lines)
    while True:
        number = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            found.problems.append(f"line {number}: not read as CSV: {exc}")
            return
        yield number, row


def _header_problem(missing: list[str], unknown: list[str], twice: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing column(s) {', '.join(missing)}")
    if unknown:
        # As written, but fit for one line of the log.
        parts.append(f"unknown column(s) {printable(', '.join(unknown))}")
    if twice:
        parts.append(f"column(s) named twice: {', '.join(twice)}")
    return f"line 1: {'; '.join(parts)} (columns: {', '.join(COLUMNS)})"


def _appointment(values: dict[str, str], source: str, number: int) -> ScheduleMessage:
    status = (values.get("status") or "booked").lower()
    if status not in STATES:
        raise ValueError(f"status {status!r} is neither booked nor cancelled")
    patient = values["patient_id"]
    if not patient:
        raise ValueError("patient_id is empty")
    for name, limit in LIMITS.items():
        reason = bounds.too_long(values.get(name, ""), limit, name)
        if reason:
            raise ValueError(reason)
    when = values["appointment_time"]
    start = _time(when) if when else None
    if start is None and status == "booked":
        raise ValueError("appointment_time is empty")
    key = (
        values.get("appointment_id")
        or values.get("accession")
        or f"{patient}|{values.get('issuer', '')}|{when}"
    )
    return ScheduleMessage(
        control_id=f"{source}:{number}",
        sender="list file",
        message_type="list file",
        action=STATES[status],
        state="booked" if status == "booked" else "cancelled",
        appointment_id=f"list:{key}",
        patients=(PatientIdentifier(patient, values.get("issuer", "")),),
        start=start,
        procedure_code=values.get("procedure_code", ""),
        modality=values.get("modality", "").upper(),
        accession=values.get("accession", ""),
    )


def _time(text: str) -> float:
    """ISO 8601 (a space or T between date and time), or HL7 digits."""
    if text.isdigit():
        try:
            return parse_time(text, "appointment_time")
        except MessageError as exc:
            raise ValueError(exc.reason) from exc
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"appointment_time {text!r} is not a date and time (e.g. 2027-01-15 09:30)"
        ) from exc
    # Without an offset, fromisoformat gives local time, as HL7 does.
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError) as exc:  # year 1, say
        raise ValueError(f"appointment_time {text!r} is out of range") from exc
