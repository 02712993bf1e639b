"""The admin API under ``/api``: the appliance's state for viewers, and the
operator actions, each audited.

Every figure comes from :mod:`appliance.overview` and every action from
:mod:`appliance.actions`, the code the command line prints and runs; the
routes only translate to JSON. URLs carry no patient data: a study to
recall is named in the request body, and paths hold only volume labels.

An operator action is a POST whose body is a JSON object, sent with
``Content-Type: application/json``: a browser sends that type to another
site only after a CORS preflight this server never grants, so a page
elsewhere cannot make a logged-in operator's browser act (CSRF).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from appliance import actions, audit, error_log, overview
from appliance.audit.trail import Trail
from appliance.config import Config
from appliance.errors import ApplianceError, VolumeNotReachable
from appliance.hsm.recall import Recaller, RecallResult
from appliance.restore.reasons import while_restoring
from appliance.storage.volumes.base import check_label
from appliance.web import history
from appliance.web.accounts import OPERATOR, VIEWER
from appliance.web.archive import Archive
from appliance.web.auth import problem, route
from appliance.web.content_coding import refused_coding

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# How many error lines or drills one answer may hold.
_MOST = 500


def _audited(request: Request, action: str, detail: str) -> None:
    """Record who did what, in the log and the audit trail; ``detail``
    names volumes, rates or UIDs, never a patient."""
    account = getattr(request.state, "account", "-")
    logger.info("operator action by %s: %s (%s)", account, action, detail)
    address = request.client.host if request.client else ""
    audit.operator_action(_trail(request), str(account), address, action, detail)


def _trail(request: Request) -> Trail | None:
    return _archive(request).tiers.audit


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _config(request: Request) -> Config:
    config: Config = request.app.state.config
    return config


def _count(request: Request, name: str, default: int) -> int | None:
    """A positive count from the query string (at most ``_MOST``); None
    when it is not a number."""
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        return max(1, min(_MOST, int(text)))
    except ValueError:
        return None


# -- reading ----------------------------------------------------------------------


async def status(request: Request) -> Response:
    """Counts, tiers with usage and watermarks, and the queues."""
    archive, config = _archive(request), _config(request)
    report = await run_in_threadpool(
        overview.full_status, config, archive.catalog, archive.tiers
    )
    return JSONResponse(report)


async def volumes(request: Request) -> Response:
    """The offline tier's volumes and the open operator requests."""
    archive = _archive(request)

    def gather() -> dict[str, Any]:
        library = archive.tiers.packs["offline"].library  # type: ignore[attr-defined]
        return {
            "volumes": overview.volume_rows(library),
            "requests": overview.request_rows(archive.catalog),
        }

    try:
        return JSONResponse(await run_in_threadpool(gather))
    except ApplianceError as exc:
        return problem(503, f"cannot list the volumes: {exc}")


async def replication(request: Request) -> Response:
    """The mirror's queue and rate, the recovery point and the estimated
    time of a full restore."""
    archive, config = _archive(request), _config(request)

    def gather() -> dict[str, Any]:
        report = overview.replication_status(config, archive.catalog)
        dr = overview.dr_json(config, archive.catalog, 1)
        report["recovery_point"] = dr["recovery_point"]
        report["full_restore"] = dr["full_restore"]
        return report

    return JSONResponse(await run_in_threadpool(gather))


async def drills(request: Request) -> Response:
    """The last restore drills, oldest first (``?last=``, default 10)."""
    last = _count(request, "last", 10)
    if last is None:
        return problem(400, "last must be a whole number")
    archive, config = _archive(request), _config(request)
    report = await run_in_threadpool(overview.dr_json, config, archive.catalog, last)
    return JSONResponse({"drills": report["drills"]})


async def errors(request: Request) -> Response:
    """The last warnings and errors of every process (``?last=``, default 50)."""
    last = _count(request, "last", 50)
    if last is None:
        return problem(400, "last must be a whole number")
    data_dir = _config(request).data_dir
    found = await run_in_threadpool(error_log.recent, data_dir, last)
    return JSONResponse({"errors": found})


async def prefetch(request: Request) -> Response:
    """Planned appointments with their priors' readiness, and counts.

    The same report as ``appliance prefetch status --json`` without the
    patients' identifiers: readiness needs none of them.
    """
    archive, config = _archive(request), _config(request)
    report = await run_in_threadpool(overview.prefetch_status, config, archive.catalog)
    for row in report["appointments"]:
        row.pop("patients", None)
    return JSONResponse(report)


