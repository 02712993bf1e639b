"""Migration policy: which studies to copy, move or release, decided from facts.

Pure decisions, no I/O and no catalog: the caller gathers one StudyFacts per
study, and the functions here answer with Decisions that the migrator
carries out and that ``appliance migrate --dry-run`` prints. The rule
language, the order of evaluation and the defaults are described in
docs/policies.md.

Words used here: a study is *on* a tier when every one of its instances has
a verified copy there (DESIGN.md, rule 2). A *release* deletes the study's
copies on one tier, and only may_release can allow it (DESIGN.md, rule 3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Literal

logger = logging.getLogger(__name__)

RuleAction = Literal["copy", "move", "release"]
Action = Literal["copy", "move", "release", "hold"]
Measure = Literal[
    "study_age_days", "days_since_received", "days_since_access", "study_size_mb"
]
ListAttribute = Literal["modalities", "calling_ae_titles"]

# Fastest first: a copy reads from the first of these the study is on.
TIERS = ("online", "nearline", "offline", "offsite")
COPY_TARGETS = ("nearline", "offline")
RELEASE_SOURCES = ("online", "nearline")
RULE_ACTIONS = ("copy", "move", "release")
# action -> (needs a source tier, needs a target tier)
ACTION_TIERS = {"copy": (False, True), "move": (True, True), "release": (True, False)}

MEASURES: tuple[Measure, ...] = (
    "study_age_days",
    "days_since_received",
    "days_since_access",
    "study_size_mb",
)
LIST_ATTRIBUTES: tuple[ListAttribute, ...] = ("modalities", "calling_ae_titles")

SECONDS_PER_DAY = 86400
BYTES_PER_MB = 1_000_000


@dataclass(frozen=True)
class StudyFacts:
    """What the policy needs to know about one study, gathered by the caller.

    ``verified`` maps a tier to how many of the study's instances have a
    verified copy there; unverified copies are left out. ``tier_bytes`` maps
    a tier to the bytes the study takes there when known (packs are
    compressed); ``size_bytes`` stands in otherwise. ``received`` is when the
    newest instance arrived and ``last_access`` the last retrieval (None if
    never). Datetimes must all be aware, or all naive, like ``now``.
    """

    study_uid: str
    instances: int
    size_bytes: int
    received: datetime
    study_date: date | None = None
    last_access: datetime | None = None
    modalities: frozenset[str] = frozenset()
    calling_ae_titles: frozenset[str] = frozenset()
    verified: dict[str, int] = field(default_factory=dict)
    tier_bytes: dict[str, int] = field(default_factory=dict)
    # Why the study must stay online now (a prior of an upcoming
    # appointment, say); "" when nothing holds it there.
    pinned_online: str = ""

    def is_on(self, tier: str) -> bool:
        """Whether every instance of the study has a verified copy on ``tier``."""
        return self.instances > 0 and self.verified.get(tier, 0) >= self.instances

    def tiers(self) -> tuple[str, ...]:
        """The tiers the study is on, fastest first."""
        known = [tier for tier in TIERS if self.is_on(tier)]
        others = sorted(t for t in self.verified if t not in TIERS and self.is_on(t))
        return (*known, *others)

    def bytes_on(self, tier: str) -> int:
        """The bytes the study takes on ``tier`` (what releasing it frees)."""
        return self.tier_bytes.get(tier, self.size_bytes)

    @property
    def last_touched(self) -> datetime:
        """The last retrieval, or the last receipt if that came later."""
        if self.last_access is None or self.last_access < self.received:
            return self.received
        return self.last_access


@dataclass(frozen=True)
class Decision:
    """One planned step for one study; the migrator carries them out in order.

    ``copy`` reads the study on ``source`` and writes it to ``target``.
    ``move`` does the same, then releases ``source``; the migrator asks
    may_release again once the new copy is verified. ``release`` deletes the
    study's copies on ``source``. ``hold`` is a release that may_release
    refused: nothing to do, listed so that a dry run says why a study stays.
    """

    rule: str
    study_uid: str
    action: Action
    source: str
    target: str | None
    size_bytes: int
    reason: str

    def __str__(self) -> str:
        tiers = (
            self.source if self.target is None else f"{self.source} -> {self.target}"
        )
        return (
            f"{self.action} {self.study_uid} {tiers} "
            f"({format_bytes(self.size_bytes)}): {self.reason}"
        )


# --- conditions ------------------------------------------------------------


def _study_age(facts: StudyFacts, now: datetime) -> tuple[float | None, str]:
    if facts.study_date is None:
        return None, "study age unknown (no StudyDate)"
    days = (now.date() - facts.study_date).days
    return days, f"study age {days} days"


def _days_since_received(facts: StudyFacts, now: datetime) -> tuple[float | None, str]:
    days = _whole_days(facts.received, now)
    return days, f"received {days} days ago"


def _days_since_access(facts: StudyFacts, now: datetime) -> tuple[float | None, str]:
    days = _whole_days(facts.last_touched, now)
    if facts.last_touched == facts.received:
        return days, f"not retrieved since receipt {days} days ago"
    return days, f"last access {days} days ago"


def _study_size(facts: StudyFacts, now: datetime) -> tuple[float | None, str]:
    megabytes = facts.size_bytes / BYTES_PER_MB
    return megabytes, f"size {megabytes:.1f} MB"


def _whole_days(since: datetime, now: datetime) -> int:
    # Whole days elapsed, so that "1 day" means 24 hours have passed.
    return math.floor((now - since).total_seconds() / SECONDS_PER_DAY)


_MEASURE_OF: dict[str, Callable[[StudyFacts, datetime], tuple[float | None, str]]] = {
    "study_age_days": _study_age,
    "days_since_received": _days_since_received,
    "days_since_access": _days_since_access,
    "study_size_mb": _study_size,
}


@dataclass(frozen=True)
class Between:
    """A numeric condition: the study's measure is within [at_least, at_most].

    Both bounds are inclusive and either may be None. A study whose measure
    is unknown (no StudyDate for ``study_age_days``) does not match.
    """

    measure: Measure
    at_least: float | None = None
    at_most: float | None = None

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, not {self.measure!r}")
        if self.at_least is None and self.at_most is None:
            raise ValueError("at_least or at_most must be given")
        low, high = self.at_least, self.at_most
        if low is not None and high is not None and low > high:
            raise ValueError(f"at_least ({low}) must not exceed at_most ({high})")

    def check(self, facts: StudyFacts, now: datetime) -> tuple[bool, str]:
        """Whether the study meets the condition, and the comparison in words."""
        value, described = _MEASURE_OF[self.measure](facts, now)
        if value is None:
            return False, described
        if self.at_least is not None and value < self.at_least:
            return False, f"{described} < {_number(self.at_least)}"
        if self.at_most is not None and value > self.at_most:
            return False, f"{described} > {_number(self.at_most)}"

        bounds = []
        if self.at_least is not None:
            bounds.append(f">= {_number(self.at_least)}")
        if self.at_most is not None:
            bounds.append(f"<= {_number(self.at_most)}")
        return True, f"{described} {' and '.join(bounds)}"


@dataclass(frozen=True)
class AnyOf:
    """A list condition: the study has at least one of ``values``.

    With ``exclude`` the condition is reversed: the study has none of them.
    A study with no recorded value matches only an exclude condition.
    """

    attribute: ListAttribute
    values: frozenset[str]
    exclude: bool = False

    def __post_init__(self) -> None:
        if self.attribute not in LIST_ATTRIBUTES:
            raise ValueError(f"attribute must be one of {LIST_ATTRIBUTES}")
        if not self.values:
            raise ValueError("values must not be empty")

    def check(self, facts: StudyFacts, now: datetime) -> tuple[bool, str]:
        """Whether the study meets the condition, and the comparison in words."""
        if self.attribute == "modalities":
            have, noun = facts.modalities, "modality"
        else:
            have, noun = facts.calling_ae_titles, "calling AE title"
        common = have & self.values
        listed = _listing(self.values)

        if self.exclude:
            if common:
                return False, f"{noun} {_listing(common)} excluded"
            return True, f"no {noun} of {listed}"
        if common:
            return True, f"{noun} {_listing(common)} in {listed}"
        if not have:
            return False, f"no {noun} recorded"
        return False, f"{noun} {_listing(have)} not in {listed}"


Condition = Between | AnyOf


@dataclass(frozen=True)
class Rule:
    """One policy rule: conditions that must all hold, and one action.

    ``copy`` writes the study to ``target``; ``move`` copies it to
    ``target`` and then releases ``source``; ``release`` releases
    ``source``. A rule without conditions matches every study.
    """

    name: str
    action: RuleAction
    source: str | None = None
    target: str | None = None
    conditions: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in ACTION_TIERS:
            raise ValueError(f"action must be one of {RULE_ACTIONS}")
        needs_source, needs_target = ACTION_TIERS[self.action]
        if needs_source != (self.source in RELEASE_SOURCES):
            raise ValueError(
                f"source must be one of {RELEASE_SOURCES} for a move or "
                "release, and None for a copy"
            )
        if needs_target != (self.target in COPY_TARGETS):
            raise ValueError(
                f"target must be one of {COPY_TARGETS} for a copy or "
                "move, and None for a release"
            )
        if self.source == self.target:
            raise ValueError("source and target must differ")

    def matches(self, facts: StudyFacts, now: datetime) -> bool:
        """Whether every condition of the rule holds for the study at ``now``."""
        return self.evaluate(facts, now)[0]

    def evaluate(self, facts: StudyFacts, now: datetime) -> tuple[bool, str]:
        """Whether the rule matches, and why (or why not) in words."""
        verdicts = [condition.check(facts, now) for condition in self.conditions]
        failed = [text for matched, text in verdicts if not matched]
        if failed:
            return False, "; ".join(failed)
        return True, ", ".join(text for _matched, text in verdicts) or "every study"


# --- the release safety rule -----------------------------------------------


def may_release(facts: StudyFacts, tier: str, min_copies: int) -> tuple[bool, str]:
    """Whether the study's copies on ``tier`` may be released, and why.

    The one safety rule for every release (DESIGN.md, rule 3): at least
    ``min_copies`` verified copies must remain on other tiers, and never
    fewer than one, so that the last verified copy is kept even when
    min_copies is set to 0.
    """
    _check_min_copies(min_copies)
    if not facts.is_on(tier):
        return False, f"not every instance has a verified copy on {tier}"
    if tier == "online" and facts.pinned_online:
        return False, facts.pinned_online

    others = [other for other in facts.tiers() if other != tier]
    if not others:
        return False, f"{tier} holds the last verified copy"

    counted = f"{_copies(len(others))} ({', '.join(others)}), min_copies {min_copies}"
    if len(others) < max(min_copies, 1):
        return False, f"only {counted}"
    return True, counted


def _copies(count: int) -> str:
    return f"{count} other verified {'copy' if count == 1 else 'copies'}"


def _check_min_copies(min_copies: int) -> None:
    if isinstance(min_copies, bool) or not isinstance(min_copies, int):
        raise TypeError("min_copies must be an integer")
    if min_copies < 0:
        raise ValueError(f"min_copies must be 0 or more, not {min_copies}")


# --- planning --------------------------------------------------------------


def plan(
    rules: Sequence[Rule],
    studies: Iterable[StudyFacts],
    now: datetime,
    *,
    min_copies: int,
) -> list[Decision]:
    """Every decision the rules make for the studies at ``now``.

    Studies are taken in the order given and, for each, the rules in their
    order. Every matching rule applies, except when what it asks is already
    done or already planned by an earlier rule. A release is judged by
    may_release on the copies that remain after the releases planned before
    it; copies planned but not yet made never count, except the new copy of
    a move, which the migrator verifies before it releases.
    """
    _check_min_copies(min_copies)
    decisions: list[Decision] = []
    count = 0
    for facts in studies:
        decisions += _plan_study(rules, facts, now, min_copies)
        count += 1
    logger.debug("planned %d decision(s) for %d study(ies)", len(decisions), count)
    return decisions


@dataclass
class _Projection:
    """A study's tiers as the decisions planned so far will leave them."""

    facts: StudyFacts
    on: list[str]
    planned: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)

    def as_facts(self, extra: str | None = None) -> StudyFacts:
        """The study's facts with only the remaining (and ``extra``) tiers."""
        tiers = [*self.on, extra] if extra else self.on
        return replace(self.facts, verified=dict.fromkeys(tiers, self.facts.instances))

    def apply(self, decision: Decision) -> None:
        if decision.action in ("copy", "move") and decision.target:
            self.planned.add(decision.target)
        if decision.action in ("move", "release"):
            self.on.remove(decision.source)
            self.released.add(decision.source)


