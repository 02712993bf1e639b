"""The migrator: copy a study down a tier, verify it, commit, then release.

For each study and target tier the steps are, in this order::

    1. write a pack of the instances the target lacks (durably)
    2. read the whole pack back and check every checksum
    3. record the pack and the new copies in one catalog transaction
    4. release the source, if the rule moves rather than copies: the
       catalog drops the copies first (only when enough other verified
       copies remain), then the files are deleted

A crash before 3 leaves a pack file the catalog does not know (an orphan,
reported by the scrub); a crash between the release's commit and the
deletion leaves an orphan too. Neither counts as a copy, and no step can
leave an instance without a verified copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance import audit
from appliance.audit import codes
from appliance.catalog import copies
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError
from appliance.hsm.packing import LevelAttributes, instance_meta
from appliance.hsm.tiers import ONLINE, PackTier, Tiers
from appliance.storage.packs.manifest import InstanceMeta

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one migration step did to one study."""

    study_uid: str
    action: str
    tier: str
    instances: int = 0
    bytes: int = 0
    pack_id: str = ""
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


class Migrator:
    """Copies studies into packs on lower tiers, and releases copies."""

    def __init__(self, catalog: Catalog, tiers: Tiers, min_copies: int = 2) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.min_copies = min_copies

    def copy(self, study_uid: str, tier: str, online_only: bool = False) -> Outcome:
        """Copy the study's instances that ``tier`` lacks into a new pack.

        Normally all or nothing: a study with instances that are not online
        is left for a recall. With ``online_only`` (a repair, after a recall
        that could not bring everything back) the online ones are packed
        anyway, and the outcome names the rest as its problem.
        """
        outcome = Outcome(study_uid, "copy", tier)
        target = self.tiers.pack_tier(tier)
        if target is None:
            outcome.problem = f"cannot copy to tier {tier!r}"
            return outcome
        wanted = [
            r
            for r in copies.instances_of(self.catalog, study_uid)
            if not r.copy_on(tier)
        ]
        if not wanted:
            return outcome
        readable = [r for r in wanted if r.copy_on(ONLINE)]
        unreadable = len(wanted) - len(readable)
        if unreadable and not (online_only and readable):
            outcome.problem = (
                f"{unreadable} instance(s) have no online copy to pack; recall "
                "the study first"
            )
            return outcome

        try:
            self._pack(study_uid, readable, tier, target, outcome)
            if unreadable:
                outcome.problem = (
                    f"{unreadable} instance(s) have no online copy and were not packed"
                )
        except ApplianceError as exc:
            outcome.problem = str(exc)
        if outcome.ok:
            logger.info(
                "study %s copied to %s: %d instances in pack %s",
                study_uid,
                tier,
                outcome.instances,
                outcome.pack_id,
            )
        else:
            logger.error(
                "copying study %s to %s failed: %s", study_uid, tier, outcome.problem
            )
        return outcome

    def release(self, study_uid: str, tier: str) -> Outcome:
        """Drop the study's copies on ``tier``, if enough others remain."""
        outcome = Outcome(study_uid, "release", tier)
        result = copies.release(self.catalog, study_uid, tier, self.min_copies)
        if result.refused:
            outcome.problem = result.refused
            logger.warning(
                "study %s not released from %s: %s", study_uid, tier, result.refused
            )
            return outcome

        for copy_tier, location in result.removed:
            if copy_tier == ONLINE:
                self.tiers.online.remove(location)
        for pack in result.packs:
            holder = self.tiers.pack_tier(pack.tier)
            if holder is not None:
                holder.remove(pack.location)
        outcome.instances = len(result.removed)
        logger.info(
            "study %s released from %s: %d copies", study_uid, tier, outcome.instances
        )
        audit.study_copies_changed(
            self.tiers.audit,
            "study-released",
            self.catalog,
            study_uid,
            codes.DELETE,
            f"{outcome.instances} copies released from {tier}",
        )
        return outcome

    def move(self, study_uid: str, source: str, target: str) -> list[Outcome]:
        """Copy to ``target``, then release ``source`` if the copy worked."""
        copied = self.copy(study_uid, target)
        if not copied.ok:
            return [copied]
        return [copied, self.release(study_uid, source)]

    # -- the steps --------------------------------------------------------------

    def _pack(
        self,
        study_uid: str,
        records: list[InstanceRecord],
        tier: str,
        target: PackTier,
        outcome: Outcome,
    ) -> None:
        pack_id = copies.next_pack_id(self.catalog)
        keys = self.tiers.keys
        key = keys.new_data_key() if keys is not None else None
        items = self._items(records)
        location, summary = target.write(pack_id, items, study_uid, key, keys)

        members = {
            entry.sop_instance_uid: entry.member for entry in summary.manifest.instances
        }
        pack = PackRecord(
            pack_id=pack_id,
            study_uid=study_uid,
            tier=tier,
            location=location,
            size=summary.bytes_written,
            sha256=summary.sha256,
            members=members,
            key_id=key.master_key_id if key else None,
        )
        checksums = {r.sop_instance_uid: r.sha256 for r in records}
        outcome.instances = copies.record_pack(self.catalog, pack, checksums)
        outcome.bytes = summary.bytes_written
        outcome.pack_id = pack_id

    def _items(
        self, records: list[InstanceRecord]
    ) -> Iterator[tuple[InstanceMeta, Path]]:
        levels = LevelAttributes(self.catalog)
        for record in records:
            online = record.copy_on(ONLINE)
            assert online is not None
            yield (
                instance_meta(record, levels),
                self.tiers.online.path_of(online.location),
            )
