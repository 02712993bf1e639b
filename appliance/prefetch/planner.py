"""The prefetch planner: priors of upcoming appointments, recalled in time.

Each run, for every active appointment starting within
``prefetch.horizon_days``:

1. find the patient's earlier studies in the catalog and choose the
   priors (``selection.py``);
2. pin every prior online until the appointment plus
   ``prefetch.grace_hours``, so that no rule or watermark releases it
   meanwhile; the pins are replaced as a whole, so those of a cancelled or
   past appointment go away at the next run;
3. recall the priors that are not online, earliest deadline (appointment
   minus ``prefetch.lead_hours``) first, each followed at once by the other
   priors waiting on the same source (the nearline tier, or one offline
   volume), so that a tape is mounted once; a volume that is on the shelf
   raises the operator request with the deadline in it;
4. record each appointment's priors and their state for
   ``appliance prefetch status``: online, waiting for a volume, failed, or
   late (not online and its deadline passed).

Recalls are spread at ``prefetch.rate_mb_per_s`` so that ingest and
retrieval keep their share of the disks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from appliance.catalog import copies, pins
from appliance.catalog.records import patient_key
from appliance.catalog.store import Catalog, merged_into
from appliance.config import Config
from appliance.errors import CatalogError
from appliance.hsm.recall import Recaller
from appliance.hsm.tiers import ONLINE
from appliance.prefetch import appointments, reconcile, selection
from appliance.prefetch.appointments import Appointment

logger = logging.getLogger(__name__)

PLANS = "prefetch"
HOUR = 3600.0
DAY = 86400.0

ONLINE_STATE = "online"
TO_RECALL = "to recall"
WAITING = "waiting for volume"
FAILED = "failed"
LATE = "late"


@dataclass
class Prior:
    """One prior of one appointment, and how far it is."""

    study_uid: str
    state: str
    detail: str = ""


@dataclass
class Plan:
    """An appointment's priors, as of the last planner run."""

    appointment_id: str
    start: float
    deadline: float
    priors: list[Prior] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(prior.state == ONLINE_STATE for prior in self.priors)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = self.appointment_id
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            appointment_id=data["appointment_id"],
            start=data["start"],
            deadline=data["deadline"],
            priors=[Prior(**prior) for prior in data["priors"]],
        )