async def rates(request: Request) -> Response:
    """Instances received and bytes sent to the mirror per hour, last 24 h."""
    path = history.path_of(_config(request).data_dir)
    samples = await run_in_threadpool(history.read, path)
    hours = history.hourly(samples, time.time())
    return JSONResponse({"hours": hours, "samples": len(samples)})


# -- operator actions -------------------------------------------------------------


# Every action's body is a few dozen bytes; a larger one is not read whole.
_LARGEST_BODY = 64 * 1024


async def _body(request: Request) -> dict[str, Any] | Response:
    """The JSON object an action is sent, or the error answer."""
    refused = refused_coding(request)
    if refused is not None:
        return refused
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        return problem(415, "send a JSON object with Content-Type: application/json")
    raw = bytearray()
    # An action's body is a few dozen bytes: one announced that never comes
    # would hold the connection for ever (web.header_timeout times only the
    # headers), so it must come as soon as they must.
    wait: float = request.app.state.config.get("web.header_timeout")
    try:
        async with asyncio.timeout(wait):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > _LARGEST_BODY:
                    return problem(
                        413, f"an action's body is at most {_LARGEST_BODY} bytes"
                    )
    except TimeoutError:
        return _body_stalled(request, wait)
    except ClientDisconnect:
        # No one reads the answer; without this, uvicorn logs a traceback.
        logger.warning(
            "operator action by %s: the connection ended before the body did; "
            "nothing was done",
            request.state.account,
        )
        return problem(400, "the body ended early; nothing was done")
    try:
        body = json.loads(bytes(raw) or b"{}")
    except (ValueError, RecursionError):
        # RecursionError: arrays or objects nested thousands deep.
        return problem(400, "the body is not JSON")
    if not isinstance(body, dict):
        return problem(400, "the body must be a JSON object")
    return body


def _body_stalled(request: Request, wait: float) -> Response:
    """408 for an action whose body did not come in time; the connection is
    closed after the answer, as the rest of the body may still come."""
    logger.warning(
        "operator action by %s refused: its body was not complete in %g s "
        "(web.header_timeout); nothing was done",
        request.state.account,
        wait,
    )
    return problem(
        408,
        f"the body was not complete in {wait:g} s; nothing was done",
        {"Connection": "close"},
    )


def _recall_json(result: RecallResult) -> dict[str, Any]:
    return {
        "study_uid": result.study_uid,
        "ok": result.ok,
        "staged": result.staged,
        "missing": len(result.missing),
        "waiting_for": result.waiting_for,
        "problems": result.problems,
    }


def _recall_all(archive: Archive, uids: list[str], why: str) -> list[RecallResult]:
    # A recaller of its own, as each command has: it keeps per-recall
    # state, and the DICOMweb routes' one may be busy.
    recaller = Recaller(
        archive.catalog,
        archive.tiers,
        failed=while_restoring(archive.config.restore_folder),
    )
    return [recaller.recall(uid, why=why) for uid in uids]


async def volume_loaded(request: Request) -> Response:
    """The volume is back: its studies are recalled (each leaves its request
    once recalled); the label may be given in any case."""
    body = await _body(request)
    if isinstance(body, Response):
        return body
    label = request.path_params["label"]
    archive = _archive(request)

    def load() -> tuple[str, list[str], list[RecallResult]]:
        check_label(label)
        known, waiting = actions.mark_loaded(archive.catalog, archive.tiers, label)
        why = "its volume was marked loaded"
        return known, waiting, _recall_all(archive, waiting, why)

    try:
        label, waiting, results = await run_in_threadpool(load)
    except ValueError as exc:
        return problem(404, str(exc))
    except VolumeNotReachable as exc:
        return problem(409, f"volume {label}: {exc}")
    except ApplianceError as exc:
        return problem(503, f"volume {label}: {exc}")
    _audited(request, "volume loaded", f"{label}, {len(waiting)} studies recalled")
    return JSONResponse(
        {
            "volume": label,
            "reachable": True,
            "recalls": [_recall_json(result) for result in results],
        }
    )


async def volume_unloaded(request: Request) -> Response:
    """Take a volume out of its drive; says whether it is still reachable."""
    body = await _body(request)
    if isinstance(body, Response):
        return body
    label = request.path_params["label"]
    archive = _archive(request)

    def unload() -> tuple[str, bool]:
        check_label(label)
        library = archive.tiers.packs["offline"].library  # type: ignore[attr-defined]
        return actions.mark_unloaded(library, label)

    try:
        label, reachable = await run_in_threadpool(unload)
    except ValueError as exc:
        return problem(404, str(exc))
    except ApplianceError as exc:
        return problem(503, f"volume {label}: {exc}")
    _audited(request, "volume unloaded", label)
    return JSONResponse({"volume": label, "reachable": reachable})


