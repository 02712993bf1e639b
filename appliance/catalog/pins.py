"""Studies pinned online: priors of upcoming appointments.

A pin keeps a study's online copies from being released, by a rule or by
the watermark, until a given time (the appointment plus a grace period).
The prefetch planner owns the pins: each run replaces them all with those
its current appointments call for, so a cancelled or past appointment
releases its pins at the next run without any other bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lmdb

from appliance.catalog.store import Catalog
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

PINS = "pins"


@dataclass(frozen=True)
class Pin:
    study_uid: str
    until: float  # seconds since the epoch
    reason: str


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
                    {"key": pin.study_uid, "until": pin.until, "reason": pin.reason},
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
