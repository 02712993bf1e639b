"""A restore drill: a sample of studies restored from the mirror into a
scratch folder and checked, while the archive goes on serving.

For each study of the sample, the packs holding its off-site copies are
fetched from the mirror (within the restore's rate) and checked against
the catalog's record of them; every instance is extracted, its size and
SHA-256 compared with the catalog's, and its data set read to compare the
attributes the catalog answers C-FIND with (patient, study, series and
instance level) with its own. Nothing is written outside the scratch
folder: the catalog is only read, the tiers are not opened.

The catalog keeps a patient's, study's and series' attributes from the
first instance stored, and instances of one study may disagree (a
study's Institution Name as two modalities wrote it, say). So those
levels are judged once every instance of the sample is read: the
catalog's answer is wrong only when no instance of that study or series
holds it. A patient's answer is judged so only when the sample holds
every study of the patient; else the instance it came from may not be in
the sample, and a difference proves nothing.

What the catalog holds is read once, at the start, in one read
transaction: a drill that runs for an hour must not hold LMDB's oldest
reader for that long, and the packs on the mirror never change.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pydicom
from pydicom.errors import InvalidDicomError

from appliance.catalog import coercion
from appliance.catalog.copies import _instances_of, all_study_copies
from appliance.catalog.patients import is_corrected
from appliance.catalog.records import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    InstanceRecord,
    collect,
    patient_key,
    text_of,
)
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import Catalog
from appliance.errors import DrillError, KeyStoreError, PackError, TransportError
from appliance.restore.mirror import Fetcher, MirrorContents, RemoteFile
from appliance.storage.keys import KeyStore
from appliance.storage.packs import PackReader

logger = logging.getLogger(__name__)

# Called with (instances checked so far, instances in the sample).
Progress = Callable[[int, int], None]

_LEVELS = (
    ("patient", PATIENT_KEYWORDS),
    ("study", STUDY_KEYWORDS),
    ("series", SERIES_KEYWORDS),
    ("instance", INSTANCE_KEYWORDS),
)


@dataclass(frozen=True)
class Failure:
    """Something a drill found wrong. ``sop_instance_uid`` is empty when
    no one instance is at fault (a pack, or a study's, series' or
    patient's answer). Never an attribute's value: those may name the
    patient, and failures reach logs and files."""

    study_uid: str
    sop_instance_uid: str
    what: str


@dataclass
class DrillResult:
    """What a drill restored, how fast, and what it found wrong."""

    started: float  # seconds since the epoch
    studies: list[str]
    instances: int = 0  # in the sample
    bytes: int = 0  # of the instances restored and verified
    mirror_bytes: int = 0  # of the packs read from the mirror
    seconds: float = 0.0  # the time to restore: fetch, extract, check
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.instances > 0 and not self.failures

    @property
    def rate(self) -> float:
        """Bytes restored per second (0 when nothing was timed)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def fail(self, study_uid: str, sop_instance_uid: str, what: str) -> None:
        failure = Failure(study_uid, sop_instance_uid, what)
        logger.warning("drill: %s", failure_text(failure))
        self.failures.append(failure)


def failure_text(failure: Failure) -> str:
    """A failure in words: its study, its instance if one is at fault."""
    if failure.sop_instance_uid:
        where = f"study {failure.study_uid}, instance {failure.sop_instance_uid}"
    else:
        where = f"study {failure.study_uid}"
    return f"{where}: {failure.what}"


@dataclass(frozen=True)
class Expected:
    """One instance of the sample, as the catalog knows it."""

    record: InstanceRecord
    pack_id: str
    # What the catalog answers at each level: level -> keyword -> text.
    answers: dict[str, dict[str, str]]
    # The patient's record when registration corrected it: the restored
    # data set is compared as it would be sent, coerced.
    patient: dict[str, Any] | None = None
    # How many studies the catalog holds for the patient.
    patient_studies: int = 0


# A level's keyword and the texts the sampled instances give it (None for
# an instance without it).
Seen = dict[str, set[str | None]]


@dataclass
class _Entity:
    """A patient, study or series of the sample: what the catalog answers
    for it, and what each of its restored instances holds."""

    level: str
    study_uid: str  # of its first instance in the sample, for the failure
    answers: dict[str, str]
    seen: Seen = field(default_factory=dict)
    studies: set[str] = field(default_factory=set)
    patient_studies: int = 0

    def add(self, study_uid: str, found: dict[str, str]) -> None:
        """Note what one restored instance holds."""
        for keyword in self.answers.keys() | found.keys() | self.seen.keys():
            values = self.seen.setdefault(keyword, set())
            if not values and self.studies:
                values.add(None)  # first seen now: the instances before lack it
            values.add(found.get(keyword))
        self.studies.add(study_uid)

    def problems(self) -> list[str]:
        """Where the catalog's answer matches none of the instances."""
        if self.level == "patient" and len(self.studies) < self.patient_studies:
            return []
        problems = []
        for keyword in sorted(self.seen):
            values, held = self.seen[keyword], self.answers.get(keyword)
            if held in values:
                continue
            if held is None:
                how = "in the data, not in the catalog"
            elif values == {None}:
                how = "in the catalog, not in the data"
            else:
                how = "the catalog's answer differs"
            problems.append(f"{self.level} {keyword}: {how}")
        return problems


@dataclass(frozen=True)
class PackExpected:
    """A pack the sample needs, as the catalog recorded it."""

    size: int
    sha256: str


def choose_sample(catalog: Catalog, size: int, chance: random.Random) -> list[str]:
    """Up to ``size`` studies, at random, among those whose every instance
    has a verified off-site copy."""
    replicated = [
        study.study_uid
        for study in all_study_copies(catalog)
        if study.complete_on(OFFSITE)
    ]
    if not replicated:
        raise DrillError(
            "no study has a verified copy on the mirror yet: nothing to drill"
        )
    return sorted(chance.sample(replicated, min(size, len(replicated))))


class Drill:
    """Restores a sample from the mirror into ``folder`` and checks it."""

    def __init__(
        self,
        catalog: Catalog,
        fetcher: Fetcher,
        contents: MirrorContents,
        keys: KeyStore,
        folder: Path,
        reserved_bytes: int = 0,
    ) -> None:
        self.catalog = catalog
        self.fetcher = fetcher
        self.contents = contents
        self.keys = keys
        self.folder = folder
        self.reserved_bytes = reserved_bytes

    def run(self, sample: list[str], progress: Progress | None = None) -> DrillResult:
        """Restore and check every instance of the studies in ``sample``."""
        result = DrillResult(time.time(), list(sample))
        expected, packs = self._expected(sample)
        result.instances = len(expected)
        found = {item.record.study_uid for item in expected}
        for study_uid in sample:
            if study_uid not in found:  # deleted or replaced since it was drawn
                result.fail(study_uid, "", "no instance left with an off-site copy")
        by_pack: dict[str, list[Expected]] = {}
        for item in expected:
            by_pack.setdefault(item.pack_id, []).append(item)

        self.folder.mkdir(parents=True, exist_ok=True)
        self._entities: dict[tuple[str, str], _Entity] = {}
        started = time.monotonic()
        done = 0
        for pack_id in sorted(by_pack):
            items = by_pack[pack_id]
            self._restore_pack(pack_id, packs.get(pack_id), items, result)
            done += len(items)
            if progress is not None:
                progress(done, len(expected))
        result.seconds = time.monotonic() - started
        for entity in self._entities.values():
            for problem in entity.problems():
                result.fail(entity.study_uid, "", problem)
        return result

    def _expected(
        self, sample: list[str]
    ) -> tuple[list[Expected], dict[str, PackExpected]]:
        """The sample's instances and their packs, in one read snapshot."""
        expected: list[Expected] = []
        packs: dict[str, PackExpected] = {}
        with self.catalog.read() as txn:
            for study_uid in sample:
                for record in _instances_of(self.catalog, txn, study_uid):
                    copy = record.copy_on(OFFSITE)
                    if copy is None:
                        # Replaced since the sample was drawn: queued for the
                        # mirror, which the recovery point counts.
                        continue
                    pack_id = copy.location.partition("/")[0]
                    answers = _answers(self.catalog, txn, record)
                    patient = self.catalog.get(txn, "patients", record.patient)
                    corrected = patient if is_corrected(patient) else None
                    studies = int((patient or {}).get("studies", 0))
                    expected.append(
                        Expected(record, pack_id, answers, corrected, studies)
                    )
                    pack = self.catalog.get(txn, "packs", pack_id)
                    if pack is not None:
                        packs[pack_id] = PackExpected(pack["size"], pack["sha256"])
        return expected, packs

    def _restore_pack(
        self,
        pack_id: str,
        recorded: PackExpected | None,
        items: list[Expected],
        result: DrillResult,
    ) -> None:
        """Fetch one pack, check it, and check the sample's instances in it."""
        remote = self.contents.packs.get(pack_id)
        if remote is None or recorded is None:
            why = (
                f"pack {pack_id} is not on the mirror"
                if remote is None
                else f"the catalog has no record of pack {pack_id}"
            )
            for item in items:
                result.fail(item.record.study_uid, item.record.sop_instance_uid, why)
            return

        path = self.folder / f"{pack_id}.pack"
        try:
            self._make_room(remote, items)
            try:
                fetched = self.fetcher.fetch(remote.name, path)
            except TransportError as exc:
                for item in items:
                    uid = item.record.sop_instance_uid
                    result.fail(item.record.study_uid, uid, f"pack {pack_id}: {exc}")
                return
            result.mirror_bytes += fetched.size
            if (fetched.size, fetched.sha256) != (recorded.size, recorded.sha256):
                # Each instance is still checked: the failures say which.
                how = (
                    f"{fetched.size} bytes read, {recorded.size} recorded"
                    if fetched.size != recorded.size
                    else "another SHA-256"
                )
                why = f"pack {pack_id} on the mirror differs from its record: {how}"
                for study_uid in sorted({i.record.study_uid for i in items}):
                    result.fail(study_uid, "", why)
            self._check_instances(path, pack_id, items, result)
        finally:
            path.unlink(missing_ok=True)

    def _check_instances(
        self, path: Path, pack_id: str, items: list[Expected], result: DrillResult
    ) -> None:
        try:
            reader = PackReader.open(path, self.keys)
        except (PackError, KeyStoreError) as exc:
            # A damaged header, or a master key the store lacks.
            for item in items:
                uid = item.record.sop_instance_uid
                why = f"pack {pack_id} cannot be read: {exc}"
                result.fail(item.record.study_uid, uid, why)
            return
        with reader:
            for number, item in enumerate(items):
                self._check_instance(reader, number, item, result)

    def _check_instance(
        self, reader: PackReader, number: int, item: Expected, result: DrillResult
    ) -> None:
        """Extract one instance, then check its bytes and its attributes."""
        record = item.record
        study_uid, uid = record.study_uid, record.sop_instance_uid
        destination = self.folder / "instances" / f"{number:06d}.dcm"
        try:
            reader.extract_to(uid, destination, self.folder)
        except PackError as exc:
            result.fail(study_uid, uid, f"not restored from pack {item.pack_id}: {exc}")
            return
        try:
            size, sha256 = _size_and_sha256(destination)
            if size != record.size:
                result.fail(study_uid, uid, f"{size} bytes, {record.size} recorded")
            elif sha256 != record.sha256:
                result.fail(study_uid, uid, "SHA-256 differs from the catalog's")
            else:
                result.bytes += size
                problems, found = _differences(destination, item)
                for problem in problems:
                    result.fail(study_uid, uid, problem)
                self._note(item, found)
        finally:
            destination.unlink(missing_ok=True)

    def _note(self, item: Expected, found: dict[str, dict[str, str]]) -> None:
        """What a restored instance holds at the patient, study and series
        levels, judged once the whole sample is read."""
        record = item.record
        keys = {
            "patient": record.patient,
            "study": record.study_uid,
            "series": record.series_uid,
        }
        for level, values in found.items():
            entity = self._entities.get((level, keys[level]))
            if entity is None:
                entity = _Entity(
                    level,
                    record.study_uid,
                    item.answers[level],
                    patient_studies=item.patient_studies,
                )
                self._entities[(level, keys[level])] = entity
            entity.add(record.study_uid, values)

    def _make_room(self, remote: RemoteFile, items: list[Expected]) -> None:
        """Stop before a pack fills the disk the archive may share."""
        largest = max(item.record.size for item in items)
        free = shutil.disk_usage(self.folder).free
        needed = remote.size + largest + self.reserved_bytes
        if free < needed:
            raise DrillError(
                f"no room in {self.folder} for pack {remote.name} "
                f"({remote.size} bytes): {free} bytes free, {needed} needed with "
                "storage.reserved_bytes"
            )


def _answers(
    catalog: Catalog, txn: lmdb.Transaction, record: InstanceRecord
) -> dict[str, dict[str, str]]:
    """What the catalog holds for the instance and its series, study and
    patient: the values C-FIND answers with."""
    patient = catalog.get(txn, "patients", record.patient) or {}
    study = catalog.get(txn, "studies", record.study_uid) or {}
    series = catalog.get(txn, "series", record.series_uid) or {}
    return {
        "patient": dict(patient.get("attrs", {})),
        "study": dict(study.get("attrs", {})),
        "series": dict(series.get("attrs", {})),
        "instance": dict(record.attributes),
    }


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _differences(
    path: Path, item: Expected
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Where the restored data set and the catalog's answers for the
    instance disagree, by keyword (values left out: they may name the
    patient); and what the data set holds at the patient, study and series
    levels, which the whole sample judges."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return [f"restored bytes do not read as DICOM: {exc}"], {}
    if item.patient is not None:
        coercion.apply(dataset, item.patient)
    record = item.record
    levels = {level: collect(dataset, keywords) for level, keywords in _LEVELS}
    # The instance's own answers are judged at once: they come from it alone.
    instance = _Entity("instance", record.study_uid, item.answers["instance"])
    instance.add(record.study_uid, levels.pop("instance"))
    problems = instance.problems()
    own = {
        "StudyInstanceUID": (record.study_uid, text_of(dataset, "StudyInstanceUID")),
        "SeriesInstanceUID": (record.series_uid, text_of(dataset, "SeriesInstanceUID")),
        "patient": (
            record.patient,
            patient_key(
                text_of(dataset, "PatientID") or "",
                text_of(dataset, "IssuerOfPatientID") or "",
            ),
        ),
        "TransferSyntaxUID": (
            record.transfer_syntax,
            str(dataset.file_meta.get("TransferSyntaxUID", "")),
        ),
    }
    for name, (catalog_value, data_value) in own.items():
        if catalog_value != data_value:
            problems.append(f"instance record {name}: the catalog's differs")
    return problems, levels
