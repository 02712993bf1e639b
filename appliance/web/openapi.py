"""The OpenAPI description of the HTTP server, kept by hand.

A test compares it with the routes the application serves, both ways, so
that a route added without its description (or removed with it left here)
fails the suite. A module that adds routes adds its paths to ``PATHS``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from appliance.web import admin_openapi
from appliance.web.accounts import VIEWER
from appliance.web.auth import route

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
_REFUSALS = {
    "401": {"description": "No or wrong credentials"},
    "403": {"description": "The account's role is too low"},
    "429": {
        "description": "Too many failed logins from this address (for this "
        "user name): Retry-After says when to try again",
        **_ERROR,
    },
}
_DICOM_JSON = {
    "content": {
        "application/dicom+json": {
            "schema": {"type": "array", "items": {"type": "object"}}
        }
    }
}
_MULTIPART_DICOM = {
    "content": {
        'multipart/related; type="application/dicom"': {
            "schema": {"type": "string", "format": "binary"}
        }
    }
}
_UID = {"type": "string", "pattern": "^[0-9.]{1,64}$"}


def _path_parameters(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": _UID} for name in names
    ]


_QIDO_PARAMETERS = [
    {
        "name": "{attributeID}",
        "in": "query",
        "description": "A matching key: keyword or tag (PatientName, "
        "00100010) with a value, matched as C-FIND matches (PS3.4 C.2.2.2).",
        "schema": {"type": "string"},
    },
    {"name": "includefield", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    *(
        {
            "name": name,
            "in": "query",
            "description": "Not supported: true is answered with a Warning "
            "header (299) saying so.",
            "schema": {"type": "boolean"},
        }
        for name in ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")
    ),
]


def _search(level: str, *names: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": f"QIDO-RS: search for {level} (PS3.18 10.6)",
            "tags": ["DICOMweb"],
            "x-role": VIEWER,
            "parameters": _path_parameters(*names) + _QIDO_PARAMETERS,
            "responses": {
                "200": {"description": "Matches", **_DICOM_JSON},
                "204": {"description": "No match"},
                "400": _ERROR,
                "406": _ERROR,
                **_REFUSALS,
            },
        }
    }


def _retrieve(what: str, *names: str, store: bool = False) -> dict[str, Any]:
    operations: dict[str, Any] = {
        "get": {
            "summary": f"WADO-RS: retrieve the {what}, exactly the stored "
            "Part 10 files (PS3.18 10.4)",
            "tags": ["DICOMweb"],
            "x-role": VIEWER,
            "parameters": _path_parameters(*names),
            "responses": {
                "200": {"description": "The instances", **_MULTIPART_DICOM},
                "404": _ERROR,
                "406": _ERROR,
                "503": {
                    "description": "Waits for an offline volume to be loaded; "
                    "Retry-After says when to ask again",
                    **_ERROR,
                },
                **_REFUSALS,
            },
        }
    }
    if store:
        operations["post"] = _store(*names)
    return operations


def _metadata(what: str, *names: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": f"WADO-RS: the {what}'s metadata, without bulk data",
            "tags": ["DICOMweb"],
            "x-role": VIEWER,
            "parameters": _path_parameters(*names),
            "responses": {
                "200": {"description": "One object per instance", **_DICOM_JSON},
                "400": _ERROR,
                "404": _ERROR,
                "406": _ERROR,
                "503": _ERROR,
                **_REFUSALS,
            },
        }
    }


def _store(*names: str) -> dict[str, Any]:
    return {
        "summary": "STOW-RS: store instances (PS3.18 10.5), durably, with the "
        "duplicate rules of C-STORE",
        "tags": ["DICOMweb"],
        "x-role": "operator",
        "parameters": _path_parameters(*names),
        "requestBody": {"required": True, **_MULTIPART_DICOM},
        "responses": {
            "200": {"description": "Every instance stored", **_DICOM_JSON},
            "202": {"description": "Some instances failed", **_DICOM_JSON},
            "409": {"description": "No instance was stored", **_DICOM_JSON},
            "400": _ERROR,
            "413": {
                "description": "The body is longer than web.max_stow_bytes; "
                "nothing was stored",
                **_ERROR,
            },
            "408": {
                "description": "No byte of the body arrived for "
                "web.stow_stall_timeout seconds; nothing was stored",
                **_ERROR,
            },
            "415": _ERROR,
            **_REFUSALS,
        },
    }


PATHS: dict[str, dict[str, Any]] = {
    "/health": {
        "get": {
            "summary": "Whether the HTTP server runs (no authentication)",
            "tags": ["service"],
            "x-role": "public",
            "responses": {"200": {"description": '{"status": "ok"}'}},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics: counters of the service and the "
            "archive's state now (docs/metrics.md)",
            "tags": ["service"],
            "x-role": VIEWER,
            "responses": {
                "200": {"description": "Prometheus text exposition format"},
                **_REFUSALS,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This description",
            "tags": ["service"],
            "x-role": VIEWER,
            "responses": {"200": {"description": "OpenAPI 3.1"}, **_REFUSALS},
        }
    },
}

PATHS.update(admin_openapi.PATHS)


_STUDY = "/studies/{study}"
_SERIES = _STUDY + "/series/{series}"
_INSTANCE = _SERIES + "/instances/{instance}"

PATHS.update(
    {
        "/studies": {**_search("studies"), "post": _store()},
        _STUDY: _retrieve("study", "study", store=True),
        _STUDY + "/metadata": _metadata("study", "study"),
        _STUDY + "/series": _search("the series of a study", "study"),
        _STUDY + "/instances": _search("the instances of a study", "study"),
        _SERIES: _retrieve("series", "study", "series"),
        _SERIES + "/metadata": _metadata("series", "study", "series"),
        _SERIES + "/instances": _search("the instances of a series", "study", "series"),
        _INSTANCE: _retrieve("instance", "study", "series", "instance"),
        _INSTANCE + "/metadata": _metadata("instance", "study", "series", "instance"),
        "/series": _search("series"),
        "/instances": _search("instances"),
        "/wado": {
            "get": {
                "summary": "WADO-URI: one instance as stored (PS3.18 9)",
                "tags": ["DICOMweb"],
                "x-role": VIEWER,
                "parameters": [
                    {
                        "name": name,
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                    for name in ("requestType", "studyUID", "seriesUID", "objectUID")
                ]
                + [
                    {"name": name, "in": "query", "schema": {"type": "string"}}
                    for name in ("contentType", "transferSyntax")
                ],
                "responses": {
                    "200": {
                        "description": "The Part 10 file",
                        "content": {"application/dicom": {}},
                    },
                    "400": _ERROR,
                    "404": _ERROR,
                    "406": _ERROR,
                    "503": _ERROR,
                    **_REFUSALS,
                },
            }
        },
    }
)


def document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pacs-appliance",
            "version": "1",
            "description": "DICOMweb and the appliance's own routes. Every "
            "route but /health needs HTTP Basic or Bearer credentials of a "
            "[[web.accounts]] entry; x-role names the role it needs.",
        },
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer"},
            }
        },
        "security": [{"basic": []}, {"bearer": []}],
        "paths": PATHS,
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(document())


ROUTES: list[BaseRoute] = [route("/openapi.json", openapi, VIEWER)]
