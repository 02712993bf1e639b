"""The rebuilt catalog, written fresh from the work catalog: every instance
the mirror (or the volumes) holds, with its copy there only.

Instances go in through the catalog's one writer, study by study and in
the order they were received, so that counts, indexes and the lists the
C-FIND answers carry (modalities, SOP classes) come out as the lost
appliance had them. Each instance's copy is in the newest pack that holds
its bytes and is on the mirror (or on a volume read).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb

from appliance.catalog import copies, patients
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord, NewInstance
from appliance.catalog.store import Catalog, Outcome
from appliance.errors import CatalogError
from appliance.restore.mirror import MirrorContents, pack_number
from appliance.restore.replay import add_pack

logger = logging.getLogger(__name__)

# Meta key of a rebuilt catalog: where it came from, what was lost.
REBUILT = b"restore.rebuilt"
_BATCH = 2000


@dataclass
class Exported:
    """What the rebuilt catalog holds and what it could not."""

    instances: int = 0
    # Instances the lost appliance had that never reached the mirror.
    lost: list[dict[str, str]] = field(default_factory=list)
    # Packs the catalog knows that are not on the mirror: pack id -> instances.
    missing: dict[str, list[str]] = field(default_factory=dict)


def export(work: Catalog, final: Catalog, contents: MirrorContents) -> Exported:
    """Write every instance with a copy on the tier of ``contents`` from
    ``work`` into the empty ``final`` catalog, then the packs and copies."""
    result = Exported()
    with work.read() as txn:
        batch: list[NewInstance] = []
        for item, has_copy in _instances(work, txn, contents.tier):
            if not has_copy:
                uid = item.record.sop_instance_uid
                result.lost.append(
                    {"sop_instance_uid": uid, "study": item.record.study_uid}
                )
                continue
            batch.append(item)
            if len(batch) >= _BATCH:
                result.instances += _record(final, batch)
                batch = []
        result.instances += _record(final, batch)
        packs = [
            PackRecord.from_json(data)
            for _key, data in work.all_records(txn, "packs")
            if data.get("tier") == contents.tier
        ]
    _add_packs(final, packs, contents, result)
    # Instances were written with their patients' corrected attributes;
    # the pointers of merged patients and the corrections' marks follow.
    patients.carry_over(work, final)
    return result


def _instances(
    work: Catalog, txn: lmdb.Transaction, tier: str
) -> Iterator[tuple[NewInstance, bool]]:
    """Every instance of the work catalog, study by study in the order
    received, and whether it has a copy on ``tier``."""
    for study_uid, study in work.all_records(txn, "studies"):
        patient = work.get(txn, "patients", study["patient"]) or {}
        senders = list(study.get("calling_aes", []))
        records = sorted(
            _records_of(work, txn, study_uid),
            key=lambda r: (r.received, r.sop_instance_uid),
        )
        for index, record in enumerate(records):
            series = work.get(txn, "series", record.series_uid) or {}
            has_copy = any(c.tier == tier for c in record.copies)
            record.copies = []
            # The writer lists a study's sending AEs as its instances come;
            # handing them out in order gives the study the same list.
            sender = senders[min(index, len(senders) - 1)] if senders else ""
            item = NewInstance(
                record,
                dict(patient.get("attrs", {})),
                dict(study["attrs"]),
                dict(series.get("attrs", {})),
                sender,
            )
            yield item, has_copy


def _records_of(
    work: Catalog, txn: lmdb.Transaction, study_uid: str
) -> Iterator[InstanceRecord]:
    for series_uid in work.index_values(txn, "idx.series.study", study_uid):
        for uid in work.index_values(txn, "idx.instance.series", series_uid):
            record = work.instance(txn, uid)
            if record is not None:
                yield record


def _record(final: Catalog, batch: list[NewInstance]) -> int:
    results = final.record(batch, "keep_first")
    return sum(1 for result in results if result.outcome is Outcome.STORED)


def _add_packs(
    final: Catalog,
    packs: list[PackRecord],
    contents: MirrorContents,
    result: Exported,
) -> None:
    """Give each instance its copy in the newest pack that holds its bytes,
    packs on the mirror (or the volumes read) first; copies in packs not
    there are kept but not counted as verified."""
    present = [p for p in packs if p.pack_id in contents.packs]
    absent = [p for p in packs if p.pack_id not in contents.packs]
    for group, found in ((present, True), (absent, False)):
        for pack in sorted(group, key=lambda p: pack_number(p.pack_id), reverse=True):
            checksums = _checksums(final, pack)
            added = add_pack(final, pack, checksums)
            if found or not added:
                continue
            uids = [uid for uid in checksums if _copy_in(final, uid, pack)]
            copies.mark_unverified(final, pack.pack_id, uids)
            result.missing[pack.pack_id] = uids
            logger.error(
                "pack %s is not on %s: %d instance(s) cannot be restored",
                pack.pack_id,
                contents.where,
                len(uids),
            )


def _checksums(final: Catalog, pack: PackRecord) -> dict[str, str]:
    """The catalog's SHA-256 of the pack's members that still lack a copy
    on its tier."""
    found = {}
    with final.read() as txn:
        for uid in pack.members:
            record = final.instance(txn, uid)
            if record is not None and record.copy_on(pack.tier) is None:
                found[uid] = record.sha256
    return found


def _copy_in(final: Catalog, uid: str, pack: PackRecord) -> bool:
    with final.read() as txn:
        record = final.instance(txn, uid)
    return record is not None and any(
        c.tier == pack.tier and c.location.startswith(pack.pack_id + "/")
        for c in record.copies
    )


def finish(final: Catalog, last_journal: int, next_pack: int) -> None:
    """Leave the rebuilt catalog ready to replicate again: nothing queued,
    no journal, numbers that continue after the mirror's, so that nothing
    the mirror holds is sent again or named twice."""
    meta = final.db["meta"]
    try:
        with final.env.begin(write=True) as txn:
            # The writer queued and journalled every instance it recorded.
            txn.drop(final.db["replication"], delete=False)
            txn.drop(final.db["journal"], delete=False)
            txn.put(b"journal.next", str(last_journal + 1).encode(), db=meta)
            txn.put(b"mirror.journal_sent", str(last_journal).encode(), db=meta)
            txn.put(b"next_pack", str(next_pack).encode(), db=meta)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot finish the rebuilt catalog: {exc}") from exc


def mark_checked(final: Catalog, note: dict[str, Any]) -> None:
    """Record that the rebuilt catalog passed its check, and where it came
    from: only a catalog with this note is ever moved into place."""
    note = {**note, "time": time.time()}
    try:
        with final.env.begin(write=True, db=final.db["meta"]) as txn:
            txn.put(REBUILT, json.dumps(note).encode())
    except lmdb.Error as exc:
        raise CatalogError(f"cannot mark the rebuilt catalog: {exc}") from exc


def rebuilt_note(catalog: Catalog) -> dict[str, Any] | None:
    """What :func:`mark_checked` recorded, or None for a catalog that was
    not rebuilt (or not checked)."""
    with catalog.read() as txn:
        raw = txn.get(REBUILT, db=catalog.db["meta"])
    return None if raw is None else dict(json.loads(bytes(raw)))
