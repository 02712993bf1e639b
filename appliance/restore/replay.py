"""Changes replayed onto a work catalog: journal entries from the mirror,
and the instances a pack's manifest lists.

Replaying is idempotent: an entry whose change the catalog already holds
changes nothing (the same instance recorded again is ``identical``; a pack
recorded again adds no copy), so that a journal segment overlapping the
snapshot, or a rebuild run twice, gives the same catalog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from appliance.catalog import copies, patients, replication
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord, NewInstance, patient_key
from appliance.catalog.replication import OFFSITE, Queued
from appliance.catalog.store import Catalog, Outcome
from appliance.restore.mirror import RemoteFile, pack_number
from appliance.storage.packs import Manifest, PackedInstance

logger = logging.getLogger(__name__)

_STORES = ("store", "replace")
# The most stores written in one transaction: a journal replayed without a
# snapshot is one long run of them, and progress is told between runs.
_RUN_MOST = 2000
# Progress is told every this many entries (and at the end).
_TELL_EVERY = 500

# Called with (entries replayed so far, entries to replay).
Progress = Callable[[int, int], None]


def replay_journal(
    catalog: Catalog,
    entries: Sequence[dict[str, Any]],
    progress: Progress | None = None,
) -> int:
    """Apply journal entries in order; how many were applied."""
    applied = 0
    run: list[dict[str, Any]] = []
    told = _Teller(progress, len(entries))
    for number, entry in enumerate(entries):
        op = entry.get("op")
        # A run of stores goes in one transaction; any other change first
        # writes the run before it, so that the order is kept.
        if run and (op != run[-1]["op"] or len(run) >= _RUN_MOST):
            _record_stores(catalog, run)
            run = []
        # The entries before this one are in the catalog, but for the run.
        told(number - len(run))
        if op in _STORES:
            run.append(entry)
        elif op == "replicated":
            _replicated(
                catalog, PackRecord.from_json(entry["pack"]), entry.get("sha256")
            )
        elif op == "offsite-lost":
            _offsite_lost(catalog, entry["pack"], list(entry["uids"]))
        elif op in patients.JOURNAL_OPS:
            # A patient update or merge, applied in the order it was made:
            # instances journaled after it find the survivor's pointer.
            patients.replay(catalog, entry)
        else:
            logger.warning("journal entry %s: unknown change %r skipped", entry, op)
            continue
        applied += 1
    _record_stores(catalog, run)
    told(len(entries), force=True)
    return applied


class _Teller:
    """Tells ``progress`` how far a replay is, every so many entries."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.last = -_TELL_EVERY

    def __call__(self, done: int, force: bool = False) -> None:
        if self.progress is None:
            return
        if force or done - self.last >= _TELL_EVERY:
            self.last = done
            self.progress(done, self.total)


def merge_manifest(
    catalog: Catalog,
    manifest: Manifest,
    remote: RemoteFile,
    sha256: str,
    tier: str = OFFSITE,
) -> int:
    """Record the instances a pack's manifest lists and the pack itself
    (at ``remote``, on ``tier``), with a copy in it for each; the copies
    added.

    A pack with a higher number was written later, so its bytes of an
    instance win over an earlier pack's; an earlier pack (an upload never
    recorded, sent again since; a study copied to the volumes again) adds
    only what the catalog lacks.
    """
    number = pack_number(manifest.pack_id)
    newer, older, moved = _sort_by_age(catalog, manifest.instances, number, tier)
    results = catalog.record([_from_manifest(entry) for entry in newer], "replace")
    results += catalog.record([_from_manifest(entry) for entry in older], "keep_first")
    for entry, result in zip([*newer, *older], results, strict=True):
        if result.outcome is Outcome.INCONSISTENT:
            # As at ingest: an instance that would show under the wrong study
            # or patient is not recorded. Its copy in this pack stays unused.
            logger.error(
                "pack %s: instance %s not recorded: %s",
                manifest.pack_id,
                entry.sop_instance_uid,
                result.reason,
            )
    for pack_id, uids in moved.items():
        # The instance's copy moves to the newer pack: the same bytes, sent
        # again because the older pack was found damaged. (On volumes the
        # older pack keeps its record; only the mirror has a queue.)
        old = _pack(catalog, pack_id)
        if old is not None and tier == OFFSITE:
            replication.requeue(catalog, old, uids)
    pack = PackRecord(
        pack_id=manifest.pack_id,
        # A pack on a volume is filed under its study, as the migrator did.
        study_uid=(manifest.study_uid or "") if tier != OFFSITE else "",
        tier=tier,
        location=remote.name,
        size=remote.size,
        sha256=sha256,
        members={entry.sop_instance_uid: entry.member for entry in manifest.instances},
        key_id=manifest.encryption.master_key_id if manifest.encryption else None,
    )
    checksums = {e.sop_instance_uid: e.meta.sha256 for e in manifest.instances}
    return add_pack(catalog, pack, checksums)


