"""A scrub pass: every copy on a tier read back and checked, in catalog
order from where the last run stopped, within a byte rate.

Online: each instance's file, its size and SHA-256 against the catalog.
Nearline: each pack file read whole, its size and SHA-256 against its
record, every member decoded and checked against the manifest, and each
manifest entry against the catalog's SHA-256. A bad copy goes to the
:class:`~appliance.scrub.repair.Repairer` at once.

The cursor (the catalog key last checked) is saved at least every second,
so a run that is killed resumes there; the catalog is read in short
transactions, never one held for the length of a pass.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance import audit
from appliance.audit import codes
from appliance.catalog import copies, requests
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, SpoolError, VolumeNotReachable
from appliance.hsm.tiers import NEARLINE, OFFLINE, ONLINE, Tiers
from appliance.replication.bandwidth import Limiter
from appliance.scrub import orphans, state
from appliance.scrub.repair import Repairer
from appliance.storage.nearline import NearlineTier
from appliance.storage.packs import PackReader, VerifyReport
from appliance.storage.streams import reader_over

logger = logging.getLogger(__name__)

TIERS = (ONLINE, NEARLINE, OFFLINE)
_CHUNK = 1 << 20
_BATCH = 64
_SAVE_EVERY = 1.0
# A volume not read by the scrub for this long is asked for (90 days).
OVERDUE_SECONDS = 90 * 86400.0

# Called with (tier, copies checked in this run).
Progress = Callable[[str, int], None]
# What reading a pack found: the instances it fails to hold, why, and those
# of them whose members read good all the same (in a pack replaced whole).
_Found = tuple[set[str], str, set[str]]


@dataclass
class PassReport:
    """What one run did on one tier."""

    tier: str
    checked: int = 0
    bad: int = 0
    repaired: int = 0
    bytes_read: int = 0
    finished: bool = False  # the run reached the end of the tier
    problems: list[str] = field(default_factory=list)


class Scrubber:
    """Checks copies tier by tier and hands bad ones to the repairer."""

    def __init__(
        self,
        catalog: Catalog,
        tiers: Tiers,
        folder: Path,
        repairer: Repairer,
        limiter: Limiter | None = None,
        orphan_grace: float = orphans.GRACE_SECONDS,
        overdue: float = OVERDUE_SECONDS,
    ) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.folder = folder
        self.repairer = repairer
        self.limiter = limiter
        self.orphan_grace = orphan_grace
        self.overdue = overdue
        self.state = state.load(folder)
        self._saved = time.monotonic()

    # -- passes ---------------------------------------------------------------

    def run_tier(
        self, tier: str, budget: int | None = None, progress: Progress | None = None
    ) -> PassReport:
        """Check up to ``budget`` copies (all when None) from the cursor on;
        at the end of the tier, the pass is complete and orphans are sought."""
        report = PassReport(tier)
        mine = self.state.tier(tier)
        if not mine.cursor and not mine.pass_checked:
            mine.pass_started = time.time()
        if tier == OFFLINE:
            self._check_loaded_since(report)
        database = "instances" if tier == ONLINE else "packs"
        while budget is None or report.checked < budget:
            keys = _keys_after(self.catalog, database, mine.cursor, _BATCH)
            if not keys:
                self._finish_pass(tier, report)
                break
            for key in keys:
                if budget is not None and report.checked >= budget:
                    break
                checked = self._check(tier, key, report)
                mine.cursor = key
                mine.pass_checked += checked
                if progress is not None and checked:
                    progress(tier, report.checked)
                self._save_now_and_then()
        state.save(self.folder, self.state)
        self._log(report)
        return report

    def run_study(self, study_uid: str, tier: str) -> PassReport:
        """Check every copy of one study on ``tier``; the cursor stays."""
        report = PassReport(tier)
        if tier == ONLINE:
            keys = [
                r.sop_instance_uid for r in copies.instances_of(self.catalog, study_uid)
            ]
        else:
            keys = [p.pack_id for p in copies.packs_of(self.catalog, study_uid)]
        for key in keys:
            self._check(tier, key, report)
        state.save(self.folder, self.state)
        self._log(report)
        return report

    def _check(self, tier: str, key: str, report: PassReport) -> int:
        """Check one catalog entry's copies on ``tier``; how many there were.
        The tier's totals follow at once, so a killed run loses none."""
        before = report.checked, report.bad, report.repaired
        if tier == ONLINE:
            self._check_instance(key, report)
        else:
            self._check_pack(key, tier, report)
        mine = self.state.tier(tier)
        mine.checked += report.checked - before[0]
        mine.bad += report.bad - before[1]
        mine.repaired += report.repaired - before[2]
        return report.checked - before[0]

    def _finish_pass(self, tier: str, report: PassReport) -> None:
        mine = self.state.tier(tier)
        mine.last_full_pass = time.time()
        mine.cursor = ""
        mine.pass_checked = 0
        report.finished = True
        found = self._orphans(tier)
        self.state.orphans[tier] = found
        for location in found:
            logger.warning(
                "%s tier: orphan %s (no catalog entry; kept)", tier, location
            )

    def _orphans(self, tier: str) -> list[str]:
        if tier == ONLINE:
            return orphans.online_orphans(
                self.catalog,
                self.tiers.online,
                self.folder / "online-keys",
                self.orphan_grace,
            )
        if tier != NEARLINE:
            return []
        nearline = self._nearline()
        if nearline is None:
            return []
        return orphans.nearline_orphans(self.catalog, nearline, self.orphan_grace)

    def _nearline(self) -> NearlineTier | None:
        tier = self.tiers.packs.get(NEARLINE)
        return tier if isinstance(tier, NearlineTier) else None

    # -- online ---------------------------------------------------------------

    def _check_instance(self, key: str, report: PassReport) -> None:
        record = _instance(self.catalog, key)
        if record is None:
            return
        for copy in [c for c in record.copies if c.tier == ONLINE]:
            report.checked += 1
            problem = self._online_problem(record, copy, report)
            if problem is None:
                if not copy.verified:
                    self._count_again(record, copy)
                continue
            if not _still_there(self.catalog, record, copy):
                continue  # released while it was read: nothing is wrong
            report.bad += 1
            logger.error(
                "online copy of instance %s (study %s) is bad: %s",
                record.sop_instance_uid,
                record.study_uid,
                problem,
            )
            if self.repairer.online(record, copy):
                report.repaired += 1
            self._note_if_lost(record.sop_instance_uid, f"online copy: {problem}")

    def _online_problem(
        self, record: InstanceRecord, copy: Copy, report: PassReport
    ) -> str | None:
        path = self.tiers.online.path_of(copy.location)
        try:
            size, sha256 = self._hash(path, report)
        except FileNotFoundError:
            return "the file is missing"
        except OSError as exc:
            return f"cannot be read: {exc}"
        if size != record.size:
            return f"holds {size} bytes, the catalog says {record.size}"
        if sha256 != record.sha256:
            return "its SHA-256 differs from the catalog's"
        return None

    # -- nearline -------------------------------------------------------------

    def _check_pack(self, pack_id: str, tier: str, report: PassReport) -> None:
        pack = _pack(self.catalog, pack_id)
        if pack is None or pack.tier != tier:
            return
        held = _held(self.catalog, pack)
        if not held:
            return
        if tier == OFFLINE and not self._reachable(pack):
            return
        if tier == OFFLINE:
            found = self._offline_problems(pack, held, report)
        else:
            found = self._pack_problems(pack, held, report)
        if found is None:
            return  # not read now: checked another time
        report.checked += 1
        bad, problem, readable = found
        # A release may have forgotten the pack while it was read: only
        # copies the catalog still counts are bad.
        held = _held(self.catalog, pack)
        bad &= set(held)
        for uid, record in held.items():
            copy = _copy_in(record, pack)
            if uid not in bad and copy is not None and not copy.verified:
                self._count_again(record, copy)
        if not bad:
            return
        report.bad += 1
        logger.error(
            "%s pack %s (study %s) is bad: %s; %d instance(s) affected",
            tier,
            pack.pack_id,
            pack.study_uid,
            problem,
            len(bad),
        )
        if self.repairer.pack(pack, sorted(bad), readable & bad):
            report.repaired += 1
        for uid in bad:
            self._note_if_lost(uid, f"{tier} pack {pack.pack_id}: {problem}")

    def _pack_problems(
        self, pack: PackRecord, held: dict[str, InstanceRecord], report: PassReport
    ) -> _Found | None:
        """The instances a nearline pack fails to hold, why, and those of
        them whose members still read good: the file is read once, within
        the rate, hashed whole while every member is decoded and checked."""
        nearline = self._nearline()
        if nearline is None:
            return None
        try:
            handle = open(nearline.path_of(pack.location), "rb")  # noqa: SIM115
        except FileNotFoundError:
            return set(held), "the pack file is missing", set()
        except OSError as exc:
            return set(held), f"cannot be read: {exc}", set()
        digest = hashlib.sha256()
        size = report.bytes_read

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(_CHUNK):
                    self._take(len(chunk))
                    digest.update(chunk)
                    report.bytes_read += len(chunk)
                    yield chunk

        stream = reader_over(chunks())
        try:
            result = PackReader(stream, self.tiers.keys).read_all()
            while stream.read(_CHUNK):
                pass  # what follows the pack's end, for its checksum
        except (ApplianceError, OSError) as exc:
            return set(held), f"cannot be read: {exc}", set()
        finally:
            stream.close()
        size = report.bytes_read - size

        bad, problem = _damaged_in(result, held)
        if (size, digest.hexdigest()) != (pack.size, pack.sha256):
            # Not the pack that was recorded: replaced whole. Its members
            # that were checked good against the catalog are still copies
            # a repair can recall from, and may be the only ones left.
            why = problem if bad else "its bytes differ from its record"
            return set(held), why, set(held) - bad
        return bad, problem, set()

    # -- offline --------------------------------------------------------------

    def _offline_problems(
        self, pack: PackRecord, held: dict[str, InstanceRecord], report: PassReport
    ) -> _Found | None:
        """The instances a pack on a volume fails to hold, and why; the
        volume's library checks the pack's size and SHA-256 as it reads."""
        offline = self.tiers.packs[OFFLINE]
        # The reader copies the whole pack off the volume at once: its
        # bytes are counted against the rate before.
        self._take(pack.size)
        report.bytes_read += pack.size
        try:
            with offline.reader(
                pack.location, pack.pack_id, pack.size, pack.sha256, self.tiers.keys
            ) as reader:
                result = reader.read_all()
        except VolumeNotReachable:
            return None  # taken out meanwhile
        except SpoolError as exc:
            # The local disk refused the pack's copy: the pack is not to
            # blame, and is read another time.
            logger.error("pack %s not checked: %s", pack.pack_id, exc)
            return None
        except ApplianceError as exc:
            return set(held), f"cannot be read: {exc}", set()
        self._volume_checked(pack)
        return (*_damaged_in(result, held), set())

    def _reachable(self, pack: PackRecord) -> bool:
        """Whether the pack's volume is loaded; if not, the pack waits for
        it, and a volume overdue for its check is asked for."""
        offline = self.tiers.packs[OFFLINE]
        volume = offline.volume_of(pack.location) or ""
        if offline.is_reachable(pack.location):
            self.state.waiting.pop(pack.pack_id, None)
            return True
        self.state.waiting[pack.pack_id] = volume
        last = max(self.state.volumes.get(volume, 0.0), pack.verified)
        if time.time() - last >= self.overdue:
            requests.request_volume(
                self.catalog, volume, "the scrub: the volume is overdue for its check"
            )
        return False

    def _check_loaded_since(self, report: PassReport) -> None:
        """Packs skipped because their volume was out, whose volume has
        been loaded since (for whatever reason): checked now."""
        offline = self.tiers.packs[OFFLINE]
        for pack_id, volume in sorted(self.state.waiting.items()):
            if offline.is_reachable(f"{volume}/0"):
                self._check(OFFLINE, pack_id, report)
                self.state.waiting.pop(pack_id, None)

    def _volume_checked(self, pack: PackRecord) -> None:
        volume = self.tiers.packs[OFFLINE].volume_of(pack.location)
        if volume:
            self.state.volumes[volume] = time.time()

    # -- shared ---------------------------------------------------------------

    def _take(self, n_bytes: int) -> None:
        """Wait until ``n_bytes`` may be read under the rate."""
        if self.limiter is None:
            return
        while n_bytes > 0:
            step = min(n_bytes, _CHUNK)
            self.limiter.acquire(step)
            n_bytes -= step

    def _hash(self, path: Path, report: PassReport) -> tuple[int, str]:
        """Size and SHA-256 of a file, read within the rate."""
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                if self.limiter is not None:
                    self.limiter.acquire(len(chunk))
                digest.update(chunk)
                size += len(chunk)
                report.bytes_read += len(chunk)
        return size, digest.hexdigest()

    def _count_again(self, record: InstanceRecord, copy: Copy) -> None:
        """A copy marked bad (by a recall that failed to read it, or an
        earlier pass) that reads good now counts again, unless another
        verified copy on its tier took its place."""
        if record.copy_on(copy.tier) is not None:
            return
        uid = record.sop_instance_uid
        if copies.set_copy_verified(self.catalog, uid, copy.tier, copy.location, True):
            logger.info(
                "%s copy of instance %s reads good again: counted as verified",
                copy.tier,
                uid,
            )
            self._note_if_lost(uid, "")

    def _note_if_lost(self, uid: str, problem: str) -> None:
        """List (or stop listing) an instance with no verified copy left."""
        with self.catalog.read() as txn:
            record = self.catalog.instance(txn, uid)
        if record is None or any(c.verified for c in record.copies):
            self.state.lost.pop(uid, None)
            return
        if uid not in self.state.lost:
            audit.study_copies_changed(
                self.tiers.audit,
                "copies-lost",
                self.catalog,
                record.study_uid,
                codes.READ,
                f"instance {uid} has no good copy left ({problem})",
                codes.SERIOUS_FAILURE,
            )
        self.state.lost[uid] = problem
        logger.error(
            "instance %s of study %s has no good copy left (%s); kept in the "
            "catalog, nothing deleted",
            uid,
            record.study_uid,
            problem,
        )

    def _save_now_and_then(self) -> None:
        if time.monotonic() - self._saved >= _SAVE_EVERY:
            state.save(self.folder, self.state)
            self._saved = time.monotonic()

    def _log(self, report: PassReport) -> None:
        level = logging.WARNING if report.bad > report.repaired else logging.INFO
        logger.log(
            level,
            "scrub of %s: %d copies checked (%d bytes), %d bad, %d repaired%s",
            report.tier,
            report.checked,
            report.bytes_read,
            report.bad,
            report.repaired,
            "; pass complete" if report.finished else "",
        )


