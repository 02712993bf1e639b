"""What the configuration says about the hardware, as the checks need it.

Site holds the resolved folders of the tiers and the catalog, their
capacities and watermarks, the offline library's devices and the mirror's
kind: plain values, so that the checks can be tried without a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from appliance.config import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AreaSite:
    """A storage area of the configuration: a tier or the catalog.

    ``capacity_bytes`` 0 means the size of the file system (without the
    blocks reserved for root, as the watermarks count it); the watermarks
    are None for the catalog, which has none.
    """

    name: str
    path: str
    capacity_bytes: int = 0
    high_watermark: float | None = None
    low_watermark: float | None = None
    reserved_bytes: int = 0


@dataclass(frozen=True)
class Site:
    """The configuration's hardware facts."""

    areas: tuple[AreaSite, ...]
    catalog_max_size: int = 64 * 2**30
    volumes_kind: str = "directory"
    volumes_path: str = ""
    tape_device: str = "/dev/nst0"
    changer: str = ""
    simulated_path: str = ""
    mirror_kind: str = "directory"

    @property
    def devices(self) -> tuple[str, ...]:
        """The device files the offline library uses, when it uses any."""
        if self.volumes_kind != "tape" or self.simulated_path:
            return ()
        return tuple(d for d in (self.tape_device, self.changer) if d)


def site_of(config: Config) -> Site:
    """The hardware facts of a loaded configuration."""
    areas = [
        AreaSite(
            tier,
            str(path),
            config.get(f"{tier}.capacity_bytes"),
            config.get(f"{tier}.high_watermark"),
            config.get(f"{tier}.low_watermark"),
            config.get("storage.reserved_bytes") if tier == "online" else 0,
        )
        for tier, path in (
            ("online", config.online_path),
            ("nearline", config.nearline_path),
        )
    ]
    areas.append(AreaSite("catalog", str(config.catalog_path)))
    volumes = config.volume_settings()
    return Site(
        areas=tuple(areas),
        catalog_max_size=config.get("storage.catalog_max_size"),
        volumes_kind=config.get("volumes.kind"),
        volumes_path=volumes["path"],
        tape_device=volumes["device"],
        changer=volumes["changer"],
        simulated_path=volumes["simulated_path"],
        mirror_kind=config.get("mirror.kind"),
    )
