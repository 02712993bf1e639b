"""The file meta that heads a received data set's file, written directly.

pynetdicom writes each incoming C-STORE data set to a Part 10 file, headed
by a file meta it builds as a pydicom Dataset and passes through pydicom's
writer: about a tenth of the work of receiving a small instance. The file
meta of a received instance is always the same seven elements, Explicit VR
Little Endian (PS3.10 7.1), so they are written here as bytes; the tests
check that the bytes are pydicom's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import pynetdicom.dimse_messages
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta

_VERSION = b"\x00\x01"


@dataclass(frozen=True)
class FileMeta:
    """What pynetdicom asks for: the UIDs of one received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str

    def encoded(self) -> bytes:
        """The file meta group, group length first; ValueError when the SOP
        Instance UID or transfer syntax is empty.

        An empty SOP class is written as it is: such a request is refused
        (``command_faults``), and its file removed unread.
        """
        if not (self.sop_instance_uid and self.transfer_syntax):
            raise ValueError("a file meta UID is empty")
        body = _element(0x0001, b"OB", _VERSION)
        body += _element(0x0002, b"UI", _uid(self.sop_class_uid))
        body += _element(0x0003, b"UI", _uid(self.sop_instance_uid))
        body += _element(0x0010, b"UI", _uid(self.transfer_syntax))
        body += _element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
        version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
        body += _element(0x0013, b"SH", version + b" " * (len(version) % 2))
        return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def install() -> None:
    """Have pynetdicom write received files' file meta with :class:`FileMeta`."""
    pynetdicom.dimse_messages.create_file_meta = _create  # type: ignore[assignment]
    pynetdicom.dimse_messages.write_file_meta_info = _write  # type: ignore[assignment]


def _create(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> FileMeta:
    return FileMeta(_text(sop_class_uid), _text(sop_instance_uid), str(transfer_syntax))


def _text(uid: Any) -> str:
    """A request's UID as sent: several values (which the request is refused
    for) joined as on the wire, not as a Python list."""
    if isinstance(uid, list | MultiValue):
        return "\\".join(str(value) for value in uid)
    return str(uid)


def _write(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, FileMeta):
        try:
            fp.write(file_meta.encoded())
            return
        except (UnicodeEncodeError, ValueError):
            # A request with UIDs that are not even ASCII, or empty: left
            # to pydicom, which writes the first (for the checks of the
            # data set to judge) and refuses the second, so that the
            # association is aborted rather than the request left unanswered.
            file_meta = create_file_meta(
                sop_class_uid=UID(file_meta.sop_class_uid),
                sop_instance_uid=UID(file_meta.sop_instance_uid),
                transfer_syntax=UID(file_meta.transfer_syntax),
            )
    write_file_meta_info(fp, file_meta, enforce_standard)  # type: ignore[arg-type]


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\x00" * (len(encoded) % 2)


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
