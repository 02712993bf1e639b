"""Why a pack did not give an instance back: the kinds of failure a recall
(and a restore's salvage) tells apart, each in words for the report.

A failure is a kind and the detail the check that failed gave (the
reader's or the key store's own message). The kinds:

``pack-unopened``    the pack's header or data key does not open: a
                     master key the key store lacks, or a damaged header
``pack-unread``      the pack could not be read where it is kept (not
                     fetched from the mirror, a file that does not open)
``manifest-lost``    the pack's manifest cannot be read, so nothing in it
                     can be found (a salvage may still take instances out)
``cut-short``        the pack ends (or breaks) before the instance's
                     member, and its manifest, at the end, is lost with it
``not-in-manifest``  the pack opens, but its manifest does not list it
``member-damaged``   its member fails its own checks: the GCM tag, the
                     zstd frame, or its place and size in the manifest
``other-bytes``      its member decodes, to bytes whose SHA-256 is not
                     the catalog's
``not-written``      it could not be written online
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PACK_UNOPENED = "pack-unopened"
PACK_UNREAD = "pack-unread"
MANIFEST_LOST = "manifest-lost"
CUT_SHORT = "cut-short"
NOT_IN_MANIFEST = "not-in-manifest"
MEMBER_DAMAGED = "member-damaged"
OTHER_BYTES = "other-bytes"
NOT_WRITTEN = "not-written"

_SAID = {
    PACK_UNOPENED: "its pack does not open (not decrypted)",
    PACK_UNREAD: "its pack could not be read",
    MANIFEST_LOST: "its pack's manifest cannot be read",
    CUT_SHORT: "its pack is cut short before its member, and the manifest with it",
    NOT_IN_MANIFEST: "its pack's manifest does not list it",
    MEMBER_DAMAGED: "its member in the pack is damaged",
    OTHER_BYTES: "its bytes in the pack differ from the catalog's SHA-256",
    NOT_WRITTEN: "it could not be written online",
}


@dataclass(frozen=True)
class Failure:
    """Why one instance was not given back by one pack."""

    kind: str
    detail: str = ""

    def describe(self) -> str:
        said = _SAID.get(self.kind, self.kind)
        return f"{said}: {self.detail}" if self.detail else said

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        return cls(str(data["kind"]), str(data.get("detail", "")))