async def recall(request: Request) -> Response:
    """Bring a study back online, as ``appliance recall`` does; the body
    names it: {"study_uid": "1.2.3..."}."""
    body = await _body(request)
    if isinstance(body, Response):
        return body
    uid = body.get("study_uid")
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        return problem(400, "study_uid must be a Study Instance UID")
    archive = _archive(request)

    def run() -> RecallResult | None:
        if not actions.is_study(archive.catalog, uid):
            return None
        why = "an operator recalled it through the admin API"
        return _recall_all(archive, [uid], why)[0]

    try:
        result = await run_in_threadpool(run)
    except ApplianceError as exc:
        return problem(503, f"the recall failed: {exc}")
    if result is None:
        return problem(404, "no such study in the catalog")
    _audited(request, "recall", f"study {uid}, {result.staged} instances staged")
    return JSONResponse(_recall_json(result))


async def migration_dry_run(request: Request) -> Response:
    """What a migration run would do now and why, without doing it;
    {"watermarks_only": true} plans only the watermark releases."""
    body = await _body(request)
    if isinstance(body, Response):
        return body
    watermarks_only = body.get("watermarks_only", False)
    if not isinstance(watermarks_only, bool):
        return problem(400, "watermarks_only must be true or false")
    archive, config = _archive(request), _config(request)
    try:
        plan = await run_in_threadpool(
            actions.plan_migration,
            config,
            archive.catalog,
            _without_mirror(archive),
            watermarks_only,
        )
    except actions.MigrationRunning as exc:
        return problem(409, str(exc))
    _audited(request, "migration dry run", f"{len(plan.actions)} steps planned")
    return JSONResponse(
        {
            "usage": [
                {
                    "tier": usage.tier,
                    "used_bytes": usage.used,
                    "capacity_bytes": usage.capacity,
                    "percent": round(usage.percent, 1),
                    "high_watermark": usage.high,
                    "low_watermark": usage.low,
                }
                for usage in plan.usage
            ],
            "steps": len(plan.actions),
            "held": len(plan.decisions) - len(plan.actions),
            "decisions": [str(decision) for decision in plan.decisions],
            "warnings": plan.warnings,
        }
    )


def _without_mirror(archive: Archive) -> Any:
    """The tiers as ``appliance migrate`` opens them: without the mirror,
    which the web child holds for recalls only."""
    from dataclasses import replace

    from appliance.catalog.replication import OFFSITE

    packs = {n: t for n, t in archive.tiers.packs.items() if n != OFFSITE}
    return replace(archive.tiers, packs=packs)


async def replication_rate(request: Request) -> Response:
    """Change the mirror's rate now: {"rate": "5MB" | "off" | "pause" |
    "timetable", "hours": 2} (hours: until changed when left out)."""
    body = await _body(request)
    if isinstance(body, Response):
        return body
    rate, hours = body.get("rate"), body.get("hours")
    if not isinstance(rate, str):
        return problem(400, "rate must be a string such as 5MB, off, pause")
    if hours is not None and (
        isinstance(hours, bool) or not isinstance(hours, int | float)
    ):
        return problem(400, "hours must be a number")
    config = _config(request)
    try:
        said = await run_in_threadpool(
            actions.set_replication_rate,
            config,
            rate,
            None if hours is None else float(hours),
        )
    except ValueError as exc:
        return problem(400, str(exc))
    _audited(request, "replication rate", said)
    return JSONResponse({"rate": said})


ROUTES: list[BaseRoute] = [
    route("/api/status", status, VIEWER),
    route("/api/volumes", volumes, VIEWER),
    route("/api/replication", replication, VIEWER),
    route("/api/drills", drills, VIEWER),
    route("/api/errors", errors, VIEWER),
    route("/api/prefetch", prefetch, VIEWER),
    route("/api/rates", rates, VIEWER),
    route("/api/volumes/{label}/loaded", volume_loaded, OPERATOR, ("POST",)),
    route("/api/volumes/{label}/unloaded", volume_unloaded, OPERATOR, ("POST",)),
    route("/api/recall", recall, OPERATOR, ("POST",)),
    route("/api/migration/dry-run", migration_dry_run, OPERATOR, ("POST",)),
    route("/api/replication/rate", replication_rate, OPERATOR, ("POST",)),
]
