"""The appliance's exceptions, each with a message an administrator can act on.

Exceptions raised by libraries (lmdb, OSError from the file system, pydicom)
are translated into these at the boundary of the module that called them, so
that callers only need to know this vocabulary::

    ApplianceError
     +-- ConfigError            a configuration file or value is wrong
     +-- CatalogError           the catalog cannot be opened or written
     |    +-- SchemaVersionError   the catalog was written by another version
     +-- StorageError           a tier cannot store or read a file
     |    +-- OutOfSpaceError      a tier has no room left
     +-- RejectedInstance       an instance is refused (bad or conflicting)
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


class RejectedInstance(ApplianceError):
    """An instance is refused; ``status`` is the DICOM C-STORE status to answer.

    Statuses (PS3.4 B.2.3 and PS3.7 C): 0xA900 the data set does not match
    its SOP class or lacks a required UID, 0xC000 it cannot be parsed,
    0x0111 a different instance already holds this SOP Instance UID.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)
