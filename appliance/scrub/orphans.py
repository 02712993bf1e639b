"""Files on a tier that no catalog entry points to: reported, never deleted.

A crash between writing a file and recording it, or between forgetting a
copy and deleting it, leaves such a file; so does a person copying files
by hand. Files younger than a grace period are left out: an instance being
stored is renamed into ``objects/`` just before its record is committed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from appliance.catalog.store import Catalog
from appliance.hsm.tiers import NEARLINE, ONLINE
from appliance.storage.nearline import NearlineTier
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

GRACE_SECONDS = 3600.0


def online_orphans(
    catalog: Catalog, online: OnlineTier, grace: float = GRACE_SECONDS
) -> list[str]:
    """Files under ``objects/`` no online copy names, relative to the root."""
    # TODO: the set holds every online key (about 100 bytes each); a tier
    # of tens of millions of instances needs a sorted walk instead.
    known: set[str] = set()
    with catalog.read() as txn:
        for _uid, data in catalog.all_records(txn, "instances"):
            known.update(
                copy["location"] for copy in data["copies"] if copy["tier"] == ONLINE
            )
    return [
        str(path.relative_to(online.root))
        for path in sorted(online.objects.glob("??/*.dcm"))
        if _unnamed(path, known) and _old(path, grace)
    ]


def _unnamed(path: Path, known: set[str]) -> bool:
    # A key's file lies in the folder of its first two digits: a copy of a
    # known file in another folder is named by no entry either.
    return path.stem not in known or path.parent.name != path.stem[:2]


def nearline_orphans(
    catalog: Catalog, nearline: NearlineTier, grace: float = GRACE_SECONDS
) -> list[str]:
    """Pack files no nearline pack record names, relative to the root."""
    found = []
    with catalog.read() as txn:
        for path in sorted(nearline.packs.glob("*/*.pack")):
            location = str(path.relative_to(nearline.root))
            data = catalog.get(txn, "packs", path.stem)
            known = data is not None and (data["tier"], data["location"]) == (
                NEARLINE,
                location,
            )
            if not known and _old(path, grace):
                found.append(location)
    return found


def _old(path: Path, grace: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= grace
    except OSError:
        return False  # gone meanwhile
