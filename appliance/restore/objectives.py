"""The recovery objectives as they stand: how much of the archive a
disaster now would lose (the recovery point), and how long restoring all
of it from the mirror would take (the recovery time, estimated).

The recovery point is the age of the oldest instance still waiting in the
mirror's queue. The full restore reads every pack on the mirror: at the
rate ``restore.timetable`` gives now when it sets one, else at the rate
the last drill that restored anything measured (instances restored per
second, so the archive's instance bytes are counted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from appliance.catalog import replication
from appliance.catalog.replication import OFFSITE, QueueState
from appliance.catalog.store import Catalog
from appliance.replication.bandwidth import format_rate, parse_timetable
from appliance.restore.drill_records import DrillRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    """How long a full restore would take, and what the figure rests on."""

    seconds: float | None  # None: no rate to estimate with
    bytes: int
    basis: str


def recovery_point(catalog: Catalog) -> QueueState:
    """The mirror's queue: instances, bytes and the oldest receipt."""
    return replication.queue_state(catalog)


def full_restore(
    catalog: Catalog, timetable: str, drills: list[DrillRecord], now: datetime
) -> Estimate:
    """The estimated time to restore everything on the mirror."""
    counts = catalog.counts()
    pack_bytes = counts.get(f"packbytes.{OFFSITE}", 0)
    instance_bytes = counts.get(f"bytes.{OFFSITE}", 0)
    rate = parse_timetable(timetable).rate_at(now)
    if rate:
        return Estimate(
            pack_bytes / rate,
            pack_bytes,
            f"packs on the mirror at {format_rate(rate)}, the rate "
            "restore.timetable gives now",
        )
    why = "sets no limit" if rate is None else "pauses reading now"
    measured = [drill for drill in drills if drill.rate > 0]
    if not measured:
        return Estimate(
            None,
            instance_bytes,
            f"restore.timetable {why} and no drill has measured a rate yet",
        )
    last = measured[-1]
    return Estimate(
        instance_bytes / last.rate,
        instance_bytes,
        f"instances on the mirror at {format_rate(last.rate)}, the rate the "
        f"drill of {last.date} measured; restore.timetable {why}",
    )
