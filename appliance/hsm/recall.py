"""Recall: bring a study's instances back online from the tiers below.

Each instance missing online is extracted from a pack that holds it, on
the nearest tier where that pack can be read now, checked against the
pack's manifest and the catalog's checksum, written durably under a new
online key, and then recorded: all the study's staged copies in one
transaction. Staged copies are ordinary online copies: the watermark rules
release them again when the tier fills up.

An instance whose only copies are on volumes nobody has loaded stays
where it is; the result names those volumes, and an operator request asks
for each of them.

The keys of each pack's files are noted on stable storage before any of
them is written (:mod:`.recall_notes`): the files of a recall killed
before its transaction are removed by the next clean-up.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance import audit, whole_steps
from appliance.audit import codes
from appliance.catalog import copies, requests
from appliance.catalog.copies import PackRecord
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.errors import (
    ApplianceError,
    KeyStoreError,
    PackError,
    SpoolError,
    TransportError,
    VolumeNotReachable,
)
from appliance.hsm import failures, recall_notes
from appliance.hsm.extraction import Outcome, extract_one, extraction_pool
from appliance.hsm.failures import Failure
from appliance.hsm.recall_notes import RecallNote
from appliance.hsm.tiers import OFFSITE, ONLINE, PackTier, Tiers
from appliance.metrics import events
from appliance.storage.durable import fsync_directory, translate_os_error
from appliance.storage.packs import PackReader
from appliance.storage.packs.manifest import PackedInstance

logger = logging.getLogger(__name__)

_NOT_FLUSHED = "cannot flush the recalled files"

# Called with (instances staged so far, instances to stage).
Progress = Callable[[int, int], None]
# Called with a recall's result before the copies that failed stop counting.
Failed = Callable[["RecallResult"], None]


@dataclass
class RecallResult:
    """What a recall did: instances staged, those it could not bring, and
    the volumes that must be loaded for the rest."""

    study_uid: str
    staged: int = 0
    missing: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # pack ID -> instances it failed to give (damaged or missing there)
    damaged: dict[str, list[str]] = field(default_factory=dict)
    # SOP Instance UID -> why its pack did not give it
    failures: dict[str, Failure] = field(default_factory=dict)
    # pack ID -> instances it gave but the online tier refused to write
    not_written: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing


class Recaller:
    """Stages studies from pack tiers onto the online tier."""

    def __init__(
        self,
        catalog: Catalog,
        tiers: Tiers,
        threads: int = 1,
        failed: Failed | None = None,
    ) -> None:
        """With ``threads`` above 1, that many instances are extracted at
        once, from all the packs a tier gives a study: decoding, hashing
        and the wait for each file's fsync overlap (a restore from the
        mirror uses it). ``failed`` is told what failed before the copies
        stop counting (a restore keeps the reasons for its report)."""
        self.catalog = catalog
        self.tiers = tiers
        self.threads = threads
        self.failed = failed
        self._packs: dict[str, PackRecord | None] = {}
        # Packs whose volume was found not to be there when read, though
        # it looked reachable (another archive's tape under its barcode).
        self._not_there: set[str] = set()
        self._kept: Executor | None = None
        # The first online key the recall under way gave out.
        self._first_key: str | None = None

    @contextmanager
    def kept_threads(self) -> Iterator[None]:
        """Keep one set of extraction threads for all the recalls made while
        the block runs, from one thread: a restore recalls study after study,
        and starting the threads anew for each costs it more than the
        extraction of a small study gains from them."""
        if self.threads <= 1 or self._kept is not None:
            yield
            return
        with extraction_pool(self.threads) as pool:
            self._kept = pool
            try:
                yield
            finally:
                self._kept = None

    def needs_recall(self, study_uid: str) -> bool:
        """Some instance of the study has no online copy."""
        with self.catalog.read() as txn:
            found = copies.study_copies(self.catalog, txn, study_uid)
        return found is not None and not found.complete_on(ONLINE)

    def nearest_source(self, study_uid: str) -> str:
        """Where a recall of the study would read first: the nearest pack
        tier holding an instance missing online, as "nearline", or
        "offline" with its volume ("offline L00001"); "" when nothing is
        missing or nothing below online holds it."""
        self._packs.clear()
        for record in copies.instances_of(self.catalog, study_uid):
            if record.copy_on(ONLINE):
                continue
            for tier_name, tier in self.tiers.packs.items():
                pack = self._pack_of(record, tier_name)
                if pack is None:
                    continue
                volume = tier.volume_of(pack.location)
                return f"{tier_name} {volume}" if volume else tier_name
        return ""

    def recall(
        self,
        study_uid: str,
        progress: Progress | None = None,
        why: str = "a study must be recalled",
    ) -> RecallResult:
        """Stage every instance of the study that is not online; ``why``
        goes into the operator request for a volume nobody has loaded."""
        self._packs.clear()
        self._not_there.clear()
        result = RecallResult(study_uid)
        wanted = [
            r
            for r in copies.instances_of(self.catalog, study_uid)
            if not r.copy_on(ONLINE)
        ]
        if not wanted:
            # Already online: nothing waits for a volume for it any more.
            requests.study_recalled(self.catalog, study_uid)
            return result
        # What recalls that died (or failed) before recording their copies
        # left online goes first; a recall in progress keeps its note.
        recall_notes.clean_up_or_warn(self.catalog, self.tiers.online)

        staged: dict[str, tuple[str, str]] = {}
        started = time.monotonic()
        self._first_key = None
        note = RecallNote(self.tiers.online, study_uid)

        def staged_one() -> None:
            if progress is not None:
                progress(len(staged), len(wanted))

        # Counting the copies and what follows is not cut in two by a stop
        # at once; the staging may be.
        with whole_steps.whole():
            try:
                with whole_steps.cuttable():
                    source = self._stage_all(wanted, staged, result, staged_one, note)
                unused = copies.add_copies(self.catalog, ONLINE, staged)
                for _tier, key in unused:
                    self.tiers.online.remove(key)
            except KeyboardInterrupt:
                # Stopped at once (a second Ctrl-C, SIGTERM): no later recall
                # in this process would clean up, so its files go now.
                # Extraction threads, if any, have stopped (see _settle).
                note.discard(self.catalog)
                raise
            except BaseException:
                # Whether the copies were recorded is the catalog's to say:
                # the next clean-up removes the noted files it does not count.
                note.close()
                raise
            note.end()
            return self._recorded(result, wanted, staged, unused, why, source, started)

    def _recorded(
        self,
        result: RecallResult,
        wanted: list[InstanceRecord],
        staged: dict[str, tuple[str, str]],
        unused: list[tuple[str, str]],
        why: str,
        source: str,
        started: float,
    ) -> RecallResult:
        """What follows a recall's counted copies: the result, the volume
        requests, damaged copies no longer counted, the log and audit."""
        study_uid = result.study_uid
        result.staged = len(staged) - len(unused)
        result.missing = [
            r.sop_instance_uid for r in wanted if r.sop_instance_uid not in staged
        ]
        result.waiting_for = self._volumes_for(
            [r for r in wanted if r.sop_instance_uid not in staged], result
        )
        self._ask_for_volumes(result, why)
        # Only now, after the copies are counted, does the study stop
        # waiting for the volumes it no longer needs: a recall cut short
        # before this leaves it asked for.
        requests.study_recalled(self.catalog, study_uid, result.waiting_for)
        if self.failed is not None and result.damaged:
            self.failed(result)
        self._stop_counting_damaged(result)
        if result.ok:
            self.catalog.touch_studies({study_uid})
        self._log(result, len(wanted))
        self._audit(result, len(wanted))
        if result.staged:
            events.recall_finished(source, time.monotonic() - started)
        return result

    @contextmanager
    def _extraction_pool(self) -> Iterator[Executor | None]:
        if self._kept is not None:
            yield self._kept
            return
        with extraction_pool(self.threads) as pool:
            yield pool

    def _stage_all(
        self,
        wanted: list[InstanceRecord],
        staged: dict[str, tuple[str, str]],
        result: RecallResult,
        staged_one: Callable[[], None],
        note: RecallNote,
    ) -> str:
        """Extract and flush what each tier can give; the tier that gave
        the last of them ("" if none)."""
        source = ""
        # Tier by tier, nearest first: what a damaged or missing pack could
        # not give is tried again from the next tier that holds it.
        with self._extraction_pool() as pool:
            try:
                for tier_name in self.tiers.packs:
                    remaining = [r for r in wanted if r.sop_instance_uid not in staged]
                    if tier_name == OFFSITE:
                        # The mirror is for what no volume of ours holds: an
                        # instance on a shelved volume waits for the operator.
                        remaining = [r for r in remaining if not self._on_shelf(r)]
                    before = len(staged)
                    groups = self._sources(remaining, tier_name)
                    if pool is None:
                        for pack, records in groups.items():
                            self._stage_pack(
                                pack, records, staged, result, staged_one, note
                            )
                    else:
                        self._stage_packs_at_once(
                            groups, staged, result, staged_one, note, pool
                        )
                    source = tier_name if len(staged) > before else source
            except _NotFlushed as exc:
                raise translate_os_error(exc.error, _NOT_FLUSHED) from exc.error
            # Each file was flushed where it was extracted; their folder's
            # new names are flushed here, once for all of them, before the
            # catalog counts them.
            self._flush_folders(staged)
        return source

    def _audit(self, result: RecallResult, wanted: int) -> None:
        if not result.staged and result.ok:
            return
        description = f"{result.staged} of {wanted} instance(s) recalled online"
        outcome = codes.SUCCESS if result.ok else codes.MINOR_FAILURE
        audit.study_copies_changed(
            self.tiers.audit,
            "study-recalled",
            self.catalog,
            result.study_uid,
            codes.CREATE,
            description,
            outcome,
        )

    def copy_out(self, record: InstanceRecord, destination: Path) -> bool:
        """Extract one instance from the nearest readable pack into
        ``destination`` (checked against the catalog); whether it worked."""
        return self.copy_out_from(record, destination) is not None

    def copy_out_from(self, record: InstanceRecord, destination: Path) -> str | None:
        """Like :meth:`copy_out`; the pack it came from ("nearline pack
        p-000000012"), or None when no pack gave it."""
        self._packs.clear()
        for tier_name, tier in self.tiers.packs.items():
            pack = self._pack_of(record, tier_name)
            if pack is None or not tier.is_reachable(pack.location):
                continue
            try:
                with tier.reader(
                    pack.location, pack.pack_id, pack.size, pack.sha256, self.tiers.keys
                ) as reader:
                    entry = reader.extract_to(
                        record.sop_instance_uid, destination, destination.parent
                    )
            except ApplianceError as exc:
                logger.warning(
                    "cannot read %s from %s: %s",
                    record.sop_instance_uid,
                    pack.pack_id,
                    exc,
                )
                continue
            if entry.meta.sha256 == record.sha256:
                return f"{tier_name} pack {pack.pack_id}"
            destination.unlink(missing_ok=True)
        return None

    # -- the steps --------------------------------------------------------------

    def _sources(
        self, records: list[InstanceRecord], tier_name: str
    ) -> dict[str, list[InstanceRecord]]:
        """The instances that have a pack on ``tier_name`` readable now,
        grouped by that pack."""
        tier = self.tiers.packs[tier_name]
        groups: dict[str, list[InstanceRecord]] = defaultdict(list)
        for record in records:
            pack = self._pack_of(record, tier_name)
            if pack is not None and self._reachable(tier, pack):
                groups[pack.pack_id].append(record)
        return groups

    def _reachable(self, tier: PackTier, pack: PackRecord) -> bool:
        return pack.pack_id not in self._not_there and tier.is_reachable(pack.location)

    def _volumes_for(
        self, records: list[InstanceRecord], result: RecallResult
    ) -> list[str]:
        """The volumes to load for instances no readable pack gave."""
        volumes: list[str] = []
        for record in records:
            found = None
            for tier_name, tier in self.tiers.packs.items():
                pack = self._pack_of(record, tier_name)
                if pack is not None and not self._reachable(tier, pack):
                    found = found or tier.volume_of(pack.location)
            if found is None:
                if not any(record.copy_on(name) for name in self.tiers.packs):
                    result.problems.append(
                        f"instance {record.sop_instance_uid} has no copy below online"
                    )
            elif found not in volumes:
                volumes.append(found)
        return volumes

    def _on_shelf(self, record: InstanceRecord) -> bool:
        """Whether a tier of ours holds the instance in a pack that cannot
        be read without a person (a volume on the shelf)."""
        for tier_name, tier in self.tiers.packs.items():
            pack = self._pack_of(record, tier_name)
            if tier_name != OFFSITE and pack and not self._reachable(tier, pack):
                return True
        return False

    def _pack_of(self, record: InstanceRecord, tier_name: str) -> PackRecord | None:
        copy = record.copy_on(tier_name)
        return self._pack(copy.location.partition("/")[0]) if copy else None

    def _pack(self, pack_id: str) -> PackRecord | None:
        # A pack record lists every member; a study's instances share a few
        # packs, so each is read once per recall, not once per instance.
        if pack_id not in self._packs:
            with self.catalog.read() as txn:
                data = self.catalog.get(txn, "packs", pack_id)
            self._packs[pack_id] = PackRecord.from_json(data) if data else None
        return self._packs[pack_id]

    def _stage_pack(
        self,
        pack_id: str,
        records: list[InstanceRecord],
        staged: dict[str, tuple[str, str]],
        result: RecallResult,
        staged_one: Callable[[], None],
        note: RecallNote,
    ) -> None:
        """Extract the instances of one pack, one after the other (a tape
        is read by one reader at a time)."""
        with ExitStack() as stack:
            reader = self._open_reader(pack_id, records, result, stack)
            if reader is None:
                return
            for record, key in self._keyed(records, note):
                outcome = self._extract(reader, record, key)
                _count(pack_id, record, key, outcome, staged, result, staged_one)

    def _stage_packs_at_once(
        self,
        groups: dict[str, list[InstanceRecord]],
        staged: dict[str, tuple[str, str]],
        result: RecallResult,
        staged_one: Callable[[], None],
        note: RecallNote,
        pool: Executor,
    ) -> None:
        """Hand every instance of every pack to the threads before waiting
        for any: they go on from one pack to the next without draining."""
        pending: list[_Pending] = []
        with ExitStack() as stack:
            # Nothing may still write once the packs are closed, or once
            # this has stopped on an error: the rest are waited for first.
            stack.callback(_settle, pending)
            for pack_id, records in groups.items():
                reader = self._open_reader(pack_id, records, result, stack)
                if reader is None:
                    continue
                for record, key in self._keyed(records, note):
                    future = pool.submit(self._extract, reader, record, key)
                    pending.append((pack_id, record, key, future))
            for pack_id, record, key, future in pending:
                outcome = future.result()
                _count(pack_id, record, key, outcome, staged, result, staged_one)

    def _open_reader(
        self,
        pack_id: str,
        records: list[InstanceRecord],
        result: RecallResult,
        stack: ExitStack,
    ) -> PackReader | None:
        """A reader of the pack, closed with ``stack``; None (and why in the
        result) when the pack cannot be read."""
        pack = self._pack(pack_id)
        tier: PackTier | None = self.tiers.pack_tier(pack.tier) if pack else None
        if pack is None or tier is None:
            result.problems.append(f"pack {pack_id} is not readable here")
            return None
        try:
            return stack.enter_context(
                tier.reader(
                    pack.location, pack.pack_id, pack.size, pack.sha256, self.tiers.keys
                )
            )
        except SpoolError:
            # The local disk refused the pack's copy: the recall stops, and
            # the pack is not to blame.
            raise
        except TransportError as exc:
            # The mirror could not be reached: nothing says the pack is bad.
            result.problems.append(f"pack {pack_id}: {exc}")
        except VolumeNotReachable as exc:
            # Its volume is not there after all: the pack is not to blame,
            # and the volume is asked for.
            result.problems.append(f"pack {pack_id}: {exc}")
            self._not_there.add(pack_id)
        except ApplianceError as exc:
            result.problems.append(f"pack {pack_id}: {exc}")
            failure = _unopened(exc)
            for record in records:
                _note_failure(result, pack_id, record, failure, say=False)
        return None

    def _keyed(
        self, records: list[InstanceRecord], note: RecallNote
    ) -> list[tuple[InstanceRecord, str]]:
        """A new online key for each instance, in order (the restore's tier
        notes each one too), on stable storage before any of their files
        exists. A note that cannot be written stops the recall: it says
        nothing of the pack. All the keys of a recall share one folder:
        one flush of it then makes all their names durable."""
        online = self.tiers.online
        if self._first_key is None:
            self._first_key = online.new_key()
        keyed = [(record, online.new_key(self._first_key)) for record in records]
        note.add([key for _record, key in keyed])
        return keyed

    def _extract(self, reader: PackReader, record: InstanceRecord, key: str) -> Outcome:
        """Extract one instance durably under ``key`` in this process."""
        entry = _entry_of(reader, record)
        if isinstance(entry, Failure):
            return entry
        online = self.tiers.online
        return extract_one(
            reader, entry, record.sha256, online.path_of(key), online.root
        )

    def _flush_folders(self, staged: dict[str, tuple[str, str]]) -> None:
        """Put the staged files' folder on stable storage (one: the
        recall's keys share it)."""
        online = self.tiers.online
        folders = sorted({online.path_of(key).parent for key, _ in staged.values()})
        try:
            for folder in folders:
                fsync_directory(folder)
        except OSError as exc:
            raise translate_os_error(exc, _NOT_FLUSHED) from exc

    def _stop_counting_damaged(self, result: RecallResult) -> None:
        """A copy that failed to give its instance no longer counts as
        verified: a release must not rely on it, and the scrub repairs it."""
        for pack_id, uids in result.damaged.items():
            # A full or read-only online tier is not the pack's fault.
            refused = result.not_written.get(pack_id, [])
            blamed = [uid for uid in uids if uid not in refused]
            if not blamed:
                continue
            changed = copies.mark_unverified(self.catalog, pack_id, blamed)
            logger.error(
                "pack %s is damaged or missing: %d copies of study %s no longer "
                "count as verified",
                pack_id,
                changed,
                result.study_uid,
            )

    def _ask_for_volumes(self, result: RecallResult, why: str) -> None:
        for volume in result.waiting_for:
            requests.request_volume(self.catalog, volume, why, result.study_uid)

    def _log(self, result: RecallResult, wanted: int) -> None:
        if result.ok:
            logger.info(
                "study %s recalled: %d instances staged online",
                result.study_uid,
                result.staged,
            )
            return
        waiting = ", ".join(result.waiting_for)
        # Waiting for a person to load a volume is the normal course of an
        # offline recall; anything else is an error.
        level = logging.ERROR if result.problems else logging.WARNING
        logger.log(
            level,
            "study %s recall incomplete: %d of %d instances staged; %s",
            result.study_uid,
            result.staged,
            wanted,
            "; ".join(result.problems)
            or f"waiting for volume(s) {waiting} to be loaded",
        )


def _entry_of(reader: PackReader, record: InstanceRecord) -> PackedInstance | Failure:
    """The instance's entry in the pack's manifest, or why there is none."""
    try:
        return reader.manifest().instance(record.sop_instance_uid)
    except LookupError:
        return Failure(failures.NOT_IN_MANIFEST)
    except ApplianceError as exc:
        return Failure(failures.MANIFEST_LOST, str(exc))


def _count(
    pack_id: str,
    record: InstanceRecord,
    key: str,
    outcome: Outcome,
    staged: dict[str, tuple[str, str]],
    result: RecallResult,
    staged_one: Callable[[], None],
) -> None:
    """Count what the extraction under ``key`` gave."""
    if isinstance(outcome, OSError):
        raise _NotFlushed(outcome)
    if outcome is not None:
        _note_failure(result, pack_id, record, outcome)
        return
    staged[record.sop_instance_uid] = (key, record.sha256)
    staged_one()


# An instance of a pack with its new key, handed to a thread.
_Pending = tuple[str, InstanceRecord, str, Future[Outcome]]


def _settle(pending: list[_Pending]) -> None:
    futures = [future for *_rest, future in pending]
    for future in futures:
        future.cancel()
    wait(futures)


def _note_failure(
    result: RecallResult,
    pack_id: str,
    record: InstanceRecord,
    failure: Failure | None,
    say: bool = True,
) -> None:
    """Count an instance the pack did not give, and why (in the problems
    too with ``say``; a pack that gave nothing is one problem)."""
    failure = failure or Failure(failures.MEMBER_DAMAGED)
    uid = record.sop_instance_uid
    if say:
        result.problems.append(f"instance {uid}: {failure.describe()}")
    result.damaged.setdefault(pack_id, []).append(uid)
    result.failures[uid] = failure
    if failure.kind == failures.NOT_WRITTEN:
        result.not_written.setdefault(pack_id, []).append(uid)


def _unopened(error: ApplianceError) -> Failure:
    """Why a pack that does not open gave nothing: a key that does not
    unwrap its data key, or a header that is not a pack's, is not a fault
    of where the pack is kept."""
    if isinstance(error, KeyStoreError | PackError):
        return Failure(failures.PACK_UNOPENED, str(error))
    return Failure(failures.PACK_UNREAD, str(error))


class _NotFlushed(Exception):
    """The disk would not flush an extracted file: the recall stops, and the
    pack it came from is not to blame (unlike the errors of extracting)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error
