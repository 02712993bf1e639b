"""The appliance's exceptions, each with a message an administrator can act on.

Exceptions raised by libraries (lmdb, OSError from the file system, pydicom,
zstandard, cryptography) are translated into these at the boundary of the
module that called them, so that callers only need to know this vocabulary::

    ApplianceError
     +-- ConfigError            a configuration file or value is wrong
     +-- CatalogError           the catalog cannot be opened or written
     |    +-- SchemaVersionError   the catalog was written by another version
     +-- StorageError           a tier cannot store or read a file
     |    +-- OutOfSpaceError      a tier has no room left
     |    +-- SourceMismatchError  an instance's bytes differ from their checksum
     |    +-- PackError            a pack cannot be written or read as a pack
     |         +-- DamagedPackError   a part of a pack fails its checks
     |    +-- VolumeError          an offline volume or its device fails
     |         +-- VolumeNotReachable  the volume is not in a drive or slot
     |         +-- VolumeFull          the volume has no room for the pack
     |         +-- VolumeReadOnly      the volume refuses writes (write protected)
     +-- KeyStoreError          the master keys are missing, unsafe or unreadable
     |    +-- MissingKeyError      a pack needs a master key the store lacks
     +-- RejectedInstance       an instance is refused (bad or conflicting)
 +-- PatientRecordError     a patient update or merge names no usable patient
     +-- TransportError         the off-site mirror cannot be reached, read or written
     |    +-- HostKeyError         the mirror's host key is unknown or has changed
     |    +-- LoginRefusedError    the mirror refuses the appliance's login key
     |    +-- StalledTransferError a transfer made no progress for too long
     |    +-- MirrorConflictError  another file already holds the name on the mirror
     |    +-- ForeignMirrorError   the mirror holds another archive than this one
     |         +-- UnknownMirrorError  no marker, and none of the packs sent so far
     +-- LimiterClosed          the service stops while an upload waits
     +-- ExportError            an export's receiver is unreachable, refuses or aborts
"""


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """A configuration file or value is invalid.

    ``problems`` lists every error found, each as ``(key, message)`` so that
    ``appliance config check`` can report them all at once.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"{key}: {message}" for key, message in problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))


class CatalogError(ApplianceError):
    """The catalog cannot be opened, read or written."""


class SchemaVersionError(CatalogError):
    """The catalog on disk has a schema version this code does not read."""


class StorageError(ApplianceError):
    """A tier cannot store or read a file."""


class OutOfSpaceError(StorageError):
    """A tier has no room left for what it was asked to store."""


class SpoolError(StorageError):
    """The local spool refused a pack read from its volume, or an optical
    library's staging folder refused to be written (a full or read-only
    disk): the disk is at fault, not the pack nor its volume."""


class SourceMismatchError(StorageError):
    """The bytes read for an instance do not have the size or SHA-256 expected.

    Raised while packing, before anything of the instance is written: the
    copy read from (usually the online tier) is damaged or was replaced.
    """


class PackError(StorageError):
    """A pack cannot be written, or what is read is not a well-formed pack."""


class DamagedPackError(PackError):
    """A part of a pack fails its checks: it was altered or damaged.

    ``part`` names the tar member (``instances/000003.dcm.zst.enc``,
    ``manifest.json.zst``, ``pack.json``) or the tar header concerned, and
    ``sop_instance_uid`` the instance, when the part is one.
    """

    def __init__(
        self, pack_id: str, part: str, reason: str, sop_instance_uid: str | None = None
    ) -> None:
        self.pack_id = pack_id
        self.part = part
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        what = f"instance {sop_instance_uid} ({part})" if sop_instance_uid else part
        super().__init__(f"pack {pack_id}: {what}: {reason}")


class VolumeError(StorageError):
    """An offline volume (tape or disc) or its drive, changer or tool fails."""


class VolumeNotReachable(VolumeError):
    """The volume is known but on the shelf: load it into the library first."""


class VolumeFull(VolumeError):
    """The volume has no room left for the pack being written.

    Whatever part of the pack was written does not count as a pack: it is
    removed or left unlisted, and the pack can be written to another volume.
    """


class VolumeReadOnly(VolumeError):
    """The volume refuses to be written: a write-protected cartridge, or a
    folder (a mount) that is read only.

    Nothing of the pack was written, and the pack can be written to another
    volume; the volume can still be read.
    """


class KeyStoreError(ApplianceError):
    """The master key store is missing, unreadable, unsafe or inconsistent."""


class MissingKeyError(KeyStoreError):
    """Something was encrypted under a master key this appliance does not hold.

    ``key_id`` is the master key's id; importing the operator's escrow copy
    of that key makes what it protects readable again.
    """

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(
            f"master key {key_id} is not in the key store; import it from the "
            "escrow copy to read what was encrypted under it"
        )


class RejectedInstance(ApplianceError):
    """An instance is refused; ``status`` is the DICOM C-STORE status to answer.

    Statuses (PS3.4 B.2.3 and PS3.7 C): 0xA900 the data set does not match
    its SOP class or lacks a required UID, 0xC000 it cannot be parsed,
    0x0111 a different instance already holds this SOP Instance UID,
    0x0117 its SOP Instance UID is not a valid UID.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


