"""How much storage each tier needs for a workload, under the rules.

Pure arithmetic on a Workload and the tiers' stays (retention.py):

- a tier *holds* the studies of the days they stay on it, counted from
  receipt (the days before a copy arrives are a margin) and up to the whole
  period: online holds instance bytes as received; nearline, the offline
  volumes and the mirror hold packs, taken as ``pack_ratio`` (0.85) of the
  instance bytes. Packs compress with zstd, but most images arrive
  compressed already (JPEG, JPEG 2000), so 0.85 is a cautious figure for a
  mixed archive; uncompressed CT and MR packs come out smaller;
- online and nearline need ``held / low watermark``, so that the steady
  state sits below the low watermark and the watermark releases have
  nothing to do; online adds ``storage.reserved_bytes``;
- the mirror keeps every pack; offline volumes are counted at the
  cartridge's native capacity, for each copy.

Decimal units throughout: 1 MB is 10**6 bytes, a year 365 days.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from appliance.hardware.retention import Retention, Stay
from appliance.hardware.units import format_size

logger = logging.getLogger(__name__)

DAYS_PER_YEAR = 365
BYTES_PER_MB = 10**6
PACK_RATIO = 0.85


@dataclass(frozen=True)
class Workload:
    """What the archive receives: studies a day, their size, for how long."""

    studies_per_day: float
    mb_per_study: float
    years: float

    def __post_init__(self) -> None:
        for name in ("studies_per_day", "mb_per_study", "years"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be more than 0, not {value!r}")

    @property
    def bytes_per_day(self) -> float:
        """Instance bytes received a day."""
        return self.studies_per_day * self.mb_per_study * BYTES_PER_MB

    @property
    def days(self) -> float:
        """The period in days."""
        return self.years * DAYS_PER_YEAR


@dataclass(frozen=True)
class Media:
    """Offline volumes: native capacity of one and copies of every pack."""

    capacity: int = 18 * 10**12
    copies: int = 2

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError("the volume capacity must be more than 0 bytes")
        if self.copies < 1:
            raise ValueError("copies must be 1 or more")


@dataclass(frozen=True)
class TierNeed:
    """One tier's need at the end of the period.

    ``days`` of studies held, ``held_bytes`` they take there, and
    ``capacity_bytes`` to provide (None when no capacity can keep usage
    below a low watermark of 0%).
    """

    tier: str
    days: float
    held_bytes: int
    capacity_bytes: int | None
    basis: str


@dataclass(frozen=True)
class VolumeNeed:
    """Offline volumes: packs written a year, volumes a year (all copies,
    fractional) and whole volumes over the period (all copies)."""

    pack_bytes_per_year: int
    per_year: float
    total: int
    media: Media


@dataclass(frozen=True)
class Sizing:
    """The whole answer: per-tier needs, volumes, and what was assumed."""

    workload: Workload
    tiers: tuple[TierNeed, ...]
    volumes: VolumeNeed | None
    notes: tuple[str, ...]


def size(
    workload: Workload,
    retention: Retention,
    low_watermarks: dict[str, float],
    reserved_bytes: int = 0,
    media: Media | None = None,
    pack_ratio: float = PACK_RATIO,
) -> Sizing:
    """The capacity each tier needs for ``workload`` under ``retention``.

    ``low_watermarks`` gives the percent for online and nearline.
    """
    if not 0 < pack_ratio <= 1:
        raise ValueError(f"pack_ratio must be above 0 and at most 1, not {pack_ratio}")
    media = media or Media()
    stays = retention.stays
    tiers = [_disk_tier(workload, stays["online"], 1.0, low_watermarks["online"])]
    tiers[0] = _with_reserve(tiers[0], reserved_bytes)
    tiers.append(
        _disk_tier(workload, stays["nearline"], pack_ratio, low_watermarks["nearline"])
    )
    tiers.append(_mirror(workload, stays["offsite"], pack_ratio))
    volumes = _volumes(workload, stays["offline"], pack_ratio, media)
    notes = (
        *retention.notes,
        "studies are assumed not to be retrieved after receipt: a retrieval "
        "restarts days_since_access, and recalls come back to online; the "
        "space between the watermarks absorbs them",
        f"packs are taken as {pack_ratio:g} of the instance bytes",
    )
    return Sizing(workload, tuple(tiers), volumes, notes)


def _held_days(workload: Workload, stay: Stay) -> float:
    if stay.arrives is None:
        return 0.0
    leaves = workload.days if stay.leaves is None else stay.leaves
    return float(min(leaves, workload.days))


def _disk_tier(workload: Workload, stay: Stay, ratio: float, low: float) -> TierNeed:
    days = _held_days(workload, stay)
    held = round(workload.bytes_per_day * ratio * days)
    kind = "instances as received" if ratio == 1 else f"packs at {ratio:g}"
    if low <= 0:
        basis = f"{kind}; a low watermark of 0% leaves no steady state to size for"
        return TierNeed(stay.tier, days, held, None, basis)
    capacity = math.ceil(held * 100 / low)
    basis = f"{kind}; held / low watermark {low:g}%"
    return TierNeed(stay.tier, days, held, capacity, basis)


def _with_reserve(need: TierNeed, reserved: int) -> TierNeed:
    if need.capacity_bytes is None or not reserved:
        return need
    return TierNeed(
        need.tier,
        need.days,
        need.held_bytes,
        need.capacity_bytes + reserved,
        f"{need.basis}, + {format_size(reserved)} storage.reserved_bytes",
    )


def _mirror(workload: Workload, stay: Stay, ratio: float) -> TierNeed:
    days = _held_days(workload, stay)
    held = round(workload.bytes_per_day * ratio * days)
    basis = f"every pack at {ratio:g}; plus catalog snapshots" if held else "off"
    return TierNeed("mirror", days, held, held, basis)


def _volumes(
    workload: Workload, stay: Stay, ratio: float, media: Media
) -> VolumeNeed | None:
    if stay.arrives is None:
        return None
    yearly = workload.bytes_per_day * ratio * DAYS_PER_YEAR
    held = workload.bytes_per_day * ratio * _held_days(workload, stay)
    per_copy = math.ceil(held / media.capacity) if held else 0
    return VolumeNeed(
        pack_bytes_per_year=round(yearly),
        per_year=yearly / media.capacity * media.copies,
        total=per_copy * media.copies,
        media=media,
    )
