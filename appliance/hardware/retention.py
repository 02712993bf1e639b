"""How long studies stay on each tier under the migration rules, in days.

Derived from the rules' time conditions (``study_age_days``,
``days_since_received``, ``days_since_access``) for a typical study: one
received on its StudyDate and not retrieved afterwards, so that all three
measures equal the days since receipt. A rule acts on the first day on
which all its lower bounds hold (and none of its upper bounds has passed).

A tier's studies *arrive* with the earliest copy or move to it, and *leave*
with the earliest release or move from it that applies to every study,
but no earlier than ``min_copies`` other copies exist (the mirror counts,
from day 0, when replication is on). Rules that apply to some studies only
(modalities, calling AE titles, study size) cannot be weighed without the
mix of studies: for leaving, the longest of them is assumed, so that the
sizing errs on the large side. Every assumption is written in ``notes``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.hsm.policy import AnyOf, Between, Rule

logger = logging.getLogger(__name__)

TIME_MEASURES = ("study_age_days", "days_since_received", "days_since_access")
LOWER_TIERS = ("nearline", "offline")
SOURCES = ("online", "nearline")


@dataclass(frozen=True)
class Stay:
    """Days after receipt when studies arrive on and leave a tier; None
    when they never arrive (no rule copies there) or never leave."""

    tier: str
    arrives: int | None
    leaves: int | None = None

    def holds_on(self, day: int) -> bool:
        """Whether the tier holds a copy of the study on ``day``."""
        if self.arrives is None or self.arrives > day:
            return False
        return self.leaves is None or self.leaves > day


@dataclass(frozen=True)
class Retention:
    """The stays on online, nearline, offline and offsite, and the notes
    that say how each was derived."""

    stays: dict[str, Stay]
    notes: tuple[str, ...]


def rule_day(rule: Rule) -> int | None:
    """The first day after receipt on which ``rule`` matches a typical
    study, or None if it never does (upper bounds below lower ones)."""
    low = 0.0
    high = math.inf
    for condition in rule.conditions:
        if isinstance(condition, Between) and condition.measure in TIME_MEASURES:
            low = max(low, condition.at_least or 0)
            if condition.at_most is not None:
                high = min(high, condition.at_most)
    day = math.ceil(low)
    return None if day > high else day


def applies_to_all(rule: Rule) -> bool:
    """Whether the rule's conditions are about time only."""
    return not any(
        isinstance(c, AnyOf) or c.measure not in TIME_MEASURES for c in rule.conditions
    )


def derive(rules: Sequence[Rule], min_copies: int, mirror: bool) -> Retention:
    """Each tier's stay under ``rules``, with the notes that explain it."""
    notes: list[str] = []
    stays = {
        "online": Stay("online", 0),
        "offsite": Stay("offsite", 0 if mirror else None),
    }
    if not mirror:
        notes.append("offsite: replication is off, the mirror holds no copy")
    for tier in LOWER_TIERS:
        stays[tier] = Stay(tier, _arrival(rules, tier, notes))
    for tier in SOURCES:
        stays[tier] = _departure(rules, stays, tier, min_copies, notes)
    return Retention(stays, tuple(notes))


def _arrival(rules: Sequence[Rule], tier: str, notes: list[str]) -> int | None:
    timed = [
        (day, rule)
        for rule in rules
        if rule.action in ("copy", "move") and rule.target == tier
        for day in [rule_day(rule)]
        if day is not None
    ]
    if not timed:
        notes.append(f"{tier}: no rule copies or moves studies there")
        return None
    day, first = min(timed, key=lambda pair: pair[0])
    notes.append(f"{tier}: studies arrive after {day} day(s) ({_describe(first)})")
    if not any(applies_to_all(rule) for _day, rule in timed):
        notes.append(
            f"{tier}: the rules that copy there apply to some studies only; "
            "sized as if every study went there"
        )
    return day


def _departure(
    rules: Sequence[Rule],
    stays: dict[str, Stay],
    tier: str,
    min_copies: int,
    notes: list[str],
) -> Stay:
    arrives = stays[tier].arrives
    if arrives is None:
        return stays[tier]
    chosen = _leaving_rule(rules, tier, notes)
    if chosen is None:
        return stays[tier]
    day, rule = chosen
    others = [stay for name, stay in stays.items() if name != tier]
    gated = _first_day_with_copies(max(day, arrives), others, max(min_copies, 1))
    if gated is None:
        notes.append(
            f"{tier}: rule {rule.name} never releases anything: fewer than "
            f"min_copies ({min_copies}) other copies are ever made"
        )
        return stays[tier]
    if gated > day:
        notes.append(
            f"{tier}: rule {rule.name} waits until day {gated}, when "
            f"min_copies ({min_copies}) other verified copies exist"
        )
    return Stay(tier, arrives, gated)


def _leaving_rule(
    rules: Sequence[Rule], tier: str, notes: list[str]
) -> tuple[int, Rule] | None:
    timed = [
        (day, rule)
        for rule in rules
        if rule.action in ("release", "move") and rule.source == tier
        for day in [rule_day(rule)]
        if day is not None
    ]
    general = [(day, rule) for day, rule in timed if applies_to_all(rule)]
    if general:
        day, rule = min(general, key=lambda pair: pair[0])
        notes.append(f"{tier}: studies leave after {day} day(s) ({_describe(rule)})")
        return day, rule
    if timed:
        day, rule = max(timed, key=lambda pair: pair[0])
        names = ", ".join(sorted(r.name for _d, r in timed))
        notes.append(
            f"{tier}: only rules for some studies release it ({names}); sized "
            f"for the longest stay, {day} day(s) ({_describe(rule)})"
        )
        return day, rule
    notes.append(
        f"{tier}: no rule releases it: sized to hold every study; its "
        "watermarks release the least recently used ones when it fills"
    )
    return None


def _first_day_with_copies(start: int, others: list[Stay], needed: int) -> int | None:
    candidates = {start} | {stay.arrives for stay in others if stay.arrives is not None}
    for day in sorted(d for d in candidates if d >= start):
        if sum(stay.holds_on(day) for stay in others) >= needed:
            return day
    return None


def _describe(rule: Rule) -> str:
    bounds = []
    for condition in rule.conditions:
        if isinstance(condition, Between):
            if condition.at_least is not None:
                bounds.append(f"min_{condition.measure} {condition.at_least:g}")
            if condition.at_most is not None:
                bounds.append(f"max_{condition.measure} {condition.at_most:g}")
        else:
            prefix = "exclude_" if condition.exclude else ""
            bounds.append(f"{prefix}{condition.attribute}")
    return f"rule {rule.name}: " + (", ".join(bounds) or "no conditions")