class PatientRecordError(ApplianceError):
    """A patient update or merge cannot be applied as asked: it names a
    retired (merged) identifier, one held under several issuers, or one that
    another patient holds already. ``unknown`` tells "no such usable
    identifier" from "the identifier is taken"; ``location`` is the HL7
    field at fault (e.g. ``MRG^1^1``). Messages carry no patient data."""

    def __init__(self, message: str, location: str, unknown: bool = True) -> None:
        super().__init__(message)
        self.location = location
        self.unknown = unknown


class LimiterClosed(ApplianceError):
    """The bandwidth limiter was closed while an upload waited for its turn.

    The service is stopping: the upload is abandoned and sent again later.
    """


class DrillError(ApplianceError):
    """A restore drill cannot run: nothing replicated to sample, a mirror
    that holds no pack, another drill running, no room for a pack."""


class TransportError(ApplianceError):
    """The off-site mirror cannot be reached, read or written.

    Whatever was being uploaded is not on the mirror under its name; an
    unfinished upload is resumed, after checking, by the next attempt.
    """


class LocalSourceError(TransportError):
    """The local file given to an upload is not what the caller said: it is
    shorter, or its bytes have another SHA-256. Nothing was stored, and
    sending the same file again cannot succeed."""


class HostKeyError(TransportError):
    """The mirror's SSH host key is not the one pinned in known_hosts.

    Nothing was sent: the connection is refused before authentication. The
    message says which key was offered and what to do about it.
    """


class LoginRefusedError(TransportError):
    """The mirror refused to log the appliance in with its key.

    Nothing was sent; the message says which key to authorize on the mirror.
    """


class StalledTransferError(TransportError):
    """A transfer to or from the mirror made no progress for too long.

    The connection was torn down; the next attempt resumes the upload.
    """


class MirrorConflictError(TransportError):
    """A different file already holds this name on the mirror.

    Files on the mirror are never rewritten in place: the upload is refused
    and the file on the mirror is left as it is.
    """


class ForeignMirrorError(TransportError):
    """The mirror is not this archive's: its identity marker names another
    archive or was written with other master keys, or it is not the mirror
    replicated to so far. Nothing is sent to it."""


class UnknownMirrorError(ForeignMirrorError):
    """The mirror has no identity marker and none of the packs recorded as
    sent to it: another disk or server than the one replicated to so far
    (a mistyped path, an unmounted folder), or a new, empty mirror."""


class ExportError(ApplianceError):
    """An export cannot go on: its receiver cannot be reached, refuses the
    association or aborts it, or the export's state cannot be kept.

    What the receiver accepted before is recorded; the next run of the
    export continues from there.
    """
