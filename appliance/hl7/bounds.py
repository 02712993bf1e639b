"""How long a value taken from HL7 may be, and the check that refuses more.

A value the archive keeps from a message becomes a DICOM attribute, or is
matched against one, so it is held to the longest value of that attribute's
value representation (DICOM PS3.5 section 6.2, table 6.2-1), counted in
characters as DICOM counts them:

| HL7 | becomes | VR | at most |
| --- | --- | --- | --- |
| PID-5 | PatientName (one component group, ``^`` included) | PN | 64 |
| PID-3, MRG-1 (.1, .4) | PatientID, IssuerOfPatientID, OtherPatientIDs | LO | 64 |
| SCH-1, SCH-2, ORC-2, ORC-3 | the appointment (placer, filler order number) | LO | 64 |
| OBR-4, OBR-44, AIS-3 (.1, .2) | the procedure (code value, meaning) | LO | 64 |
| IPC-1, OBR-18 | AccessionNumber | SH | 16 |
| IPC-2, OBR-19 | RequestedProcedureID | SH | 16 |
| IPC-5, OBR-24 | Modality | CS | 16 |

The message control ID (MSH-10) and the sender (MSH-3, MSH-4) are kept
too, to answer a message sent again: MSH-10 at most 199 characters, the
length later HL7 versions give it, MSH-3 and MSH-4 (HD) 227 each, the
length HL7 v2.5 gives them.

A longer value is never cut short (a cut ID matches another patient): the
message is answered AE. HL7 v2.5 table 0357 has no code for a length, so
the ERR segment says 102 (data type error), with the field in ERR-2 and
the limit in the text (ERR-8); the value itself is not quoted, since it may be a
name.
"""

from __future__ import annotations

PERSON_NAME = 64  # PN, per component group
LONG_STRING = 64  # LO
SHORT_STRING = 16  # SH
CODE_STRING = 16  # CS
CONTROL_ID = 199
APPLICATION = 227  # HD, whole (MSH-3, MSH-4)


def too_long(value: str, limit: int, location: str) -> str:
    """Why ``value`` is refused at ``location`` (the ERR-2 location, e.g.
    ``PID^1^5``), or "" when it has at most ``limit`` characters."""
    if len(value) <= limit:
        return ""
    return (
        f"{field_name(location)} is {len(value)} characters long; "
        f"at most {limit} are taken"
    )


def field_name(location: str) -> str:
    """``PID^2^5`` as ``PID-5`` (of the second PID segment: ``PID[2]-5``)."""
    parts = location.split("^")
    if len(parts) < 3:
        return location
    segment, occurrence, field = parts[:3]
    if occurrence not in ("", "1"):
        segment = f"{segment}[{occurrence}]"
    return f"{segment}-{field}"
