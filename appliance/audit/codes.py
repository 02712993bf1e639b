"""The coded values audit messages carry: DICOM event IDs, event types,
participant roles and object ID types (PS3.16 CID 400 to 403), and the
RFC 3881 codes the DICOM audit message schema reuses (PS3.15 A.5.2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """A coded value: csd-code, codeSystemName and originalText attributes."""

    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# Audit Event ID, PS3.16 CID 400.
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
PATIENT_RECORD = _dcm("110110", "Patient Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")

# Audit Event Type Code, PS3.16 CID 401.
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")

# Audit Active Participant Role ID Code, PS3.16 CID 402.
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
DESTINATION_MEDIA = _dcm("110154", "Destination Media")
SOURCE_MEDIA = _dcm("110155", "Source Media")

# Audit Participant Object ID Type Code, PS3.16 CID 403, and RFC 3881's
# Patient Number, which the schema uses for patients.
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

# Audit Source Type Code (PS3.15 A.5.2, from RFC 3881): an application
# server process.
APPLICATION_SERVER = Code("4", "DCM", "Application Server process")

# EventActionCode (PS3.15 A.5.1).
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"

# EventOutcomeIndicator (PS3.15 A.5.1).
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12

# NetworkAccessPointTypeCode: 1 machine name, 2 IP address.
MACHINE_NAME = "1"
IP_ADDRESS = "2"

# ParticipantObjectTypeCode and ParticipantObjectTypeCodeRole (A.5.2.6).
PERSON, SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE, ROLE_QUERY = "1", "3", "13", "24"