def _plan_study(
    rules: Sequence[Rule], facts: StudyFacts, now: datetime, min_copies: int
) -> list[Decision]:
    projection = _Projection(facts, list(facts.tiers()))
    decisions = []
    for rule in rules:
        matched, why = rule.evaluate(facts, now)
        if not matched:
            continue

        decide = _DECIDE[rule.action]
        decision = decide(rule, projection, f"rule {rule.name}: {why}", min_copies)
        if decision is not None:
            projection.apply(decision)
            decisions.append(decision)
    return decisions


def _decide_copy(
    rule: Rule, state: _Projection, reason: str, min_copies: int
) -> Decision | None:
    target = rule.target
    assert target is not None  # Rule.__post_init__ requires it for a copy
    # Nothing to do when the study is there or on its way, or nothing whole
    # exists to read it from. A tier an earlier rule releases is not written
    # back: of two rules that contradict each other, the earlier one wins.
    if target in state.on or target in state.planned or target in state.released:
        return None
    # A study's copies are made before its releases, so the copy reads the
    # study where it is now, even from a tier an earlier rule releases.
    readable = state.facts.tiers()
    if not readable:
        return None
    return _decision(rule, state, "copy", readable[0], target, reason)


def _decide_release(
    rule: Rule, state: _Projection, reason: str, min_copies: int
) -> Decision | None:
    source = rule.source
    assert source is not None  # Rule.__post_init__ requires it for a release
    if source not in state.on:
        return None

    allowed, why = may_release(state.as_facts(), source, min_copies)
    action: Action = "release" if allowed else "hold"
    return _decision(rule, state, action, source, None, f"{reason}; {why}")


