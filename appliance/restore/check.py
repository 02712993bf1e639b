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
from typing import Any

from appliance.catalog import replication
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.restore.mirror import MirrorContents

logger = logging.getLogger(__name__)

# The problems listed in the error, at most; the log has them all.
_SHOWN = 10


def check(final: Catalog, contents: MirrorContents, expected: int) -> None:
    """Raise CatalogError listing what is wrong with the rebuilt catalog."""
    problems = _copies(final, contents) + _counts(final, expected)
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


def _warn_if_resized(
    pack_id: str, pack: dict[str, Any] | None, contents: MirrorContents
) -> None:
    remote = contents.packs.get(pack_id)
    if pack is not None and remote is not None and remote.size != pack["size"]:
        # Damaged: the data restore checks each instance in it.
        logger.warning(
            "pack %s on %s is not its recorded size", pack_id, contents.where
        )


def _copies(final: Catalog, contents: MirrorContents) -> list[str]:
    problems = []
    tier = contents.tier
    tier_bytes = 0
    # A pack record lists every member: read each once, not per instance.
    packs: dict[str, dict[str, Any] | None] = {}
    with final.read() as txn:
        for uid, _data in final.all_records(txn, "instances"):
            record = final.instance(txn, uid)
            assert record is not None
            mine = [c for c in record.copies if c.tier == tier]
            others = [c.tier for c in record.copies if c.tier != tier]
            if len(mine) != 1 or others:
                problems.append(f"instance {uid} has copies {record.copies}")
                continue
            tier_bytes += record.size
            pack_id, _, member = mine[0].location.partition("/")
            if pack_id not in packs:
                packs[pack_id] = final.get(txn, "packs", pack_id)
                _warn_if_resized(pack_id, packs[pack_id], contents)
            pack = packs[pack_id]
            if pack is None or pack["members"].get(uid) != member:
                problems.append(f"instance {uid}: pack {pack_id} does not list it")
                continue
            if mine[0].verified and pack_id not in contents.packs:
                problems.append(f"pack {pack_id} of {uid} is not on {contents.where}")
        recorded = int(txn.get(f"bytes.{tier}".encode(), b"0", db=final.db["meta"]))
    if recorded != tier_bytes:
        problems.append(f"{tier} bytes {recorded} recorded, {tier_bytes} counted")
    return problems


def _counts(final: Catalog, expected: int) -> list[str]:
    """Each level's counts against the instances found under it."""
    problems = []
    per_study: Counter[str] = Counter()
    per_series: Counter[str] = Counter()
    per_patient: Counter[str] = Counter()
    with final.read() as txn:
        for _uid, data in final.all_records(txn, "instances"):
            per_study[data["study"]] += 1
            per_series[data["series"]] += 1
            per_patient[data["patient"]] += 1
        for level, counted in (
            ("studies", per_study),
            ("series", per_series),
            ("patients", per_patient),
        ):
            for key, record in final.all_records(txn, level):
                if record["instances"] != counted.get(key, 0):
                    problems.append(
                        f"{level} {key!r} counts {record['instances']} instances, "
                        f"{counted.get(key, 0)} found"
                    )
    totals = final.counts()
    found = {
        "instances": sum(per_study.values()),
        "studies": len(per_study),
        "series": len(per_series),
        "patients": len(per_patient),
    }
    for name, number in found.items():
        if totals[name] != number:
            problems.append(f"{totals[name]} {name} recorded, {number} found")
    if found["instances"] != expected:
        problems.append(f"{found['instances']} instances, {expected} written")
    return problems
