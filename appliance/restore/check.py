"""The check a rebuilt catalog passes before it is moved into place.

It recounts everything from the instance records: the counts kept on each
patient, study and series, the catalog's totals, and the bytes of the tier
restored from (off-site, or offline for volumes); every instance has
exactly one copy, on that tier, in a pack the catalog records as holding
it, and every verified one is in a pack that is on the mirror (or on a
volume read); nothing is queued or journalled. A pack of another size
than recorded is damaged, not a fault of the catalog: the data restore
checks each instance in it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import lmdb

from appliance.catalog import replication
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.restore.mirror import MirrorContents

logger = logging.getLogger(__name__)

# The problems listed in the error, at most; the log has them all.
_SHOWN = 10


def check(final: Catalog, contents: MirrorContents, expected: int) -> None:
    """Raise CatalogError listing what is wrong with the rebuilt catalog."""
    counted = _Counted()
    # One read of every instance serves both checks.
    with final.read() as txn:
        problems = _copies(final, txn, contents, counted)
        problems += _counts(final, txn, counted, expected)
    if replication.queue_state(final).instances:
        problems.append("instances are queued for the mirror")
    if next(replication.journal_after(final, 0), None) is not None:
        problems.append("the journal is not empty")
    for problem in problems:
        logger.error("rebuilt catalog: %s", problem)
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        raise CatalogError(
            f"the rebuilt catalog fails its check ({len(problems)} problem(s)): "
            f"{shown}; it was not moved into place"
        )


@dataclass
class _Counted:
    """Instances found under each study, series and patient."""

    studies: Counter[str] = field(default_factory=Counter)
    series: Counter[str] = field(default_factory=Counter)
    patients: Counter[str] = field(default_factory=Counter)


def _warn_if_resized(
    pack_id: str, pack: dict[str, Any] | None, contents: MirrorContents
) -> None:
    remote = contents.packs.get(pack_id)
    if pack is not None and remote is not None and remote.size != pack["size"]:
        # Damaged: the data restore checks each instance in it.
        logger.warning(
            "pack %s on %s is not its recorded size", pack_id, contents.where
        )


def _copies(
    final: Catalog,
    txn: lmdb.Transaction,
    contents: MirrorContents,
    counted: _Counted,
) -> list[str]:
    problems = []
    tier = contents.tier
    tier_bytes = 0
    # A pack record lists every member: read each once, not per instance.
    packs: dict[str, dict[str, Any] | None] = {}
    for uid, data in final.all_records(txn, "instances"):
        counted.studies[data["study"]] += 1
        counted.series[data["series"]] += 1
        counted.patients[data["patient"]] += 1
        # The stored form read as it is: this runs once per instance of
        # the archive, while a restore's first C-FIND waits.
        copies = data["copies"]
        mine = [c for c in copies if c["tier"] == tier]
        if len(mine) != 1 or len(copies) != 1:
            problems.append(f"instance {uid} has copies {copies}")
            continue
        tier_bytes += data["size"]
        pack_id, _, member = mine[0]["location"].partition("/")
        if pack_id not in packs:
            packs[pack_id] = final.get(txn, "packs", pack_id)
            _warn_if_resized(pack_id, packs[pack_id], contents)
        pack = packs[pack_id]
        if pack is None or pack["members"].get(uid) != member:
            problems.append(f"instance {uid}: pack {pack_id} does not list it")
            continue
        if mine[0]["verified"] and pack_id not in contents.packs:
            problems.append(f"pack {pack_id} of {uid} is not on {contents.where}")
    recorded = int(txn.get(f"bytes.{tier}".encode(), b"0", db=final.db["meta"]))
    if recorded != tier_bytes:
        problems.append(f"{tier} bytes {recorded} recorded, {tier_bytes} counted")
    return problems


def _counts(
    final: Catalog, txn: lmdb.Transaction, counted: _Counted, expected: int
) -> list[str]:
    """Each level's counts against the instances found under it."""
    problems = []
    for level, found_under in (
        ("studies", counted.studies),
        ("series", counted.series),
        ("patients", counted.patients),
    ):
        for key, record in final.all_records(txn, level):
            if record["instances"] != found_under.get(key, 0):
                problems.append(
                    f"{level} {key!r} counts {record['instances']} instances, "
                    f"{found_under.get(key, 0)} found"
                )
    totals = final.counts()
    found = {
        "instances": sum(counted.studies.values()),
        "studies": len(counted.studies),
        "series": len(counted.series),
        "patients": len(counted.patients),
    }
    for name, number in found.items():
        if totals[name] != number:
            problems.append(f"{totals[name]} {name} recorded, {number} found")
    if found["instances"] != expected:
        problems.append(f"{found['instances']} instances, {expected} written")
    return problems