def _keys_after(catalog: Catalog, database: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` keys of a catalog database after ``after``, in order."""
    start = after.encode("utf-8", "surrogateescape")
    found: list[str] = []
    with catalog.read() as txn:
        cursor = txn.cursor(db=catalog.db[database])
        if not cursor.set_range(start):
            return found
        for key in cursor.iternext(keys=True, values=False):
            raw = bytes(key)
            if after and raw == start:
                continue
            found.append(raw.decode("utf-8", "surrogateescape"))
            if len(found) >= limit:
                break
    return found


def _damaged_in(
    result: VerifyReport, held: dict[str, InstanceRecord]
) -> tuple[set[str], str]:
    """The held instances a pack read whole fails to give as the catalog
    counts them, and why."""
    if result.manifest is None or result.problems:
        return set(held), "; ".join(result.problems) or "no manifest"
    bad = {c.sop_instance_uid for c in result.bad if c.sop_instance_uid in held}
    listed = {e.sop_instance_uid: e.meta.sha256 for e in result.manifest.instances}
    bad |= {uid for uid, r in held.items() if listed.get(uid) != r.sha256}
    return bad, "instances damaged or differing from the catalog"


def _instance(catalog: Catalog, key: str) -> InstanceRecord | None:
    with catalog.read() as txn:
        return catalog.instance(txn, key)


def _pack(catalog: Catalog, pack_id: str) -> PackRecord | None:
    with catalog.read() as txn:
        data = catalog.get(txn, "packs", pack_id)
    return PackRecord.from_json(data) if data is not None else None


def _held(catalog: Catalog, pack: PackRecord) -> dict[str, InstanceRecord]:
    """The instances that still have a copy (verified or not) in the pack."""
    held = {}
    prefix = pack.pack_id + "/"
    with catalog.read() as txn:
        for uid in pack.members:
            record = catalog.instance(txn, uid)
            if record is not None and any(
                c.location.startswith(prefix) for c in record.copies
            ):
                held[uid] = record
    return held


def _copy_in(record: InstanceRecord, pack: PackRecord) -> Copy | None:
    prefix = pack.pack_id + "/"
    return next((c for c in record.copies if c.location.startswith(prefix)), None)


def _still_there(catalog: Catalog, record: InstanceRecord, copy: Copy) -> bool:
    with catalog.read() as txn:
        now = catalog.instance(txn, record.sop_instance_uid)
    return now is not None and any(
        (c.tier, c.location) == (copy.tier, copy.location) for c in now.copies
    )
