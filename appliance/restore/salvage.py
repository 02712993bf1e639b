"""Instances taken out of a pack whose manifest cannot be read.

A pack cut short on the mirror (an upload that stopped, a truncated file)
loses its manifest and trailer, which sit at its end; recall, which finds
instances through the manifest, then gets nothing from it. The members
before the cut are still whole, and each is sealed on its own (AES-GCM
with the pack id and member name bound in). So the pack is read from its
start, member by member: the catalog knows which member holds which
instance, and an instance counts only when its member opens and its bytes
have the SHA-256 the catalog recorded. An instance it cannot give is told
apart: its member is past the cut (or the break), fails its own checks,
or decodes to other bytes than the catalog's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from appliance.catalog import copies
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError
from appliance.hsm import failures
from appliance.hsm.failures import Failure
from appliance.hsm.tiers import ONLINE
from appliance.storage import durable
from appliance.storage.keys import KeyStore
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader
from appliance.storage.packs.reader import Sink
from appliance.storage.packs.report import UNCHECKED, VerifyReport

logger = logging.getLogger(__name__)


@dataclass
class Salvaged:
    """What a salvage staged, and why it could not give the rest."""

    staged: int = 0
    # SOP Instance UID -> why not
    failures: dict[str, Failure] = field(default_factory=dict)


def salvage(
    catalog: Catalog,
    online: OnlineTier,
    keys: KeyStore,
    pack_path: Path,
    pack: PackRecord,
    records: list[InstanceRecord],
) -> Salvaged:
    """Stage online every instance of ``records`` that ``pack_path`` still
    holds intact; how many were staged, and why the others were not."""
    wanted = {
        pack.members[r.sop_instance_uid]: r
        for r in records
        if r.sop_instance_uid in pack.members
    }
    if not wanted:
        return Salvaged()
    written: dict[str, str] = {}  # member name -> online key
    read: VerifyReport | None = None
    stopped = ""
    try:
        with PackReader.open(pack_path, keys) as reader:
            read = reader.read_all(_sink(online, wanted, written), threads=1)
    except ApplianceError as exc:
        # A header that does not open leaves nothing readable; a read that
        # fails part way keeps the members before it.
        logger.warning("pack %s: salvage stopped: %s", pack.pack_id, exc)
        stopped = str(exc)
    staged = _keep_intact(online, wanted, written)
    unused = copies.add_copies(catalog, ONLINE, staged)
    for _tier, key in unused:
        online.remove(key)
    done = Salvaged(len(staged) - len(unused))
    for member, record in wanted.items():
        if record.sop_instance_uid not in staged:
            why = _why_not(member, read, stopped, pack_path, pack)
            done.failures[record.sop_instance_uid] = why
    logger.warning(
        "pack %s has no readable manifest: %d of %d instance(s) taken out of it "
        "member by member, checked against the catalog",
        pack.pack_id,
        done.staged,
        len(wanted),
    )
    return done


def _why_not(
    member: str,
    read: VerifyReport | None,
    stopped: str,
    path: Path,
    pack: PackRecord,
) -> Failure:
    """Why the member of a wanted instance gave nothing intact."""
    if read is None:
        return Failure(failures.PACK_UNOPENED, stopped)
    checks = {check.member: check.problem for check in read.instances}
    if member not in checks:
        # Never met whole: the pack ends, or cannot be read, before its end.
        size = _size(path)
        detail = read.problems[0] if read.problems else "its member is not there"
        if size < pack.size:
            detail = f"{size} of its {pack.size} bytes are there; {detail}"
        return Failure(failures.CUT_SHORT, detail)
    problem = checks[member]
    if problem and problem != UNCHECKED:
        return Failure(failures.MEMBER_DAMAGED, f"{member}: {problem}")
    return Failure(failures.OTHER_BYTES, f"{member} decodes to other bytes")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