def _decide_move(
    rule: Rule, state: _Projection, reason: str, min_copies: int
) -> Decision | None:
    source, target = rule.source, rule.target
    assert source is not None and target is not None  # required for a move
    if source not in state.on or target in state.released:
        return None
    if target in state.on:
        return _decide_release(
            rule, state, f"{reason}; already on {target}", min_copies
        )

    allowed, why = may_release(state.as_facts(extra=target), source, min_copies)
    if allowed:
        return _decision(
            rule, state, "move", source, target, f"{reason}; after the copy {why}"
        )
    held = f"{reason}; release from {source} held, even after the copy: {why}"
    if target in state.planned:
        return _decision(rule, state, "hold", source, None, held)
    return _decision(rule, state, "copy", source, target, f"copy only: {held}")


_DECIDE = {"copy": _decide_copy, "move": _decide_move, "release": _decide_release}


def _decision(
    rule: Rule,
    state: _Projection,
    action: Action,
    source: str,
    target: str | None,
    reason: str,
) -> Decision:
    facts = state.facts
    size = facts.bytes_on(source)
    return Decision(rule.name, facts.study_uid, action, source, target, size, reason)


# --- watermarks ------------------------------------------------------------


@dataclass(frozen=True)
class WatermarkResult:
    """The releases that bring a tier under its low watermark, and a warning
    for the log when the releasable studies are not enough."""

    tier: str
    decisions: tuple[Decision, ...]
    used_bytes: int
    projected_bytes: int
    warning: str | None = None


