"""The health check: the one route anyone may call."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from appliance.web.auth import PUBLIC, route


async def health(request: Request) -> Response:
    """Answers while the HTTP server runs; says nothing about the archive."""
    return JSONResponse({"status": "ok"})


ROUTES: list[BaseRoute] = [route("/health", health, PUBLIC)]