class Planner:
    """Plans, pins and recalls the priors of upcoming appointments."""

    def __init__(
        self,
        catalog: Catalog,
        recaller: Recaller,
        config: Config,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.catalog = catalog
        self.recaller = recaller
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self._recalled = 0  # priors brought online by the current run

    def run(self) -> list[Plan]:
        """Compare new studies with the orders; plan, pin, recall what is
        missing, and record the outcome."""
        reconcile.reconcile(self.catalog)
        plans = self.plan()
        self._recall(plans)
        self._mark_late(plans)
        _record(self.catalog, plans)
        ready = sum(plan.ready for plan in plans)
        logger.info(
            "prefetch: %d appointments planned, %d ready, %d priors recalled now",
            len(plans),
            ready,
            self._recalled,
        )
        return plans

    def plan(self) -> list[Plan]:
        """Each appointment's priors and whether they are online; replaces
        the pins. Recalls nothing."""
        now = self.clock()
        grace = self.config.get("prefetch.grace_hours") * HOUR
        lead = self.config.get("prefetch.lead_hours") * HOUR
        horizon = now + self.config.get("prefetch.horizon_days") * DAY
        plans, held = [], []
        for appointment in appointments.appointments(self.catalog):
            start = appointment.start
            if not appointment.active or start is None:
                continue
            if not now - grace < start <= horizon:
                continue
            plan = Plan(appointment.appointment_id, start, start - lead)
            for uid in self._priors(appointment, start):
                state = ONLINE_STATE if self._online(uid) else TO_RECALL
                plan.priors.append(Prior(uid, state))
                held.append(pins.Pin(uid, start + grace, _why_pinned(start), start))
            plans.append(plan)
        pins.replace_pins(self.catalog, _latest_pins(held))
        return plans

    def _priors(self, appointment: Appointment, start: float) -> list[str]:
        wanted = selection.wanted(
            start,
            appointment.modality,
            appointment.procedure_code,
            self.config.default_prior_rule,
            self.config.prior_rules,
            self.config.procedures,
        )
        return selection.choose(wanted, self._candidates(appointment))

    def _candidates(self, appointment: Appointment) -> list[selection.Candidate]:
        found: dict[str, selection.Candidate] = {}
        with self.catalog.read() as txn:
            for patient in appointment.patients:
                key = patient_key(patient.patient_id, patient.issuer)
                # An appointment booked under an identifier merged since.
                key = merged_into(self.catalog, txn, key) or key
                for uid in self.catalog.index_values(txn, "idx.study.patient", key):
                    candidate = self._candidate(txn, uid)
                    if candidate is not None:
                        found[uid] = candidate
        return list(found.values())

    def _candidate(
        self, txn: lmdb.Transaction, study_uid: str
    ) -> selection.Candidate | None:
        study = self.catalog.get(txn, "studies", study_uid)
        if study is None:
            return None
        parts = set()
        for series_uid in self.catalog.index_values(txn, "idx.series.study", study_uid):
            series = self.catalog.get(txn, "series", series_uid) or {}
            part = series.get("attrs", {}).get("BodyPartExamined")
            if part:
                parts.add(str(part).upper())
        attributes = study.get("attrs", {})
        return selection.Candidate(
            study_uid=study_uid,
            when=_study_time(attributes, float(study["received"])),
            modalities=frozenset(m.upper() for m in study.get("modalities", [])),
            body_parts=frozenset(parts),
        )

    def _online(self, study_uid: str) -> bool:
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, study_uid)
        return found is not None and found.complete_on(ONLINE)

    # -- recalls -----------------------------------------------------------

    def _recall(self, plans: list[Plan]) -> None:
        self._recalled = 0
        now = self.clock()
        waiting = [
            (plan, prior)
            for plan in plans
            if plan.start > now
            for prior in plan.priors
            if prior.state == TO_RECALL
        ]
        waiting.sort(key=lambda item: (item[0].deadline, item[1].study_uid))
        sources = {
            prior.study_uid: self.recaller.nearest_source(prior.study_uid)
            for _plan, prior in waiting
        }
        done: dict[str, Prior] = {}
        for plan, prior in _grouped(waiting, sources):
            if prior.study_uid not in done:
                done[prior.study_uid] = self._recall_one(plan, prior.study_uid)
            outcome = done[prior.study_uid]
            prior.state, prior.detail = outcome.state, outcome.detail

    def _recall_one(self, plan: Plan, study_uid: str) -> Prior:
        started = self.clock()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(plan.start))
        deadline = time.strftime("%Y-%m-%d %H:%M", time.localtime(plan.deadline))
        why = f"a prior for an appointment at {when} is needed online by {deadline}"
        try:
            result = self.recaller.recall(study_uid, why=why)
        except Exception as exc:  # one study's trouble must not stop the others
            logger.error("prefetch: recall of %s failed: %s", study_uid, exc)
            return Prior(study_uid, FAILED, str(exc))
        if result.ok:
            self._recalled += 1
            self._pace(study_uid, self.clock() - started)
            return Prior(study_uid, ONLINE_STATE)
        if result.waiting_for:
            volumes = ", ".join(result.waiting_for)
            return Prior(study_uid, WAITING, volumes)
        return Prior(study_uid, FAILED, "; ".join(result.problems))

    def _pace(self, study_uid: str, spent: float) -> None:
        """Wait so that recalls average at most prefetch.rate_mb_per_s."""
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, study_uid)
        size = found.size if found is not None else 0
        rate = self.config.get("prefetch.rate_mb_per_s") * 1_000_000
        pause = size / rate - spent
        if pause > 0:
            self.sleep(pause)

    def _mark_late(self, plans: list[Plan]) -> None:
        now = self.clock()
        for plan in plans:
            for prior in plan.priors:
                if prior.state != ONLINE_STATE and now > plan.deadline:
                    prior.detail = prior.detail or prior.state
                    prior.state = LATE


def _grouped(
    waiting: list[tuple[Plan, Prior]], sources: dict[str, str]
) -> list[tuple[Plan, Prior]]:
    """Earliest deadline first; after each, the others on the same source."""
    order: list[tuple[Plan, Prior]] = []
    left = list(waiting)
    while left:
        first = left.pop(0)
        order.append(first)
        source = sources.get(first[1].study_uid, "")
        if not source:
            continue
        same = [item for item in left if sources.get(item[1].study_uid) == source]
        order += same
        left = [item for item in left if item not in same]
    return order


def _study_time(attributes: dict[str, Any], received: float) -> float:
    """StudyDate and StudyTime as local time; when it was received if the
    study has no usable date."""
    date = str(attributes.get("StudyDate") or "").replace(".", "")[:8]
    clock = str(attributes.get("StudyTime") or "").replace(":", "")[:6]
    clock = (clock + "000000")[:6] if clock[:6].isdigit() else "000000"
    try:
        return time.mktime(time.strptime(date + clock, "%Y%m%d%H%M%S"))
    except ValueError:
        return received


def _why_pinned(start: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(start))
    return f"pinned online: a prior for an appointment at {when}"


def _latest_pins(held: list[pins.Pin]) -> list[pins.Pin]:
    """One pin per study: the one that lasts longest (its appointment is
    the one a retrieval counts for)."""
    latest: dict[str, pins.Pin] = {}
    for pin in held:
        if pin.study_uid not in latest or pin.until > latest[pin.study_uid].until:
            latest[pin.study_uid] = pin
    return list(latest.values())


def _record(catalog: Catalog, plans: list[Plan]) -> None:
    try:
        with catalog.env.begin(write=True) as txn:
            txn.drop(catalog.db[PLANS], delete=False)
            for plan in plans:
                catalog._put(txn, PLANS, plan.appointment_id, plan.as_json())
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record the prefetch plans: {exc}") from exc


def recorded_plans(catalog: Catalog) -> dict[str, Plan]:
    """The plans of the last run, by appointment ID."""
    with catalog.read() as txn:
        return {
            key: Plan.from_json(data) for key, data in catalog.all_records(txn, PLANS)
        }
