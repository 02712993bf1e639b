"""Studies pinned online: priors of upcoming appointments.

A pin keeps a study's online copies from being released, by a rule or by
the watermark, until a given time (the appointment plus a grace period).
The prefetch planner owns the pins: each run replaces them all with those
its current appointments call for, so a cancelled or past appointment
releases its pins at the next run without any other bookkeeping.

Retrievals of a pinned study after its appointment has begun are noted,
the first one per appointment only, with whether the study was wholly
online then: the prefetch hit rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lmdb

from appliance.catalog.store import Catalog
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

PINS = "pins"
HITS = "hits"


@dataclass(frozen=True)
class Pin:
    study_uid: str
    until: float  # seconds since the epoch
    reason: str
    start: float = 0.0  # the appointment it is a prior of begins


def replace_pins(catalog: Catalog, pins: list[Pin]) -> None:
    """Make ``pins`` the only pins, in one transaction."""
    try:
        with catalog.env.begin(write=True) as txn:
            txn.drop(catalog.db[PINS], delete=False)
            for pin in pins:
                catalog._put(
                    txn,
                    PINS,
                    pin.study_uid,
                    {
                        "key": pin.study_uid,
                        "until": pin.until,
                        "reason": pin.reason,
                        "start": pin.start,
                    },
                )
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record the pinned studies: {exc}") from exc


def pinned(catalog: Catalog, now: float) -> dict[str, str]:
    """The studies pinned at ``now``, each with why."""
    with catalog.read() as txn:
        return {
            key: str(data["reason"])
            for key, data in catalog.all_records(txn, PINS)
            if float(data["until"]) > now
        }


def note_retrievals(
    catalog: Catalog, study_uids: set[str], not_online: set[str], now: float
) -> None:
    """Note the first retrieval, after its appointment began, of each
    pinned study among ``study_uids``; ``not_online`` are those some of
    whose instances had to be recalled. Studies without a pin cost one
    read."""
    with catalog.read() as txn:
        due = []
        for uid in study_uids:
            pin = catalog.get(txn, PINS, uid) or {}
            start = float(pin.get("start") or 0)
            if not start or not start <= now <= float(pin["until"]):
                continue
            key = f"{uid}|{int(start)}"
            if catalog.get(txn, HITS, key) is None:
                due.append((key, uid, start))
    if not due:
        return
    try:
        with catalog.env.begin(write=True) as txn:
            for key, uid, start in due:
                hit = {"study": uid, "start": start, "time": now}
                hit["online"] = uid not in not_online
                catalog._put(txn, HITS, key, {"key": key, **hit})
    except lmdb.Error as exc:
        # A statistic: never a reason to fail the retrieval itself.
        logger.warning("cannot note the retrieval of a prior: %s", exc)


def hit_rate(catalog: Catalog, since: float) -> tuple[int, int]:
    """(priors online at their first retrieval, priors retrieved) since."""
    with catalog.read() as txn:
        noted = [
            data
            for _key, data in catalog.all_records(txn, HITS)
            if float(data["time"]) >= since
        ]
    return sum(bool(hit["online"]) for hit in noted), len(noted)