def add_pack(catalog: Catalog, pack: PackRecord, checksums: dict[str, str]) -> int:
    """Record a pack and a copy in it for each instance it holds whose
    SHA-256 (``checksums``) the catalog has and which has no copy on the
    pack's tier yet; the copies added."""
    if pack.tier != OFFSITE:
        return copies.record_pack(catalog, pack, checksums)
    sent = [Queued(0, uid, 0, 0.0) for uid in pack.members]
    return replication.mark_replicated(catalog, pack, sent, checksums)


def _record_stores(catalog: Catalog, entries: list[dict[str, Any]]) -> None:
    if not entries:
        return
    policy = "replace" if entries[0]["op"] == "replace" else "keep_first"
    catalog.record([_from_journal(entry) for entry in entries], policy)


def _from_journal(entry: dict[str, Any]) -> NewInstance:
    """The instance of a store entry, without its copies: those were on
    tiers of the lost appliance; the off-site one comes with its pack."""
    data = dict(entry["instance"])
    record = InstanceRecord.from_json(data["key"], {**data, "copies": []})
    return NewInstance(record, entry["patient"], entry["study"], entry["series"])


def _from_manifest(entry: PackedInstance) -> NewInstance:
    meta = entry.meta
    levels = {level: dict(values) for level, values in meta.attributes.items()}
    patient = levels.get("patient", {})
    record = InstanceRecord(
        sop_instance_uid=meta.sop_instance_uid,
        series_uid=meta.series_uid,
        study_uid=meta.study_uid,
        patient=patient_key(
            patient.get("PatientID", ""), patient.get("IssuerOfPatientID", "")
        ),
        transfer_syntax=meta.transfer_syntax,
        size=meta.size,
        sha256=meta.sha256,
        content_sha256=meta.content_sha256,
        received=meta.received or 0.0,
        attributes=levels.get("instance", {}),
    )
    return NewInstance(
        record, patient, levels.get("study", {}), levels.get("series", {})
    )


def _sort_by_age(
    catalog: Catalog, entries: Iterable[PackedInstance], number: int, tier: str
) -> tuple[list[PackedInstance], list[PackedInstance], dict[str, list[str]]]:
    """Split a pack's instances: those it holds the latest copy of, the
    rest; and, by pack, instances whose copy moves to this pack."""
    newer, older = [], []
    moved: dict[str, list[str]] = {}
    with catalog.read() as txn:
        for entry in entries:
            record = catalog.instance(txn, entry.sop_instance_uid)
            copy = record.copy_on(tier) if record is not None else None
            held = copy.location.partition("/")[0] if copy else None
            if held is None or pack_number(held) < number:
                newer.append(entry)
                same = record is not None and record.sha256 == entry.meta.sha256
                if held is not None and same:
                    moved.setdefault(held, []).append(entry.sop_instance_uid)
            else:
                older.append(entry)
    return newer, older, moved


def _replicated(
    catalog: Catalog, pack: PackRecord, sent: dict[str, str] | None
) -> None:
    """A pack verified on the mirror: copies for the instances it holds
    that have none yet, as the lost appliance recorded them. ``sent`` is
    the SHA-256 of each instance's bytes in the pack: an instance replaced
    while its pack was on the way gets no copy there, and counts as never
    having reached the mirror unless a later pack holds its new bytes."""
    if pack.tier != OFFSITE:
        return
    if sent is None:
        # An entry journaled before they were: the catalog's bytes are taken
        # for the pack's, and a mismatch shows when the data is restored.
        with catalog.read() as txn:
            sent = {
                uid: record.sha256
                for uid in pack.members
                if (record := catalog.instance(txn, uid)) is not None
            }
    add_pack(catalog, pack, sent)


def _offsite_lost(catalog: Catalog, pack_id: str, uids: list[str]) -> None:
    pack = _pack(catalog, pack_id)
    if pack is not None:
        replication.requeue(catalog, pack, uids)


def _pack(catalog: Catalog, pack_id: str) -> PackRecord | None:
    with catalog.read() as txn:
        data = catalog.get(txn, "packs", pack_id)
    return PackRecord.from_json(data) if data is not None else None
