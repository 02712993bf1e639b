"""The rebuilt catalog, written fresh from the work catalog: every instance
the mirror (or the volumes) holds, with its copy there only.

Instances go in study by study and in the order they were received, so
that counts, indexes and the lists the C-FIND answers carry (modalities,
SOP classes) come out as the lost appliance had them. They are loaded in
bulk (``catalog/bulk.py``): the same records the catalog's writer would
make, without the journal entry and queue entry per instance that
:func:`finish` would drop. Each instance's copy is in the newest pack that
holds its bytes and is on the mirror (or on a volume read).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lmdb

from appliance.catalog import answers, codec, patients
from appliance.catalog.archive import KEY as ARCHIVE_KEY
from appliance.catalog.bulk import BulkLoad
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import Copy, InstanceRecord, NewInstance
from appliance.catalog.store import Catalog, Outcome, encode_key
from appliance.errors import CatalogError
from appliance.restore.mirror import MirrorContents, pack_number

logger = logging.getLogger(__name__)

# Meta key of a rebuilt catalog: where it came from, what was lost.
REBUILT = b"restore.rebuilt"
# The work catalog's scratch database of where each copy goes.
_PLACES = b"restore.copies"
# Patients whose attributes the export keeps at once, about 1 KB each.
_PATIENTS_READ = 20_000


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
    # The load holds a few small objects per instance until it commits, and
    # none of them in a cycle: the cyclic collector would walk them again
    # and again, for nothing.
    with collector_paused():
        return _export(work, final, contents)


@contextmanager
def collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _export(work: Catalog, final: Catalog, contents: MirrorContents) -> Exported:
    result = Exported()
    places = copy_places(work, contents)
    load = BulkLoad(final)
    try:
        with work.read() as txn:
            groups = studies(work, txn, contents.tier)
            items = (pair for group in groups for pair in group)
            for item, has_copy in items:
                record = item.record
                if not has_copy:
                    uid = record.sop_instance_uid
                    result.lost.append(
                        {"sop_instance_uid": uid, "study": record.study_uid}
                    )
                    continue
                place = txn.get(encode_key(record.sop_instance_uid), db=places)
                if place is not None:
                    record.copies = [copy_at(contents.tier, place)]
                if load.add(item) is not Outcome.STORED:
                    continue
                result.instances += 1
                if place is not None and not record.copies[0].verified:
                    pack_id = record.copies[0].location.partition("/")[0]
                    result.missing.setdefault(pack_id, []).append(
                        record.sop_instance_uid
                    )
            for pack_id in _pack_ids(work, txn, contents):
                load.add_pack(_pack(work, txn, pack_id))
        load.commit()
    finally:
        load.abort()
    tell_missing(result, contents)
    # Instances were written with their patients' corrected attributes;
    # the pointers of merged patients and the corrections' marks follow,
    # and the ACKs of the messages that made those changes.
    patients.carry_over(work, final)
    answers.carry_over(work, final)
    return result


def tell_missing(result: Exported, contents: MirrorContents) -> None:
    """Sort the instances of each pack that is not there (a pack at a time,
    by UID, whatever order they were read in) and log each pack."""
    result.missing = {
        pack_id: sorted(result.missing[pack_id]) for pack_id in sorted(result.missing)
    }
    for pack_id, uids in result.missing.items():
        logger.error(
            "pack %s is not on %s: %d instance(s) cannot be restored",
            pack_id,
            contents.where,
            len(uids),
        )


def copy_places(work: Catalog, contents: MirrorContents) -> Any:
    """Where each instance's copy goes, in a scratch database of the work
    catalog (as long as the archive, so not in memory): the newest pack on
    the mirror (or the volumes read) that holds it, failing that the newest
    pack that is not there, its copy then not verified. Values are ``1``
    (verified) or ``0`` and the copy's location."""
    places = work.env.open_db(_PLACES)
    try:
        with work.env.begin(write=True) as txn:
            txn.drop(places, delete=False)
            for pack_id in _pack_ids(work, txn, contents):
                flag = b"1" if pack_id in contents.packs else b"0"
                pack = _pack(work, txn, pack_id)
                for uid, member in pack.members.items():
                    where = flag + f"{pack_id}/{member}".encode()
                    # The first pack to name an instance is the one it keeps.
                    txn.put(encode_key(uid), where, db=places, overwrite=False)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot sort the copies out: {exc}") from exc
    return places


def copy_at(tier: str, place: bytes | memoryview) -> Copy:
    raw = bytes(place)
    return Copy(tier, raw[1:].decode(), verified=raw[:1] == b"1")


def _pack_ids(
    work: Catalog, txn: lmdb.Transaction, contents: MirrorContents
) -> list[str]:
    """The packs on the tier of ``contents``: those there newest first,
    then those not there newest first."""
    found = [
        key
        for key, data in work.all_records(txn, "packs")
        if data.get("tier") == contents.tier
    ]
    newest_first = sorted(found, key=pack_number, reverse=True)
    return sorted(newest_first, key=lambda pack_id: pack_id not in contents.packs)


