"""The numbers the status commands and the admin API report, computed once.

``appliance status``, ``tiers``, ``replication status``, ``prefetch
status`` and ``dr report`` print what these functions return, and the
HTTP server's ``/api`` routes answer with the same objects; neither
computes a figure of its own. Every function takes an open catalog, so
that the web child can pass the one it holds (LMDB allows one environment
per process) and a command the one it opened.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from appliance.catalog import commitments, copies, replication, requests
from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.prefetch import readiness
from appliance.storage.lock import serving
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

LEVELS = ("patients", "studies", "series", "instances")
TIER_ORDER = ("online", "nearline", "offline")


def archive_status(config: Config, catalog: Catalog) -> dict[str, Any]:
    """Counts, bytes per tier, the restore's and the scrub's numbers: what
    ``appliance status --json`` prints."""
    counts = catalog.counts()
    online = OnlineTier(config.online_path)
    free = online.usage()[1] if config.online_path.exists() else 0
    report: dict[str, Any] = {name: counts[name] for name in LEVELS}
    report["tiers"] = {
        "online": {
            "path": str(config.online_path),
            "instance_bytes": counts.get("bytes.online", 0),
            "free_bytes": free,
        },
        **{
            tier: {
                "instance_bytes": counts.get(f"bytes.{tier}", 0),
                "pack_bytes": counts.get(f"packbytes.{tier}", 0),
            }
            for tier in ("nearline", "offline")
        },
    }
    restore = restore_numbers(config)
    if restore is not None:
        report["restore"] = restore
    report["scrub"] = scrub_numbers(config)
    report["commitment"] = {"pending_reports": commitments.pending_count(catalog)}
    report["replication"] = mirror_state(config, catalog)
    return report


def mirror_state(config: Config, catalog: Catalog) -> dict[str, str]:
    """The ``state`` and ``summary`` of :func:`replication_status` alone,
    without counting the queue."""
    from appliance.replication import health

    waiting = len(replication.queued(catalog, limit=1))
    paused = _rate_in_force(config)[1]
    return _mirror_state(config, health.read_trouble(catalog), paused, waiting)


def restore_numbers(config: Config) -> dict[str, Any] | None:
    """The running (or last) restore's numbers, if this appliance had one."""
    from appliance.restore.progress import Snapshot, is_pending, read

    folder = config.restore_folder
    snapshot = read(folder)
    if snapshot is None and not is_pending(folder):
        return None
    if snapshot is None:
        # The catalog is back; no data phase has written its numbers yet.
        snapshot = Snapshot(state="starting")
    numbers = snapshot.as_json()
    numbers["pending"] = is_pending(folder)
    numbers["seconds_left"] = snapshot.seconds_left
    return numbers


def scrub_numbers(config: Config) -> dict[str, int]:
    """What the scrub found: instances with no good copy, orphans."""
    from appliance.scrub import state

    saved = state.load(state.folder_of(config.data_dir))
    orphans = sum(len(found) for found in saved.orphans.values())
    return {"lost": len(saved.lost), "orphans": orphans}


def tier_rows(config: Config, catalog: Catalog, opened: Any) -> list[dict[str, Any]]:
    """Per tier: studies complete there, bytes, usage, capacity and
    watermarks (what ``appliance tiers --json`` prints)."""
    from appliance.hsm.jobs import MigrationJob

    counts = catalog.counts()
    studies = {tier: 0 for tier in TIER_ORDER}
    for study in copies.all_study_copies(catalog):
        for tier in TIER_ORDER:
            studies[tier] += study.complete_on(tier)

    job = MigrationJob(catalog, opened, config)
    rows = []
    for tier in TIER_ORDER:
        usage = job.usage(tier)
        rows.append(
            {
                "tier": tier,
                "studies": studies[tier],
                "instance_bytes": counts.get(f"bytes.{tier}", 0),
                "pack_bytes": counts.get(f"packbytes.{tier}", 0),
                "used_bytes": usage.used if usage else None,
                "capacity_bytes": usage.capacity if usage else None,
                "high_watermark": usage.high if usage else None,
                "low_watermark": usage.low if usage else None,
            }
        )
    return rows


