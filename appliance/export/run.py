"""One export run: the studies chosen, each recalled when it is not wholly
online, its instances sent, and every answer recorded.

Studies go in the order the appliance received them. A study that was not
online at all before the export recalled it is released from online again
once sent (when the migration rules' ``min_copies`` allow), so that
exporting an archive larger than the online tier does not fill it. A study
waiting for a shelved volume is passed over: an operator request asks for
the volume and the export goes on with the next study.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance import audit
from appliance.catalog import copies
from appliance.catalog.copies import StudyCopies
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.errors import ExportError
from appliance.export.report import NotSent, Refused, Report, hex_status
from appliance.export.sender import SOP_CLASS_NOT_SUPPORTED, Link, Pair, Sender, chunks
from appliance.export.state import ExportState, is_accepted
from appliance.hsm.migrator import Migrator
from appliance.hsm.recall import Recaller, RecallResult
from appliance.hsm.tiers import ONLINE, Tiers

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """What a run tells whoever watches it."""

    def begin(self, instances: int, size: int) -> None:
        """The run starts with ``instances`` (``size`` bytes) to send."""

    def recalling(self, study_uid: str, done: int, total: int) -> None:
        """A study is being recalled: ``done`` of ``total`` instances."""

    def answered(self, size: int) -> None:
        """The receiver answered for one instance of ``size`` bytes."""


class _Unwatched:
    """Progress nobody watches."""

    def begin(self, instances: int, size: int) -> None:
        pass

    def recalling(self, study_uid: str, done: int, total: int) -> None:
        pass

    def answered(self, size: int) -> None:
        pass


@dataclass
class Selection:
    """The studies an export covers, and what of them is left to send."""

    studies: list[StudyCopies]
    instances: int = 0
    size: int = 0
    # StudyInstanceUID -> instances the receiver already accepted
    accepted: Counter[str] = field(default_factory=Counter)


def select(catalog: Catalog, state: ExportState, since: float | None) -> Selection:
    """Every study received at or after ``since`` (seconds since the epoch;
    None for all), oldest first, with the instances not yet accepted."""
    studies = [
        study
        for study in copies.all_study_copies(catalog)
        if since is None or study.received >= since
    ]
    studies.sort(key=lambda study: (study.received, study.study_uid))
    chosen = Selection(studies)
    done_bytes: Counter[str] = Counter()
    for answer in state.accepted_in():
        chosen.accepted[answer.study] += 1
        done_bytes[answer.study] += answer.size
    for study in studies:
        uid = study.study_uid
        chosen.instances += max(0, study.instances - chosen.accepted[uid])
        chosen.size += max(0, study.size - done_bytes[uid])
    return chosen


class Exporter:
    """Sends the chosen studies to one destination, recording each answer."""

    def __init__(
        self,
        catalog: Catalog,
        tiers: Tiers,
        state: ExportState,
        sender: Sender,
        min_copies: int,
        progress: Progress | None = None,
    ) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.state = state
        self.sender = sender
        self.recaller = Recaller(catalog, tiers)
        self.migrator = Migrator(catalog, tiers, min_copies)
        self.progress: Progress = progress or _Unwatched()
        self._stop = ""
        # SOP Instance UIDs this run sent, or listed as refused or not sent.
        self._accounted: set[str] = set()

    def stop(self, why: str) -> None:
        """Stop after the instance being sent now (from a signal handler)."""
        self._stop = self._stop or why

    def run(self, selection: Selection) -> Report:
        """Send what is left of the selection; the report of this run."""
        destination = str(self.sender.destination)
        report = Report(destination, sent_before=sum(selection.accepted.values()))
        self.progress.begin(selection.instances, selection.size)
        position = 0
        try:
            if selection.instances:
                self.sender.check()
            while position < len(selection.studies) and not self._stop:
                self._study(selection.studies[position], report)
                # A stop leaves ``position`` at the study it interrupted.
                position += not self._stop
        except ExportError as exc:
            self.stop(str(exc))
        if self._stop:
            self._left_over(selection, position, report)
        report.finished = time.time()
        logger.info(
            "export to %s: %d sent, %d refused, %d not sent%s",
            destination,
            report.sent,
            len(report.refused),
            report.not_sent_count,
            f"; stopped: {report.stopped}" if report.stopped else "",
        )
        return report

    # -- one study ---------------------------------------------------------

    def _study(self, study: StudyCopies, report: Report) -> None:
        uid = study.study_uid
        records = self._unsent(uid)
        if not records:
            return
        recalled = None
        if any(record.copy_on(ONLINE) is None for record in records):
            was_online = study.copies.get(ONLINE, 0) > 0
            recalled = self._recall(uid)
            records = self._unsent(uid)
            release = not was_online and recalled.staged > 0
        else:
            release = False
        counted = report.sent, len(report.refused) + len(report.not_sent)
        try:
            self._send_study(uid, records, recalled, report)
        finally:
            self._audit(uid, report, *counted)
            if release:
                self.migrator.release(uid, ONLINE)

    def _audit(self, study_uid: str, report: Report, sent: int, missed: int) -> None:
        sent = report.sent - sent
        missed = len(report.refused) + len(report.not_sent) - missed
        if not sent and not missed:
            return
        target = self.sender.destination
        failure = f"{missed} instance(s) refused or not sent" if missed else ""
        peer = audit.Peer(target.ae_title, target.host)
        audit.study_exported(self.tiers.audit, self.catalog, study_uid, peer, failure)

    def _unsent(self, study_uid: str) -> list[InstanceRecord]:
        return [
            record
            for record in copies.instances_of(self.catalog, study_uid)
            if not self.state.accepted(record.sop_instance_uid)
        ]

    def _recall(self, study_uid: str) -> RecallResult:
        def progress(done: int, total: int) -> None:
            self.progress.recalling(study_uid, done, total)

        why = f"export to {self.sender.destination}"
        return self.recaller.recall(study_uid, progress, why=why)

    def _send_study(
        self,
        study_uid: str,
        records: list[InstanceRecord],
        recalled: RecallResult | None,
        report: Report,
    ) -> None:
        ready = [r for r in records if r.copy_on(ONLINE) is not None]
        lacking = [r for r in records if r.copy_on(ONLINE) is None]
        self._not_online(study_uid, lacking, recalled, report)
        by_pair: dict[Pair, list[InstanceRecord]] = {}
        for record in ready:
            by_pair.setdefault(_pair(record), []).append(record)
        for group in chunks(by_pair):
            link = self.sender.link(group)
            try:
                for pair in group:
                    for record in by_pair[pair]:
                        if self._stop:
                            return
                        self._send_one(link, record, report)
            finally:
                link.release()
        logger.info("study %s sent to %s", study_uid, self.sender.destination)

    def _send_one(self, link: Link, record: InstanceRecord, report: Report) -> None:
        """Send one instance and record the answer; ExportError when the
        association is lost."""
        uid = record.sop_instance_uid
        copy = record.copy_on(ONLINE)
        path = self.tiers.online.path_of(copy.location) if copy else None
        if path is None or not os.path.isfile(path):
            reason = "its online copy went away while the export ran; run again"
            report.not_sent.append(NotSent(record.study_uid, reason, uid))
        elif not link.accepts(_pair(record)):
            sop_class, syntax = _pair(record)
            comment = (
                f"the receiver rejected the presentation context for SOP class "
                f"{sop_class} in transfer syntax {syntax}"
            )
            self._refused(record, SOP_CLASS_NOT_SUPPORTED, comment, report)
        else:
            status, comment = link.send(Path(path), uid)
            self._answered(record, status, comment, report)
        self._accounted.add(uid)
        self.progress.answered(record.size)

    def _answered(
        self, record: InstanceRecord, status: int | None, comment: str, report: Report
    ) -> None:
        uid = record.sop_instance_uid
        if status is None:
            report.not_sent.append(NotSent(record.study_uid, comment, uid))
        elif is_accepted(status):
            self.state.record(uid, record.study_uid, status, record.size, comment)
            report.sent += 1
            report.sent_bytes += record.size
            report.warnings += status != 0
        else:
            self._refused(record, status, comment, report)

    def _refused(
        self, record: InstanceRecord, status: int, comment: str, report: Report
    ) -> None:
        uid = record.sop_instance_uid
        self.state.record(uid, record.study_uid, status, record.size, comment)
        report.refused.append(Refused(uid, record.study_uid, status, comment))
        # INFO: the report lists every refusal; the command prints them.
        logger.info(
            "instance %s of study %s refused by %s: status %s %s",
            uid,
            record.study_uid,
            self.sender.destination,
            hex_status(status),
            comment,
        )

    def _not_online(
        self,
        study_uid: str,
        records: list[InstanceRecord],
        recalled: RecallResult | None,
        report: Report,
    ) -> None:
        """Instances the recall could not bring online, and why."""
        if not records:
            return
        self._accounted.update(record.sop_instance_uid for record in records)
        if recalled is not None and recalled.waiting_for:
            volumes = list(recalled.waiting_for)
            reason = (
                f"waiting for volume(s) {', '.join(volumes)} to be loaded "
                "(appliance volumes requests); load, then run again"
            )
            report.not_sent.append(
                NotSent(study_uid, reason, instances=len(records), volumes=volumes)
            )
            return
        # One reason per instance: the recall's problems name instances of
        # the whole study, so each keeps those about itself.
        problems = recalled.problems if recalled else []
        uids = [r.sop_instance_uid for r in records]
        general = [p for p in problems if not any(uid in p for uid in uids)]
        for record in records:
            own = [p for p in problems if record.sop_instance_uid in p]
            why = "; ".join(own + general) or "no readable copy"
            report.not_sent.append(
                NotSent(study_uid, f"not recalled: {why}", record.sop_instance_uid)
            )

    def _left_over(self, selection: Selection, position: int, report: Report) -> None:
        """What a stopped run did not reach, per study."""
        reason = "not reached before the export stopped; run it again"
        left = 0
        for index, study in enumerate(selection.studies[position:]):
            uid = study.study_uid
            if index == 0:
                unsent = self._unsent(uid)
                count = sum(r.sop_instance_uid not in self._accounted for r in unsent)
            else:
                count = study.instances - selection.accepted[uid]
            if count > 0:
                report.not_sent.append(NotSent(uid, reason, instances=count))
                left += count
        if left:
            report.stopped = self._stop


def _pair(record: InstanceRecord) -> Pair:
    return record.attributes.get("SOPClassUID", ""), record.transfer_syntax