def release_for_watermark(
    tier: str,
    used_bytes: int,
    capacity_bytes: int,
    high: float,
    low: float,
    studies: Iterable[StudyFacts],
    min_copies: int,
) -> WatermarkResult:
    """Releases from ``tier`` when its usage is above the ``high`` watermark.

    ``high`` and ``low`` are percentages of ``capacity_bytes``. Usage at a
    mark is not above it. Above ``high``, the least recently touched studies
    that may_release allows are released until the projected usage is at or
    below ``low``; ties go to the earlier receipt, then the lower study UID.
    """
    _check_marks(used_bytes, capacity_bytes, high, low)
    _check_min_copies(min_copies)
    if used_bytes * 100 <= high * capacity_bytes:
        return WatermarkResult(tier, (), used_bytes, used_bytes)

    on_tier = [facts for facts in studies if facts.is_on(tier)]
    releasable = [f for f in on_tier if may_release(f, tier, min_copies)[0]]
    releasable.sort(key=lambda f: (f.last_touched, f.received, f.study_uid))
    goal = low * capacity_bytes / 100
    heading = (
        f"{tier} above its high watermark "
        f"({_percent(used_bytes, capacity_bytes)} used > {_number(high)}%)"
    )

    decisions: list[Decision] = []
    projected = used_bytes
    for facts in releasable:
        if projected <= goal:
            break
        decisions.append(_watermark_release(facts, tier, heading, min_copies))
        projected -= facts.bytes_on(tier)

    warning = None
    if projected > goal:
        held = len(on_tier) - len(releasable)
        warning = _shortfall(tier, decisions, projected, capacity_bytes, low, held)
    return WatermarkResult(tier, tuple(decisions), used_bytes, projected, warning)


