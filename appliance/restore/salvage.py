"""Instances taken out of a pack whose manifest cannot be read.

A pack cut short on the mirror (an upload that stopped, a truncated file)
loses its manifest and trailer, which sit at its end; recall, which finds
instances through the manifest, then gets nothing from it. The members
before the cut are still whole, and each is sealed on its own (AES-GCM
with the pack id and member name bound in). So the pack is read from its
start, member by member: the catalog knows which member holds which
instance, and an instance counts only when its member opens and its bytes
have the SHA-256 the catalog recorded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import BinaryIO

from appliance.catalog import copies
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError
from appliance.hsm.tiers import ONLINE
from appliance.storage import durable
from appliance.storage.keys import KeyStore
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader
from appliance.storage.packs.reader import Sink

logger = logging.getLogger(__name__)


def salvage(
    catalog: Catalog,
    online: OnlineTier,
    keys: KeyStore,
    pack_path: Path,
    pack: PackRecord,
    records: list[InstanceRecord],
) -> int:
    """Stage online every instance of ``records`` that ``pack_path`` still
    holds intact; how many were staged."""
    wanted = {
        pack.members[r.sop_instance_uid]: r
        for r in records
        if r.sop_instance_uid in pack.members
    }
    if not wanted:
        return 0
    written: dict[str, str] = {}  # member name -> online key
    try:
        with PackReader.open(pack_path, keys) as reader:
            reader.read_all(_sink(online, wanted, written), threads=1)
    except ApplianceError as exc:
        # A header that does not open leaves nothing readable; a read that
        # fails part way keeps the members before it.
        logger.warning("pack %s: salvage stopped: %s", pack.pack_id, exc)
    staged = _keep_intact(online, wanted, written)
    unused = copies.add_copies(catalog, ONLINE, staged)
    for _tier, key in unused:
        online.remove(key)
    count = len(staged) - len(unused)
    logger.warning(
        "pack %s has no readable manifest: %d of %d instance(s) taken out of it "
        "member by member, checked against the catalog",
        pack.pack_id,
        count,
        len(wanted),
    )
    return count


def _sink(
    online: OnlineTier, wanted: dict[str, InstanceRecord], written: dict[str, str]
) -> Sink:
    """Where each member's bytes go: a new online file for a wanted one,
    nowhere for the others. The reader closes each file after its member."""

    def open_for(member: str) -> BinaryIO:
        if member not in wanted:
            return open(os.devnull, "wb")
        key = online.new_key()
        written[member] = key
        return open(online.path_of(key), "wb")

    return open_for


def _keep_intact(
    online: OnlineTier, wanted: dict[str, InstanceRecord], written: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """The written files whose bytes are the catalog's, made durable; the
    others removed. SOP Instance UID -> (online key, SHA-256)."""
    staged: dict[str, tuple[str, str]] = {}
    for member, key in written.items():
        record = wanted[member]
        path = online.path_of(key)
        if _sha256(path) != record.sha256:
            online.remove(key)
            continue
        durable.fsync_file(path)
        durable.fsync_directory(path.parent)
        staged[record.sop_instance_uid] = (key, record.sha256)
    return staged


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()
