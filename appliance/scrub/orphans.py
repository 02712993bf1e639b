"""Files on a tier that no catalog entry points to: reported, never deleted.

A crash between writing a file and recording it, or between forgetting a
copy and deleting it, leaves such a file; so does a person copying files
by hand. Files younger than a grace period are left out: an instance being
stored is renamed into ``objects/`` just before its record is committed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from pathlib import Path
from typing import IO

from appliance.catalog.store import Catalog
from appliance.hsm.tiers import NEARLINE, ONLINE
from appliance.storage.nearline import NearlineTier
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

GRACE_SECONDS = 3600.0

# What an online key looks like (see OnlineTier.new_key).
_KEY = re.compile(r"[0-9a-f]{32}")


def online_orphans(
    catalog: Catalog, online: OnlineTier, scratch: Path, grace: float = GRACE_SECONDS
) -> list[str]:
    """Files under ``objects/`` no online copy names, relative to the root.

    The keys the catalog knows are first sorted on disk under ``scratch``
    by the folder their file lies in, so that only one folder's keys are
    held in memory at a time: a tier of a hundred million instances would
    otherwise need gigabytes for them.
    """
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        _sort_known_keys(catalog, scratch)
        found: list[str] = []
        for folder in sorted(online.objects.glob("??")):
            known = _known_in(scratch, folder.name)
            found.extend(
                str(path.relative_to(online.root))
                for path in sorted(folder.glob("*.dcm"))
                if path.stem not in known and _old(path, grace)
            )
        return found
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _sort_known_keys(catalog: Catalog, scratch: Path) -> None:
    """Every online key the catalog names, one line each, in the file of
    the folder its file lies in (a key's folder is its first two digits)."""
    with contextlib.ExitStack() as stack, catalog.read() as txn:
        files: dict[str, IO[str]] = {}
        for _uid, data in catalog.all_records(txn, "instances"):
            for copy in data["copies"]:
                key = copy["location"]
                if copy["tier"] != ONLINE or not _KEY.fullmatch(key):
                    continue  # no file in objects/ is named by it
                folder = key[:2]
                if folder not in files:
                    path = scratch / folder
                    files[folder] = stack.enter_context(path.open("a"))
                files[folder].write(f"{key}\n")


def _known_in(scratch: Path, folder: str) -> set[str]:
    """The keys the catalog names in one folder of ``objects/``."""
    try:
        return set((scratch / folder).read_text(encoding="ascii").split())
    except FileNotFoundError:
        return set()


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
