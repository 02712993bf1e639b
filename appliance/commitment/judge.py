"""Whether the appliance commits to keeping an instance (PS3.4 J.3.2).

An instance is committed only when the catalog holds it under the SOP
Class the requester names, with its checksum, and a verified copy on a
tier of the appliance: the online tier (whose file is there), or nearline
or offline for an instance already released from online. With
``commitment.require_offsite`` its verified copy on the mirror is needed
too; until then the instance is waiting, not failed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum

from appliance.catalog.commitments import Transaction
from appliance.catalog.records import InstanceRecord
from appliance.catalog.replication import OFFSITE
from appliance.catalog.store import Catalog
from appliance.commitment.messages import (
    FAILED_CLASS_CONFLICT,
    FAILED_NO_SUCH_INSTANCE,
    FAILED_PROCESSING,
)
from appliance.errors import StorageError
from appliance.storage.online import TIER_NAME as ONLINE
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class State(Enum):
    COMMITTED = "committed"
    WAITING = "waiting"  # for its off-site copy
    FAILED = "failed"


@dataclass(frozen=True)
class Finding:
    """What was found for one referenced instance."""

    sop_class: str
    sop_instance: str
    state: State
    reason: int = 0  # the Failure Reason when failed

    @property
    def reference(self) -> list[str]:
        return [self.sop_class, self.sop_instance]


def judge(
    catalog: Catalog,
    online: OnlineTier,
    references: list[list[str]],
    require_offsite: bool,
) -> list[Finding]:
    """A finding per distinct reference, in the order first named, from one
    catalog snapshot. PS3.4 J.3.3.1.2 has the report cover the set of
    instances requested: a reference named twice is reported once, and an
    instance is never both committed and failed (see :func:`_conflicting`).
    """
    distinct = list(dict.fromkeys((sop_class, uid) for sop_class, uid in references))
    with catalog.read() as txn:
        records = [catalog.instance(txn, uid) for _sop_class, uid in distinct]
    findings = [
        _judge_one(sop_class, uid, record, online, require_offsite)
        for (sop_class, uid), record in zip(distinct, records, strict=True)
    ]
    return _conflicting(findings)


def _conflicting(findings: list[Finding]) -> list[Finding]:
    """``findings`` with every reference to an instance named under more
    than one SOP Class failed with 0x0119 (class/instance conflict): a
    modality that reads its report by SOP Instance UID would otherwise find
    the instance committed under one class and failed under the other, and
    might delete the only copy it has of what it meant."""
    classes: dict[str, set[str]] = {}
    for finding in findings:
        classes.setdefault(finding.sop_instance, set()).add(finding.sop_class)
    return [
        Finding(f.sop_class, f.sop_instance, State.FAILED, FAILED_CLASS_CONFLICT)
        if len(classes[f.sop_instance]) > 1 and f.state is not State.FAILED
        else f
        for f in findings
    ]


def _judge_one(
    sop_class: str,
    uid: str,
    record: InstanceRecord | None,
    online: OnlineTier,
    require_offsite: bool,
) -> Finding:
    if record is None:
        return Finding(sop_class, uid, State.FAILED, FAILED_NO_SUCH_INSTANCE)
    if record.attributes.get("SOPClassUID", "").strip() != sop_class:
        return Finding(sop_class, uid, State.FAILED, FAILED_CLASS_CONFLICT)
    if not _SHA256.fullmatch(record.sha256 or "") or not _kept_here(record, online):
        logger.warning(
            "storage commitment: instance %s has no verified copy with a "
            "checksum on this appliance",
            uid,
        )
        return Finding(sop_class, uid, State.FAILED, FAILED_PROCESSING)
    if require_offsite and record.copy_on(OFFSITE) is None:
        return Finding(sop_class, uid, State.WAITING)
    return Finding(sop_class, uid, State.COMMITTED)


def _kept_here(record: InstanceRecord, online: OnlineTier) -> bool:
    """A verified copy on a tier of the appliance; an online copy counts
    only while its file is there."""
    for copy in record.copies:
        if not copy.verified or copy.tier == OFFSITE:
            continue
        if copy.tier != ONLINE:
            return True
        try:
            if online.path_of(copy.location).is_file():
                return True
        except (StorageError, OSError):
            continue
    return False


def settle(
    transaction: Transaction,
    findings: list[Finding],
    now: float,
    deliver_after: float,
) -> bool:
    """Decide ``transaction`` from ``findings`` unless some instances still
    wait for their off-site copy and its deadline has not passed; whether
    it was decided. Instances that waited in vain fail with 0x0110."""
    waiting = any(finding.state is State.WAITING for finding in findings)
    if waiting and now < transaction.deadline:
        return False
    committed = [f.reference for f in findings if f.state is State.COMMITTED]
    failed = [
        [*f.reference, f"0x{f.reason or FAILED_PROCESSING:04X}"]
        for f in findings
        if f.state is not State.COMMITTED
    ]
    transaction.decide(committed, failed, deliver_after)
    return True