def _pack(work: Catalog, txn: lmdb.Transaction, pack_id: str) -> PackRecord:
    """A pack read when its turn comes: the member lists of all packs
    together are as long as the archive, and are not kept."""
    data = work.get(txn, "packs", pack_id)
    if data is None:
        raise CatalogError(f"pack {pack_id} is not in the work catalog")
    return PackRecord.from_json(data)


class StudyReader:
    """A study's instances as the work catalog holds them, in the order
    received, each with whether it has a copy on ``tier``; read with one
    cursor per index."""

    def __init__(self, work: Catalog, txn: lmdb.Transaction, tier: str) -> None:
        self.work = work
        self.txn = txn
        self.tier = tier
        self._series_of_study = txn.cursor(db=work.db["idx.series.study"])
        self._instances_of_series = txn.cursor(db=work.db["idx.instance.series"])
        # A patient's attributes, read once for all of its studies as long
        # as they are among the last few thousand read: every patient would
        # grow with the archive.
        self._patients_read: dict[bytes, dict[str, str]] = {}

    def group(
        self, study_key: bytes, study: dict[str, Any]
    ) -> list[tuple[NewInstance, bool]]:
        """The instances of the study whose record is ``study``."""
        rows = self._rows(study_key)
        if not rows:
            return []
        rows.sort(key=lambda row: (row[0]["received"], row[0]["key"]))
        patient = self._patient(encode_key(study["patient"]))
        senders = list(study.get("calling_aes", []))
        group = []
        for index, (data, series_attrs) in enumerate(rows):
            record = InstanceRecord.from_json(data["key"], data)
            has_copy = any(c.tier == self.tier for c in record.copies)
            record.copies = []
            # The writer lists a study's sending AEs as its instances come;
            # handing them out in order gives the study the same list.
            sender = senders[min(index, len(senders) - 1)] if senders else ""
            item = NewInstance(
                record, dict(patient), dict(study["attrs"]), dict(series_attrs), sender
            )
            group.append((item, has_copy))
        return group

    def _rows(self, study_key: bytes) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """Each instance's stored record, with its series' attributes."""
        db = self.work.db
        rows: list[tuple[dict[str, Any], dict[str, str]]] = []
        if not self._series_of_study.set_key(study_key):
            return rows
        for series_key in self._series_of_study.iternext_dup():
            raw_series = self.txn.get(series_key, db=db["series"])
            series = codec.loads(raw_series) if raw_series is not None else {}
            if not self._instances_of_series.set_key(series_key):
                continue
            for uid_key in self._instances_of_series.iternext_dup():
                raw = self.txn.get(uid_key, db=db["instances"])
                if raw is not None:
                    rows.append((codec.loads(raw), series.get("attrs", {})))
        return rows

    def _patient(self, patient_key: bytes) -> dict[str, str]:
        if patient_key not in self._patients_read:
            if len(self._patients_read) >= _PATIENTS_READ:
                self._patients_read.clear()
            raw = self.txn.get(patient_key, db=self.work.db["patients"])
            patient = codec.loads(raw) if raw is not None else {}
            self._patients_read[patient_key] = patient.get("attrs", {})
        return self._patients_read[patient_key]


def studies(
    work: Catalog, txn: lmdb.Transaction, tier: str
) -> Iterator[list[tuple[NewInstance, bool]]]:
    """Every study's instances of the work catalog (see :class:`StudyReader`),
    studies without any left out."""
    reader = StudyReader(work, txn, tier)
    for study_key, raw_study in txn.cursor(db=work.db["studies"]):
        group = reader.group(bytes(study_key), codec.loads(raw_study))
        if group:
            yield group


def finish(
    final: Catalog, last_journal: int, next_pack: int, archive: str = ""
) -> None:
    """Leave the rebuilt catalog ready to replicate again: nothing queued,
    no journal, numbers that continue after the mirror's, so that nothing
    the mirror holds is sent again or named twice; the lost appliance's
    ``archive`` id (when known), which its mirror and volumes name."""
    meta = final.db["meta"]
    try:
        with final.env.begin(write=True) as txn:
            # The bulk load queues and journals nothing; whatever another
            # way of writing it left there goes.
            txn.drop(final.db["replication"], delete=False)
            txn.drop(final.db["journal"], delete=False)
            txn.put(b"journal.next", str(last_journal + 1).encode(), db=meta)
            txn.put(b"mirror.journal_sent", str(last_journal).encode(), db=meta)
            txn.put(b"next_pack", str(next_pack).encode(), db=meta)
            if archive:
                txn.put(ARCHIVE_KEY, archive.encode(), db=meta)
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
