"""Mending a bad copy from another one.

An online file is rebuilt from the nearest readable pack that holds the
instance (nearline, offline, then the mirror), checked against the
catalog's SHA-256 and size, and put back in place under its key. A bad
nearline or offline pack is replaced by a new pack of the study on the
same tier, written from the online copies (recalled first from another
tier or the mirror when the study is not online), read back and recorded
like any migration; the old pack is forgotten (and a nearline file
deleted) only once nothing counts it.

Nothing here deletes the last copy of anything: a copy that cannot be
rebuilt stays where it is, marked unverified, for a person to look at.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from pathlib import Path

from appliance import audit
from appliance.audit import codes
from appliance.catalog import copies
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord
from appliance.catalog.store import Catalog
from appliance.hsm.migrator import Migrator, Outcome
from appliance.hsm.recall import Recaller
from appliance.hsm.scheduler import MIGRATION_LOCK
from appliance.hsm.tiers import ONLINE, Tiers
from appliance.storage import durable
from appliance.storage.lock import TierLock

logger = logging.getLogger(__name__)

# How long a repair of a pack waits for a migration under way to finish.
_WRITER_WAIT = 600.0


class Repairer:
    """Rebuilds bad online files and bad nearline packs from other copies."""

    def __init__(
        self, catalog: Catalog, tiers: Tiers, data_dir: Path, min_copies: int = 2
    ) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.data_dir = data_dir
        self.min_copies = min_copies
        self.recaller = Recaller(catalog, tiers)

    def online(self, record: InstanceRecord, copy: Copy) -> bool:
        """Mark the online copy bad, rebuild it from a pack; whether it worked."""
        uid = record.sop_instance_uid
        if not copies.set_copy_verified(
            self.catalog, uid, ONLINE, copy.location, False
        ):
            return False  # released meanwhile: nothing to repair
        online = self.tiers.online
        path = online.path_of(copy.location)
        # Extracted beside the bad file, then renamed over it: the bad file
        # stays until a good one takes its place.
        temp = path.with_name(f".{path.name}.scrub.tmp")
        source = self.recaller.copy_out_from(record, temp)
        if source is None or not _matches(temp, record):
            temp.unlink(missing_ok=True)
            logger.error(
                "online copy of instance %s (study %s) cannot be repaired: no "
                "other copy could be read",
                uid,
                record.study_uid,
            )
            what = f"online copy of instance {uid} bad; no other copy could be read"
            self._audit(record.study_uid, what, codes.SERIOUS_FAILURE)
            return False
        durable.move_into_place(temp, path, online.root)
        if not copies.set_copy_verified(self.catalog, uid, ONLINE, copy.location, True):
            online.remove(copy.location)  # released while it was rebuilt
            return False
        logger.warning("online copy of instance %s repaired from %s", uid, source)
        self._audit(record.study_uid, f"online copy of {uid} repaired from {source}")
        return True

    def pack(
        self, pack: PackRecord, uids: list[str], readable: Collection[str] = ()
    ) -> bool:
        """Stop counting the pack's bad copies, pack the study anew onto the
        pack's tier; whether every instance has a verified copy there again.

        The copies in ``readable`` (members that read good in a pack that
        is replaced whole) count until the study is recalled, so that the
        recall can take them from this pack: it may hold their only copy.
        """
        kept = sorted(set(readable) & set(uids))
        damaged = [uid for uid in uids if uid not in kept]
        copies.mark_unverified(self.catalog, pack.pack_id, damaged)
        lock = TierLock(self.data_dir, MIGRATION_LOCK)
        if not lock.acquire(exclusive=True, wait=_WRITER_WAIT):
            copies.mark_unverified(self.catalog, pack.pack_id, kept)
            logger.warning(
                "%s pack %s not repaired: a migration holds %s; the next "
                "pass tries again",
                pack.tier,
                pack.pack_id,
                MIGRATION_LOCK,
            )
            return False
        try:
            source, copied = self._repack(pack, kept)
        finally:
            lock.release()
        if not copied.ok:
            again = (
                f"; {copied.instances} instance(s) packed again into "
                f"{copied.pack_id} from {source}"
                if copied.instances
                else ""
            )
            logger.error(
                "%s pack %s (study %s) cannot be repaired: %s%s",
                pack.tier,
                pack.pack_id,
                pack.study_uid,
                copied.problem,
                again,
            )
            what = (
                f"{pack.tier} pack {pack.pack_id} bad, not repaired: "
                f"{copied.problem}{again}"
            )
            self._audit(pack.study_uid, what, codes.SERIOUS_FAILURE)
            return False

        replaced = copies.drop_replaced(self.catalog, pack.pack_id)
        if replaced is not None:
            # A volume keeps it (written once); a disk frees its room.
            self.tiers.packs[pack.tier].remove(replaced.location)
        logger.warning(
            "%s pack %s repaired: %d instance(s) of study %s packed again "
            "into %s from %s",
            pack.tier,
            pack.pack_id,
            copied.instances,
            pack.study_uid,
            copied.pack_id or "(none needed)",
            source,
        )
        what = (
            f"{pack.tier} pack {pack.pack_id} repaired: {copied.instances} "
            f"instance(s) packed again into {copied.pack_id or '-'} from {source}"
        )
        self._audit(pack.study_uid, what)
        return True

    def _audit(self, study_uid: str, what: str, outcome: int = codes.SUCCESS) -> None:
        """Say what was repaired from where, or what could not be."""
        name = "copy-repaired" if outcome == codes.SUCCESS else "copy-not-repaired"
        audit.study_copies_changed(
            self.tiers.audit,
            name,
            self.catalog,
            study_uid,
            codes.UPDATE,
            what,
            outcome,
        )

    def _repack(self, pack: PackRecord, kept: list[str]) -> tuple[str, Outcome]:
        """The pack's study copied onto its tier again: (where from, the
        outcome). The ``kept`` copies in the pack stop counting once the
        study is recalled, so that they are packed again too."""
        study_uid, tier = pack.study_uid, pack.tier
        migrator = Migrator(self.catalog, self.tiers, self.min_copies)
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, study_uid)
        was_online = found is not None and found.copies.get(ONLINE, 0) > 0
        source = "the online copies"
        recalled = None
        if self.recaller.needs_recall(study_uid):
            recalled = self.recaller.recall(
                study_uid, why=f"the scrub repairs a damaged {tier} pack"
            )
            source = "copies recalled from another tier or the mirror"
        # Only now, once the recall could read them: they are packed again.
        copies.mark_unverified(self.catalog, pack.pack_id, kept)
        if recalled is not None and not recalled.ok:
            # What came back is packed all the same: the instances that
            # could be read get their copy on the tier back, and only
            # those that could not are left for a person.
            problem = "; ".join(recalled.problems) or "the recall was incomplete"
            partial = migrator.copy(study_uid, tier, online_only=True)
            if partial.problem:
                partial.problem = f"{problem}; {partial.problem}"
            if not was_online:
                # Even when nothing new was packed (a later pass over the
                # same bad pack): the release keeps every instance's
                # min_copies, and the study goes back to where it was.
                migrator.release(study_uid, ONLINE)
            return source, partial
        outcome = migrator.copy(study_uid, tier)
        if outcome.ok and not was_online:
            # Leave the tiers as they were: the study was not online.
            migrator.release(study_uid, ONLINE)
        return source, outcome


def _matches(path: Path, record: InstanceRecord) -> bool:
    """The extracted file holds the catalog's bytes (size and SHA-256)."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        logger.warning("cannot read %s back: %s", path, exc)
        return False
    return size == record.size and digest.hexdigest() == record.sha256
