"""The OpenAPI description of the admin API and the dashboard's files,
merged into :data:`appliance.web.openapi.PATHS`."""

from __future__ import annotations

from typing import Any

from appliance.web.accounts import OPERATOR, VIEWER

_REFUSALS = {
    "401": {"description": "No or wrong credentials"},
    "403": {"description": "The account's role is too low"},
    "429": {"description": "Too many failed logins; Retry-After says when"},
}
_ERROR = {
    "description": "The error, in a JSON object's error member",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
_LABEL = {
    "name": "label",
    "in": "path",
    "required": True,
    "description": "A volume's label (its barcode, on tape)",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"},
}


def _last(default: int) -> dict[str, Any]:
    return {
        "name": "last",
        "in": "query",
        "description": f"How many, newest kept (default {default}, at most 500)",
        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
    }


def _read(summary: str, *parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "tags": ["admin"],
            "x-role": VIEWER,
            "parameters": list(parameters),
            "responses": {
                "200": {"description": "A JSON object", **_OBJECT},
                **_REFUSALS,
            },
        }
    }


def _action(
    summary: str,
    body: dict[str, Any],
    errors: tuple[str, ...],
    *parameters: dict[str, Any],
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "tags": ["admin"],
            "x-role": OPERATOR,
            "parameters": list(parameters),
            "requestBody": {
                "required": True,
                "description": "A JSON object, sent as application/json "
                "(any other type is refused with 415)",
                "content": {"application/json": {"schema": body}},
            },
            "responses": {
                "200": {"description": "Done; what was done", **_OBJECT},
                "415": _ERROR,
                **{code: _ERROR for code in errors},
                **_REFUSALS,
            },
        }
    }


def _file(summary: str, media_type: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "tags": ["dashboard"],
            "x-role": VIEWER,
            "responses": {
                "200": {"description": "The file", "content": {media_type: {}}},
                **_REFUSALS,
            },
        }
    }


_EMPTY = {"type": "object"}

PATHS: dict[str, dict[str, Any]] = {
    "/api/status": _read(
        "Counts, tiers with usage and watermarks, queues (replication, "
        "recall, prefetch, restore), scrub findings"
    ),
    "/api/volumes": _read("The offline volumes and the open operator requests"),
    "/api/replication": _read(
        "The mirror: queue, rate in force, last snapshot and error, the "
        "recovery point and the estimated full-restore time"
    ),
    "/api/drills": _read("The last restore drills, oldest first", _last(10)),
    "/api/errors": _read(
        "The last warnings and errors of every appliance process", _last(50)
    ),
    "/api/prefetch": _read(
        "Planned appointments with their priors' readiness (no patient "
        "identifiers), and counts"
    ),
    "/api/rates": _read(
        "Instances received and bytes sent to the mirror per hour, last 24 hours"
    ),
    "/api/volumes/{label}/loaded": _action(
        "Mark a volume loaded: its operator request closes and the studies "
        "waiting for it are recalled",
        _EMPTY,
        ("404", "409", "503"),
        _LABEL,
    ),
    "/api/volumes/{label}/unloaded": _action(
        "Take a volume out of its drive; answers whether it is still reachable",
        _EMPTY,
        ("404", "503"),
        _LABEL,
    ),
    "/api/recall": _action(
        "Recall a study to the online tier; the body names it",
        {
            "type": "object",
            "required": ["study_uid"],
            "properties": {
                "study_uid": {"type": "string", "pattern": "^[0-9.]{1,64}$"}
            },
        },
        ("400", "404", "503"),
    ),
    "/api/migration/dry-run": _action(
        "What a migration run would do now, and why, without doing it",
        {"type": "object", "properties": {"watermarks_only": {"type": "boolean"}}},
        ("400", "409"),
    ),
    "/api/replication/rate": _action(
        "Change the mirror's rate now: a rate such as 5MB, off, pause, or "
        "timetable; for some hours or until changed",
        {
            "type": "object",
            "required": ["rate"],
            "properties": {
                "rate": {"type": "string"},
                "hours": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        ("400",),
    ),
    "/": _file("The dashboard (HTML)", "text/html"),
    "/dashboard/dashboard.js": _file("The dashboard's script", "text/javascript"),
    "/dashboard/dashboard.css": _file("The dashboard's style sheet", "text/css"),
    "/dashboard/favicon.svg": _file("The dashboard's icon", "image/svg+xml"),
}