def replication_status(config: Config, catalog: Catalog) -> dict[str, Any]:
    """State, queue, recovery point, rate in force, last snapshot and the
    cause that stops replication, if one does (what ``appliance
    replication status --json`` prints).

    ``state`` is ``refused`` (the mirror refuses us), ``failing`` (a round
    failed and is tried again), ``not running`` (instances wait and the
    service that sends them is not running), ``paused`` (the rate in force),
    ``sending`` (instances wait), ``up to date``, or ``off``
    (``replication.enabled`` is false); ``summary`` says it in words.
    """
    from appliance.replication import health

    state = replication.queue_state(catalog)
    counts = catalog.counts()
    snapshot_time = replication.mirror_mark(catalog, "snapshot_time")
    journal_sent = replication.mirror_mark(catalog, "journal_sent")
    trouble = health.read_trouble(catalog)
    in_force, paused = _rate_in_force(config)
    return {
        "mirror": config.get("mirror.kind"),
        **_mirror_state(config, trouble, paused, state.instances),
        "queued_instances": state.instances,
        "queued_bytes": state.bytes,
        "recovery_point_seconds": round(state.recovery_point_age, 1),
        "offsite_instance_bytes": counts.get("bytes.offsite", 0),
        "offsite_pack_bytes": counts.get("packbytes.offsite", 0),
        "rate": in_force,
        "last_snapshot": _iso(snapshot_time) if snapshot_time else None,
        "journal_entries_sent": journal_sent,
        "trouble": (
            {
                "kind": trouble.kind,
                "cause": trouble.cause,
                "since": _iso(trouble.since),
            }
            if trouble
            else None
        ),
        "last_error": trouble.cause if trouble else None,
    }


def _mirror_state(
    config: Config, trouble: Any, paused: bool, waiting: int
) -> dict[str, str]:
    """``state`` and ``summary`` of :func:`replication_status`: never "up to
    date" while instances wait or replication is stopped."""
    from appliance.replication import health

    if not config.get("replication.enabled"):
        return {"state": "off", "summary": "off (replication.enabled = false)"}
    if trouble is not None:
        return {"state": trouble.kind, "summary": health.describe(trouble)}
    if waiting and not serving(config.online_path):
        return {
            "state": "not running",
            "summary": "not sending: the service is not running",
        }
    if paused:
        return {"state": "paused", "summary": "paused by the rate in force"}
    if waiting:
        return {"state": "sending", "summary": "sending"}
    return {"state": "up to date", "summary": "up to date"}


def _rate_in_force(config: Config) -> tuple[str, bool]:
    """The mirror's rate in force now, in words, and whether it is pause."""
    from appliance.replication import bandwidth
    from appliance.replication.process import override_path

    timetable = bandwidth.parse_timetable(config.get("replication.timetable"))
    now = datetime.now().astimezone()
    try:
        override = bandwidth.read_override(override_path(config))
    except (ValueError, ApplianceError) as exc:
        logger.warning("the rate override is unreadable and ignored: %s", exc)
        override = None
    if override is not None and override.active(now):
        return override.description, override.rate == 0
    slot = timetable.slot_at(now)
    return slot.description, slot.rate == 0


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def empty_prefetch_status() -> dict[str, Any]:
    """What ``prefetch status --json`` prints before any prefetch ran."""
    hits = {"days": readiness.HIT_RATE_DAYS, "online": 0, "retrieved": 0}
    return {"appointments": [], "hit_rate": hits, "ready": 0, "late": 0, "waiting": 0}


def prefetch_status(config: Config, catalog: Catalog) -> dict[str, Any]:
    """The last planner run's plans with their appointments, and counts
    (what ``appliance prefetch status --json`` prints)."""
    active = readiness.active_plans(catalog)
    online, retrieved = readiness.hit_rate(catalog, time.time())
    hits = {"days": readiness.HIT_RATE_DAYS, "online": online, "retrieved": retrieved}
    rows = []
    for plan, appointment in active:
        row = plan.as_json()
        row["state"] = appointment.state
        row["patients"] = [[p.patient_id, p.issuer] for p in appointment.patients]
        known_procedure = config.procedures.get(appointment.procedure_code)
        row["modality"] = appointment.modality or (
            known_procedure.modality if known_procedure else ""
        )
        row["procedure_code"] = appointment.procedure_code
        rows.append(row)
    counted = readiness.tally([plan for plan, _appointment in active])
    return {
        "appointments": rows,
        "hit_rate": hits,
        "ready": counted.ready,
        "late": counted.late,
        "waiting": counted.waiting,
    }


