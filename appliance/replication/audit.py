"""The rolling audit of the mirror: read packs back, check every instance,
and send again what the mirror lost.

Each run checks the packs checked longest ago first and notes when each
was found good, so that regular runs of ``appliance replication verify``
cover the whole mirror in turn, and a run cut short resumes where the
order says.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.catalog import replication
from appliance.catalog.copies import PackRecord
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, TransportError
from appliance.storage.keys import KeyStore
from appliance.storage.packs import PackReader
from appliance.storage.packs.report import VerifyReport
from appliance.storage.streams import reader_over

logger = logging.getLogger(__name__)


@dataclass
class AuditReport:
    """What one audit run found."""

    checked: int = 0
    good: int = 0
    damaged: int = 0  # packs damaged or missing
    bad: list[str] = field(default_factory=list)  # what is wrong, by instance
    queued_again: int = 0


def audit(
    catalog: Catalog,
    transport: Any,
    keys: KeyStore | None,
    limit: int | None,
    progress: Callable[[int, int], None] | None = None,
    report: AuditReport | None = None,
) -> AuditReport:
    """Check up to ``limit`` packs on the mirror (all when None), noting
    what is found in ``report`` (a new one when None) pack by pack: a
    mirror lost half way raises TransportError, and the caller's report
    then says what was queued again before it."""
    packs = replication.offsite_packs(catalog)
    if limit is not None:
        packs = packs[:limit]
    report = AuditReport() if report is None else report
    for done, pack in enumerate(packs, start=1):
        problems = _check(pack, transport, keys)
        report.checked += 1
        if problems:
            report.damaged += 1
            report.bad += [f"pack {pack.pack_id}: {line}" for line in problems]
            lost = (
                list(pack.members) if _whole_pack(problems) else _named(problems, pack)
            )
            report.queued_again += replication.requeue(catalog, pack, lost)
            logger.error(
                "mirror pack %s damaged or missing: %s; %d instance(s) queued again",
                pack.pack_id,
                "; ".join(problems),
                len(lost),
            )
        else:
            report.good += 1
            replication.set_pack_verified(catalog, pack.pack_id, time.time())
        if progress is not None:
            progress(done, len(packs))
    return report


def _check(pack: PackRecord, transport: Any, keys: KeyStore | None) -> list[str]:
    """What is wrong with the pack on the mirror; nothing when it is good.

    A mirror that cannot be reached raises (TransportError): an outage must
    not pass for lost packs.
    """
    size = transport.size(pack.location)
    if size is None:
        return ["missing from the mirror"]
    if size != pack.size:
        return [f"holds {size} bytes, {pack.size} expected"]

    digest = hashlib.sha256()

    def hashed(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    stream = reader_over(hashed(iter(transport.get(pack.location))))
    try:
        reader = PackReader(stream, keys)
        if reader.pack_id != pack.pack_id:
            return [f"holds pack {reader.pack_id}, not {pack.pack_id}"]
        result = reader.read_all()
        while stream.read(1 << 20):
            pass  # the rest of the file, for its checksum
    except TransportError:
        raise
    except ApplianceError as exc:
        return [f"cannot be opened: {exc}"]
    finally:
        stream.close()
    if pack.lost:
        return _still_counted(result, pack.lost)
    problems = list(result.problems) + [check.describe() for check in result.bad]
    if not problems and digest.hexdigest() != pack.sha256:
        problems.append("its bytes differ from the pack that was sent")
    return problems


def _still_counted(result: VerifyReport, lost: list[str]) -> list[str]:
    """What is wrong with the members of a partly lost pack that still
    count. The damage found before was reported and its instances queued
    again; the file is known to differ from what was sent. An instance
    that cannot be checked any more (no manifest) is new damage."""
    if result.manifest is None:
        return list(result.problems) + [check.describe() for check in result.bad]
    return [
        check.describe() for check in result.bad if check.sop_instance_uid not in lost
    ]


def _whole_pack(problems: list[str]) -> bool:
    whole = ("missing", "holds", "cannot be opened", "its bytes differ")
    return any(p.startswith(whole) for p in problems)


def _named(problems: list[str], pack: PackRecord) -> list[str]:
    """The instances a problem names; every instance when none is named
    (a damaged manifest puts the whole pack in doubt)."""
    named = [uid for uid in pack.members if any(uid in line for line in problems)]
    return named or [uid for uid in pack.members if uid not in pack.lost]
