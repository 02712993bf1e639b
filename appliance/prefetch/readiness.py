"""How far the prefetch is for the appointments still to come: the last
planner run's plans counted, and the hit rate of the last days.

``appliance prefetch status`` and the metrics count the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from appliance.catalog import pins
from appliance.catalog.store import Catalog
from appliance.prefetch import appointments, planner
from appliance.prefetch.appointments import Appointment
from appliance.prefetch.planner import Plan

logger = logging.getLogger(__name__)

# The hit rate is counted over this many days.
HIT_RATE_DAYS = 30


@dataclass(frozen=True)
class Readiness:
    """Appointments whose priors are all online, and priors late or
    waiting for a volume."""

    appointments: int
    ready: int
    late: int
    waiting: int


def active_plans(catalog: Catalog) -> list[tuple[Plan, Appointment]]:
    """The plans of active appointments, earliest first."""
    plans = planner.recorded_plans(catalog)
    known = {a.appointment_id: a for a in appointments.appointments(catalog)}
    found = []
    for plan in sorted(plans.values(), key=lambda p: p.start):
        appointment = known.get(plan.appointment_id)
        if appointment is not None and appointment.active:
            found.append((plan, appointment))
    return found


def tally(plans: list[Plan]) -> Readiness:
    states = [prior.state for plan in plans for prior in plan.priors]
    return Readiness(
        appointments=len(plans),
        ready=sum(plan.ready for plan in plans),
        late=states.count(planner.LATE),
        waiting=states.count(planner.WAITING),
    )


def hit_rate(catalog: Catalog, now: float) -> tuple[int, int]:
    """(priors online at their first retrieval, priors retrieved) over the
    last HIT_RATE_DAYS days."""
    return pins.hit_rate(catalog, now - HIT_RATE_DAYS * planner.DAY)