def dr_report(config: Config, catalog: Catalog, last: int) -> tuple[Any, Any, Any]:
    """The last ``last`` drills (oldest first), the mirror's queue (the
    recovery point) and the full-restore estimate: ``appliance dr report``."""
    from appliance.restore import drill_records, objectives
    from appliance.restore.drill_job import drills_folder

    drills = drill_records.recent(drills_folder(config), last)
    waiting = objectives.recovery_point(catalog)
    estimate = objectives.full_restore(
        catalog, config.get("restore.timetable"), drills, datetime.now()
    )
    return drills, waiting, estimate


def operator_requests(catalog: Catalog) -> list[requests.OperatorRequest]:
    """Open operator requests, oldest first."""
    return requests.open_requests(catalog)


def volume_rows(library: Any) -> list[dict[str, Any]]:
    """Every labelled volume: reachable or on the shelf, read only (None
    when the library cannot tell), room, packs (None when on the shelf):
    what ``appliance volumes list`` prints."""
    rows = []
    for info in library.list_volumes():
        packs = len(library.list_packs(info.label)) if info.reachable else None
        rows.append(
            {
                "label": info.label,
                "reachable": info.reachable,
                "full": info.full,
                "read_only": info.read_only,
                "capacity_bytes": info.capacity,
                "used_bytes": info.used,
                # The library's room: a folder volume's never more than
                # its file system has free (folders share one disk).
                "free_bytes": library.free_bytes(info.label)
                if info.reachable
                else info.free,
                "packs": packs,
            }
        )
    return rows


def request_rows(catalog: Catalog) -> list[dict[str, Any]]:
    """Open operator requests, oldest first, each with its sentence."""
    rows = []
    for request in operator_requests(catalog):
        row = request.as_json()
        row.pop("key", None)
        row["description"] = request.describe()
        rows.append(row)
    return rows


def full_status(config: Config, catalog: Catalog, opened: Any) -> dict[str, Any]:
    """:func:`archive_status` with every tier's watermarks and the queues:
    the mirror's, the recalls waiting for a volume, the prefetch's and the
    restore's (what the admin API's status answers)."""
    report = archive_status(config, catalog)
    report["watermarks"] = tier_rows(config, catalog, opened)
    mirror = replication_status(config, catalog)
    waiting = operator_requests(catalog)
    prefetch = prefetch_status(config, catalog)
    report["queues"] = {
        "replication": {
            "state": mirror["state"],
            "summary": mirror["summary"],
            "instances": mirror["queued_instances"],
            "bytes": mirror["queued_bytes"],
            "recovery_point_seconds": mirror["recovery_point_seconds"],
        },
        "recall": {
            "volume_requests": len(waiting),
            "studies_waiting": sum(len(request.studies) for request in waiting),
        },
        "prefetch": {
            "appointments": len(prefetch["appointments"]),
            "ready": prefetch["ready"],
            "waiting": prefetch["waiting"],
            "late": prefetch["late"],
        },
        "restore": report.get("restore"),
    }
    return report


def dr_json(config: Config, catalog: Catalog, last: int) -> dict[str, Any]:
    """:func:`dr_report` as one JSON object."""
    drills, waiting, estimate = dr_report(config, catalog, last)
    return {
        "drills": [drill_json(drill) for drill in drills],
        "recovery_point": {
            "instances": waiting.instances,
            "bytes": waiting.bytes,
            "oldest": waiting.oldest,
            "seconds": round(waiting.recovery_point_age, 1),
        },
        "full_restore": {
            "seconds": estimate.seconds,
            "bytes": estimate.bytes,
            "basis": estimate.basis,
        },
    }


def drill_json(drill: Any) -> dict[str, Any]:
    """One drill record as JSON: its numbers and its file's name."""
    return {
        "date": drill.date,
        "ok": drill.ok,
        "studies": drill.studies,
        "instances": drill.instances,
        "bytes": drill.bytes,
        "mirror_bytes": drill.mirror_bytes,
        "seconds": drill.seconds,
        "rate": drill.rate,
        "failures": drill.failures,
        "record": drill.path.name,
    }
