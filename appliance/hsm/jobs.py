"""A migration run: gather where every study is, plan, and carry it out.

The same plan serves ``appliance migrate --dry-run`` (print it), ``--now``
and the nightly run of the service (carry it out). Watermark releases are
planned after the rules, from the usage each tier would have then, so
that a night's copies make room the same night.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime

from appliance.catalog import copies, pins
from appliance.catalog.copies import StudyCopies
from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.hsm import policy
from appliance.hsm.migrator import Migrator, Outcome
from appliance.hsm.policy import Decision, StudyFacts
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import Tiers
from appliance.storage.offline import OfflineTier

logger = logging.getLogger(__name__)

# Tiers whose usage is held to their watermarks.
WATERMARKED = ("online", "nearline")

# Called after each decision with (decisions done, decisions in all).
Progress = Callable[[int, int], None]


@dataclass
class Usage:
    """How full a tier is, against the capacity its watermarks refer to."""

    tier: str
    used: int
    capacity: int
    high: float
    low: float

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.capacity if self.capacity else 0.0


@dataclass
class Plan:
    """What a run would do, and what it could not plan for."""

    decisions: list[Decision]
    usage: list[Usage]
    warnings: list[str] = field(default_factory=list)

    @property
    def actions(self) -> list[Decision]:
        """The decisions that do something (not the holds)."""
        return [d for d in self.decisions if d.action != "hold"]


class MigrationJob:
    """Plans and runs migrations by the configured rules and watermarks."""

    def __init__(self, catalog: Catalog, tiers: Tiers, config: Config) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.config = config
        self.min_copies: int = config.get("migration.min_copies")
        self.migrator = Migrator(catalog, tiers, self.min_copies)
        self.recaller = Recaller(catalog, tiers)

    def plan(self, now: datetime | None = None, watermarks_only: bool = False) -> Plan:
        """The decisions of the rules (unless ``watermarks_only``), then the
        watermark releases of every watermarked tier."""
        now = now or datetime.now(UTC)
        held = pins.pinned(self.catalog, now.timestamp())
        facts = [
            self._facts(study, held.get(study.study_uid, ""))
            for study in copies.all_study_copies(self.catalog)
        ]
        decisions = []
        if not watermarks_only:
            decisions = policy.plan(
                self.config.rules, facts, now, min_copies=self.min_copies
            )

        result = Plan(decisions, [])
        for tier in WATERMARKED:
            usage = self.usage(tier)
            if usage is None:
                continue
            result.usage.append(usage)
            released = policy.release_for_watermark(
                tier,
                usage.used - _freed(facts, decisions, tier),
                usage.capacity,
                usage.high,
                usage.low,
                _after(facts, decisions),
                self.min_copies,
            )
            result.decisions += released.decisions
            if released.warning:
                result.warnings.append(released.warning)
        return result

    def run(
        self,
        plan: Plan,
        progress: Progress | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> list[Outcome]:
        """Carry out the plan's decisions study by study, within the I/O
        rate, until done or ``stopping()`` (asked before each study)."""
        outcomes: list[Outcome] = []
        throttle = _Throttle(self.config.get("migration.rate_mb_per_s"))
        actions = plan.actions
        done = 0
        for decisions in _by_study(actions):
            if stopping():
                break
            results = self._carry_out(decisions)
            outcomes += results
            throttle.spent(sum(o.bytes for o in results))
            done += len(decisions)
            if progress is not None:
                progress(done, len(actions))
        failed = [o for o in outcomes if not o.ok]
        logger.info(
            "migration run: %d decisions, %d steps, %d failed",
            len(actions),
            len(outcomes),
            len(failed),
        )
        return outcomes

    def usage(self, tier: str) -> Usage | None:
        """The usage of a watermarked tier, or None when it is not set up."""
        if tier != "online" and tier not in self.tiers.packs:
            return None
        return tier_usage(self.config, self.catalog.counts(), tier)

    # -- the steps --------------------------------------------------------------

    def _carry_out(self, decisions: list[Decision]) -> list[Outcome]:
        """One study's decisions: first every copy (a move's too), then
        every release, each in plan order.

        Packs are made from the study's online files. Copied after an
        earlier rule's release of online, the study would have to be
        recalled online again, against the rule that a tier an earlier rule
        releases is not written back in the same run.
        """
        for decision in decisions:
            logger.info("migration: %s", decision)
        copied: dict[int, Outcome] = {}
        for index, decision in enumerate(decisions):
            if decision.action in ("copy", "move") and decision.target:
                copied[index] = self._copy(decision.study_uid, decision.target)

        released = []
        for index, decision in enumerate(decisions):
            move_copied = decision.action == "move" and copied[index].ok
            if decision.action == "release" or move_copied:
                released.append(
                    self.migrator.release(decision.study_uid, decision.source)
                )
        return [*copied.values(), *released]

    def _copy(self, study: str, target: str) -> Outcome:
        if self.recaller.needs_recall(study):
            # Packs are made from online copies; a study released from
            # online is staged again first (a cache the watermarks release).
            # Not for a copy that cannot be written anyway: the recall would
            # be repeated, and released again, at every run until it can.
            tier = self.tiers.pack_tier(target)
            if isinstance(tier, OfflineTier) and not tier.takes_packs():
                problem = "no volume can take packs; label or load a volume"
                logger.error("copying study %s to %s: %s", study, target, problem)
                return Outcome(study, "copy", target, problem=problem)
            self.recaller.recall(study)
        return self.migrator.copy(study, target)

    def _facts(self, study: StudyCopies, pinned_online: str = "") -> StudyFacts:
        tier_bytes: dict[str, int] = {}
        if any(tier in study.copies for tier in self.tiers.packs):
            for pack in copies.packs_of(self.catalog, study.study_uid):
                tier_bytes[pack.tier] = tier_bytes.get(pack.tier, 0) + pack.size
        return StudyFacts(
            study_uid=study.study_uid,
            instances=study.instances,
            size_bytes=study.size,
            received=datetime.fromtimestamp(study.received, UTC),
            study_date=_date(study.attributes.get("StudyDate")),
            last_access=datetime.fromtimestamp(study.last_access, UTC),
            modalities=frozenset(study.modalities),
            calling_ae_titles=frozenset(study.calling_aes),
            verified=dict(study.copies),
            tier_bytes=tier_bytes,
            pinned_online=pinned_online,
        )


def _by_study(decisions: list[Decision]) -> Iterator[list[Decision]]:
    """The decisions in runs of the same study, in plan order (the rules'
    decisions come study by study; watermark releases come after them)."""
    run: list[Decision] = []
    for decision in decisions:
        if run and decision.study_uid != run[0].study_uid:
            yield run
            run = []
        run.append(decision)
    if run:
        yield run


def tier_usage(config: Config, counts: dict[str, int], tier: str) -> Usage | None:
    """How full a watermarked tier is; None for tiers without watermarks.

    With ``capacity_bytes`` set, usage is what the archive keeps there (from
    the catalog's ``counts``); with 0, the tier's whole file system counts,
    other files included, against the room the appliance can ever fill (see
    :func:`fillable_bytes`), so that the percent is the one ``df`` shows.
    """
    if tier not in WATERMARKED:
        return None
    root = config.online_path if tier == "online" else config.nearline_path
    ours = counts.get("bytes.online" if tier == "online" else f"packbytes.{tier}", 0)
    capacity = config.get(f"{tier}.capacity_bytes")
    if capacity:
        used = ours
    else:
        disk = shutil.disk_usage(root)
        capacity, used = fillable_bytes(disk.used, disk.free), disk.used
    return Usage(
        tier,
        used,
        capacity,
        config.get(f"{tier}.high_watermark"),
        config.get(f"{tier}.low_watermark"),
    )


def fillable_bytes(used: int, free: int) -> int:
    """The size of a file system as an unprivileged process sees it.

    A file system's total includes the blocks reserved for root (5% by
    default on ext4), which the appliance, not running as root, can never
    fill: measured against the total, usage stops short of 100% and a high
    watermark near the top may never be crossed. ``free`` (what
    ``shutil.disk_usage`` reports) is the room left to unprivileged users,
    so used + free is what they can fill, as ``df`` counts its Use%.
    """
    return used + free


def above_high_watermark(config: Config, counts: dict[str, int]) -> list[str]:
    """The watermarked tiers whose usage is above their high watermark."""
    above = []
    for tier in WATERMARKED:
        usage = tier_usage(config, counts, tier)
        if usage is not None and usage.used * 100 > usage.high * usage.capacity:
            above.append(tier)
    return above


def _freed(facts: list[StudyFacts], decisions: list[Decision], tier: str) -> int:
    """Bytes the planned moves and releases from ``tier`` will free."""
    sizes = {study.study_uid: study.bytes_on(tier) for study in facts}
    return sum(
        sizes.get(d.study_uid, 0)
        for d in decisions
        if d.action in ("move", "release") and d.source == tier
    )


def _after(facts: list[StudyFacts], decisions: list[Decision]) -> Iterable[StudyFacts]:
    """The studies as the planned decisions leave them: a study whose
    release is planned already is not released again for a watermark."""
    planned = {
        (d.study_uid, d.source) for d in decisions if d.action in ("move", "release")
    }
    for study in facts:
        verified = {
            tier: n
            for tier, n in study.verified.items()
            if (study.study_uid, tier) not in planned
        }
        # replace() keeps every other fact, the pin included.
        yield replace(study, verified=verified)


def _date(text: str | None) -> date | None:
    """A DA value (YYYYMMDD, or the old YYYY.MM.DD) as a date, if valid."""
    digits = (text or "").replace(".", "")[:8]
    try:
        return datetime.strptime(digits, "%Y%m%d").date()
    except ValueError:
        return None


class _Throttle:
    """Sleeps so that bytes moved stay under ``mb_per_s`` on average."""

    def __init__(self, mb_per_s: float) -> None:
        self.bytes_per_s = mb_per_s * 1_000_000
        self.started = time.monotonic()
        self.total = 0

    def spent(self, count: int) -> None:
        if not self.bytes_per_s:
            return
        self.total += count
        ahead = self.total / self.bytes_per_s - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
