"""Which prior studies an appointment needs: the rules and the choice.

Pure: no catalog, no clock. The configuration gives the defaults
(``prefetch.priors``, ``prefetch.max_prior_years``, ``prefetch.match``),
``[[prior_rules]]`` that override them per modality or procedure (the
first rule that names the appointment's modality or procedure code wins),
and a ``[[procedures]]`` site table that maps the RIS's procedure codes to a
modality and a body part, for messages that carry only a code (SIU).

``match`` says what makes a study a prior of the appointment:

- ``modality``: it has a series of the appointment's modality;
- ``body_part``: it has a series of the appointment's body part;
- ``modality_and_body_part``: both;
- ``any``: every earlier study of the patient.

A criterion the appointment cannot tell (no modality known, no body part in
the site table) is left out rather than matching nothing: the radiologist
is better served by the patient's latest studies than by none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.toml_text import shown

MATCHES = ("modality", "body_part", "modality_and_body_part", "any")
SECONDS_PER_YEAR = 365.25 * 86400


@dataclass(frozen=True)
class PriorRule:
    """How many priors, how old at most, and how they must match."""

    priors: int
    max_prior_years: float
    match: str
    modalities: frozenset[str] = frozenset()
    procedure_codes: frozenset[str] = frozenset()

    def applies(self, modality: str, procedure_code: str) -> bool:
        return modality in self.modalities or procedure_code in self.procedure_codes


@dataclass(frozen=True)
class Procedure:
    """One line of the site's procedure table."""

    code: str
    modality: str = ""
    body_part: str = ""


@dataclass(frozen=True)
class Candidate:
    """An earlier study of the patient, as the choice needs it."""

    study_uid: str
    when: float  # StudyDate and StudyTime, else when it was received
    modalities: frozenset[str]
    body_parts: frozenset[str]


@dataclass(frozen=True)
class Wanted:
    """What the appointment is, as far as the choice goes."""

    start: float
    modality: str
    body_part: str
    rule: PriorRule


def wanted(
    start: float,
    modality: str,
    procedure_code: str,
    default: PriorRule,
    rules: Iterable[PriorRule],
    procedures: Mapping[str, Procedure],
) -> Wanted:
    """The appointment's modality and body part (from the message, else the
    site table) and the rule that applies to it."""
    known = procedures.get(procedure_code)
    modality = (modality or (known.modality if known else "")).upper()
    body_part = (known.body_part if known else "").upper()
    rule = next((r for r in rules if r.applies(modality, procedure_code)), default)
    return Wanted(start, modality, body_part, rule)


def choose(appointment: Wanted, candidates: Iterable[Candidate]) -> list[str]:
    """The study UIDs of the priors, newest first."""
    rule = appointment.rule
    oldest = appointment.start - rule.max_prior_years * SECONDS_PER_YEAR
    fitting = [
        c
        for c in candidates
        if oldest <= c.when < appointment.start and _matches(appointment, c)
    ]
    fitting.sort(key=lambda c: (-c.when, c.study_uid))
    return [c.study_uid for c in fitting[: rule.priors]]


def _matches(appointment: Wanted, candidate: Candidate) -> bool:
    match = appointment.rule.match
    same_modality = (
        not appointment.modality or appointment.modality in candidate.modalities
    )
    same_part = (
        not appointment.body_part or appointment.body_part in candidate.body_parts
    )
    if match == "modality":
        return same_modality
    if match == "body_part":
        return same_part
    if match == "modality_and_body_part":
        return same_modality and same_part
    return True


# --- the configuration's tables --------------------------------------------

RULE_KEYS = {
    "modalities": "Appointment modalities the rule is for.",
    "procedure_codes": "Procedure codes the rule is for.",
    "priors": "How many priors.",
    "max_prior_years": "How old a prior may be, in years.",
    "match": "modality, body_part, modality_and_body_part or any.",
}
PROCEDURE_KEYS = {
    "code": "The RIS's procedure code (AIS-3, OBR-4 or OBR-44).",
    "modality": "The modality it is performed on.",
    "body_part": "The body part, as in BodyPartExamined.",
}

Problems = list[tuple[str, str]]


def parse_rules(raw: Any, default: PriorRule) -> tuple[tuple[PriorRule, ...], Problems]:
    """``[[prior_rules]]``: each names modalities or procedure codes, and
    what differs from the defaults."""
    tables, problems = _tables(raw, "prior_rules", RULE_KEYS)
    rules = []
    for where, entry in tables:
        found = _rule(where, entry, default, problems)
        if found is not None:
            rules.append(found)
    return tuple(rules), problems


def _rule(
    where: str, entry: dict[str, Any], default: PriorRule, problems: Problems
) -> PriorRule | None:
    before = len(problems)
    modalities = _names(where, entry, "modalities", problems)
    codes = _names(where, entry, "procedure_codes", problems)
    if not modalities and not codes and len(problems) == before:
        problems.append((where, "must name modalities or procedure_codes"))
    priors = entry.get("priors", default.priors)
    if not isinstance(priors, int) or isinstance(priors, bool) or not 0 <= priors <= 50:
        problems.append((f"{where}.priors", f"must be 0 to 50 (got {shown(priors)})"))
    years = entry.get("max_prior_years", default.max_prior_years)
    if isinstance(years, bool) or not isinstance(years, int | float) or years <= 0:
        problems.append(
            (f"{where}.max_prior_years", f"must be above 0 (got {shown(years)})")
        )
    match = entry.get("match", default.match)
    if match not in MATCHES:
        problems.append(
            (
                f"{where}.match",
                f"must be one of {', '.join(MATCHES)} (got {shown(match)})",
            )
        )
    if len(problems) > before:
        return None
    return PriorRule(
        int(priors),
        float(years),
        match,
        frozenset(m.upper() for m in modalities),
        frozenset(codes),
    )


def parse_procedures(raw: Any) -> tuple[dict[str, Procedure], Problems]:
    """``[[procedures]]``: the site's procedure codes."""
    tables, problems = _tables(raw, "procedures", PROCEDURE_KEYS)
    found: dict[str, Procedure] = {}
    for where, entry in tables:
        values = {}
        for name in PROCEDURE_KEYS:
            value = entry.get(name, "")
            if not isinstance(value, str):
                problem = f"must be a string (got {shown(value)})"
                problems.append((f"{where}.{name}", problem))
            values[name] = value.strip() if isinstance(value, str) else ""
        if not values["code"]:
            problems.append((f"{where}.code", "is required"))
        elif values["code"] in found:
            problems.append((f"{where}.code", f"{values['code']!r} is listed twice"))
        else:
            found[values["code"]] = Procedure(
                values["code"], values["modality"].upper(), values["body_part"].upper()
            )
    return found, problems


def _tables(
    raw: Any, name: str, keys: Mapping[str, str]
) -> tuple[list[tuple[str, dict[str, Any]]], Problems]:
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [(name, f"must be an array of tables ([[{name}]])")]
    tables, problems = [], []
    for index, entry in enumerate(raw):
        where = f"{name}[{index}]"
        if not isinstance(entry, dict):
            problems.append((where, "must be a table"))
            continue
        unknown = [key for key in entry if key not in keys]
        problems += [(f"{where}.{key}", "unknown key") for key in unknown]
        tables.append((where, entry))
    return tables, problems


def _names(
    where: str, entry: dict[str, Any], key: str, problems: Problems
) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(item, str) and item.strip() for item in value
    ):
        problems.append(
            (f"{where}.{key}", f"must be a list of names (got {shown(value)})")
        )
        return []
    return [item.strip() for item in value]
