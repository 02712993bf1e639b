"""Bringing orphans into the catalog, after a person has reviewed them.

An orphan is a file or pack the scrub found on a tier that no catalog entry
names (see :mod:`appliance.scrub.orphans`). Adoption never moves, rewrites
or deletes it: an online file is recorded where it lies, with the checks a
C-STORE gets; a nearline pack is read back whole first, the instances it
holds that the catalog lacks are stored online from it, and the pack is
then recorded as a copy of every instance whose checksum it matches.
Anything that does not check out is left as it was, with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.catalog import copies
from appliance.catalog.copies import PackRecord
from appliance.catalog.store import Catalog, Outcome
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.hsm.tier_folders import vet_tier_folders
from appliance.hsm.tiers import NEARLINE, ONLINE, Tiers, open_tiers
from appliance.ingest import Ingest
from appliance.scrub import state
from appliance.scrub.job import SCRUB_LOCK, ScrubBusy
from appliance.storage.lock import TierLock
from appliance.storage.nearline import NearlineTier
from appliance.storage.packs.reader import PackReader

logger = logging.getLogger(__name__)

ADOPTED = "adopted"
ALREADY_ARCHIVED = "already archived"
REFUSED = "refused"

_SOURCE = "scrub adopt"
_CHUNK = 1 << 20


@dataclass
class Adoption:
    """What adopting one orphan did."""

    tier: str
    location: str
    outcome: str  # ADOPTED, ALREADY_ARCHIVED or REFUSED
    detail: str


def adopt(config: Config, wanted: list[tuple[str, str]]) -> list[Adoption]:
    """Adopt the orphans ``wanted`` ((tier, location) as the scrub listed
    them); each is checked to be an orphan still. Holds the scrub lock, so
    that no scrub pass reports the orphan list meanwhile."""
    # An orphan is never looked for on the empty mount point of a disk that
    # is not mounted (which opening the tiers would give a layout).
    vet_tier_folders(config)
    lock = TierLock(config.data_dir, SCRUB_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        raise ScrubBusy("a scrub is running; adopt when it has finished")
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    tiers = open_tiers(config)
    # Never replace what the catalog holds with an orphan's bytes.
    ingest = Ingest(catalog, tiers.online, "refuse")
    try:
        adopter = _Adopter(catalog, tiers, ingest)
        folder = state.folder_of(config.data_dir)
        saved = state.load(folder)
        done = []
        for tier, location in wanted:
            listed = location in saved.orphans.get(tier, [])
            found = adopter.one(tier, location, listed)
            logger.info("orphan %s on %s: %s (%s)", location, tier, *_said(found))
            done.append(found)
            if found.outcome == ADOPTED and listed:
                saved.orphans[tier].remove(location)
        state.save(folder, saved)
        return done
    finally:
        ingest.close()
        catalog.close()
        lock.release()


def listed_orphans(config: Config, tier: str | None = None) -> list[tuple[str, str]]:
    """Every orphan the last scrub passes listed, as (tier, location)."""
    saved = state.load(state.folder_of(config.data_dir))
    return [
        (name, location)
        for name, found in sorted(saved.orphans.items())
        if tier is None or name == tier
        for location in found
    ]


class _Adopter:
    def __init__(self, catalog: Catalog, tiers: Tiers, ingest: Ingest) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.ingest = ingest

    def one(self, tier: str, location: str, listed: bool) -> Adoption:
        if not listed:
            return Adoption(
                tier, location, REFUSED, "not in the scrub's orphan list; run a scrub"
            )
        try:
            if tier == ONLINE:
                return self._online_file(location)
            if tier == NEARLINE:
                return self._nearline_pack(location)
        except (ApplianceError, OSError) as exc:
            return Adoption(tier, location, REFUSED, str(exc))
        return Adoption(tier, location, REFUSED, f"orphans on {tier} are not adopted")

    def _online_file(self, location: str) -> Adoption:
        path = Path(location)
        key = path.stem
        online = self.tiers.online
        if path.suffix != ".dcm" or online.path_of(key) != online.root / location:
            return Adoption(ONLINE, location, REFUSED, "not an online tier file name")
        if not (online.root / location).is_file():
            return Adoption(ONLINE, location, REFUSED, "the file is gone")
        result = self.ingest.record_in_place(key, _SOURCE)
        uid = result.sop_instance_uid
        if not result.ok or result.outcome is Outcome.KEPT_FIRST:
            return Adoption(ONLINE, location, REFUSED, result.reason or "refused")
        if result.outcome is Outcome.IDENTICAL:
            return Adoption(
                ONLINE,
                location,
                ALREADY_ARCHIVED,
                f"instance {uid} is archived with the same content; the file "
                "is a spare copy, left in place",
            )
        return Adoption(ONLINE, location, ADOPTED, f"instance {uid} recorded")

    def _nearline_pack(self, location: str) -> Adoption:
        nearline = self.tiers.pack_tier(NEARLINE)
        assert isinstance(nearline, NearlineTier)
        path = nearline.path_of(location)
        with PackReader.open(path, self.tiers.keys) as reader:
            pack_id = reader.pack_id
            report = reader.read_all()
        if not report.ok:
            return Adoption(NEARLINE, location, REFUSED, report.describe())
        with self.catalog.read() as txn:
            if self.catalog.get(txn, "packs", pack_id) is not None:
                return Adoption(
                    NEARLINE,
                    location,
                    REFUSED,
                    f"pack {pack_id} is recorded at another location",
                )

        stored = self._store_unknown(path)
        with PackReader.open(path, self.tiers.keys) as reader:
            manifest = reader.manifest()
            encryption = reader.header.encryption
        key_id = encryption.master_key_id if encryption else None
        members = {entry.sop_instance_uid: entry.member for entry in manifest.instances}
        study_uids = {entry.meta.study_uid for entry in manifest.instances}
        pack = PackRecord(
            pack_id=pack_id,
            study_uid=manifest.study_uid or min(study_uids, default=""),
            tier=NEARLINE,
            location=location,
            size=path.stat().st_size,
            sha256=_file_sha256(path),
            members=members,
            key_id=key_id,
        )
        checksums = {
            entry.sop_instance_uid: entry.meta.sha256 for entry in manifest.instances
        }
        added = copies.record_pack(self.catalog, pack, checksums)
        return Adoption(
            NEARLINE,
            location,
            ADOPTED,
            f"pack {pack_id} recorded: a copy of {added} of its "
            f"{len(members)} instance(s); {stored} stored online from it",
        )

    def _store_unknown(self, path: Path) -> int:
        """Store online, through the ingest checks, the pack's instances the
        catalog does not know; how many were stored."""
        online = self.tiers.online
        with PackReader.open(path, self.tiers.keys) as reader:
            entries = reader.manifest().instances
            with self.catalog.read() as txn:
                unknown = [
                    e
                    for e in entries
                    if self.catalog.instance(txn, e.sop_instance_uid) is None
                ]
            stored = 0
            for entry in unknown:
                staged = online.incoming / f"{secrets.token_hex(16)}.adopt"
                try:
                    reader.extract_to(entry, staged, online.root)
                    result = self.ingest.store_received(staged, _SOURCE)
                finally:
                    staged.unlink(missing_ok=True)
                if not result.ok:
                    raise ApplianceError(
                        f"instance {entry.sop_instance_uid} in the pack was "
                        f"refused: {result.reason}"
                    )
                stored += 1
        return stored


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _said(found: Adoption) -> tuple[str, str]:
    return found.outcome, found.detail