def _watermark_release(
    facts: StudyFacts, tier: str, heading: str, min_copies: int
) -> Decision:
    _allowed, why = may_release(facts, tier, min_copies)
    touched = facts.last_touched.date().isoformat()
    reason = f"{heading}: least recently used, last touched {touched}; {why}"
    size = facts.bytes_on(tier)
    rule = f"{tier}-watermark"
    return Decision(rule, facts.study_uid, "release", tier, None, size, reason)


def _shortfall(
    tier: str,
    decisions: list[Decision],
    projected: int,
    capacity: int,
    low: float,
    held: int,
) -> str:
    return (
        f"{tier} stays above its low watermark {_number(low)}%: releasing all "
        f"{len(decisions)} releasable studies leaves {_percent(projected, capacity)}"
        f" used; {held} other studies on {tier} lack the other verified copies "
        "that min_copies asks for"
    )


def _check_marks(used: int, capacity: int, high: float, low: float) -> None:
    if capacity <= 0:
        raise ValueError(
            "capacity_bytes must be greater than 0 (resolve 0 to the file "
            "system's size before calling)"
        )
    if used < 0:
        raise ValueError(f"used_bytes must be 0 or more, not {used}")
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low {low}, high {high}")


# --- wording ---------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:g}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


def _listing(values: Iterable[str]) -> str:
    return "[" + ", ".join(sorted(values)) + "]"


def format_bytes(count: int) -> str:
    """A byte count in decimal units (MB = 1,000,000 bytes), as in the config."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"
