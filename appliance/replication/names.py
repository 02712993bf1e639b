"""Names of files on the mirror that more than one part of the appliance
needs to know (see ``docs/replication.md`` for the whole layout)."""

from __future__ import annotations


def pack_name(pack_id: str) -> str:
    """Where a pack is on the mirror: a folder per last three digits, so
    that no folder grows past a thousand packs."""
    return f"packs/{pack_id[-3:]}/{pack_id}.pack"
