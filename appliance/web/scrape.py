"""GET /metrics: what Prometheus scrapes, for viewer accounts (a scrape job
gives its bearer token or Basic credentials)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from appliance.metrics import exposition
from appliance.web.accounts import VIEWER
from appliance.web.auth import route


async def metrics(request: Request) -> Response:
    """The service's counters and the state read now from the catalog."""
    archive = request.app.state.archive
    # Reading the state counts studies per tier: off the event loop.
    body, content_type = await run_in_threadpool(
        exposition, archive.config, archive.catalog
    )
    return Response(body, media_type=content_type)


ROUTES: list[BaseRoute] = [route("/metrics", metrics, VIEWER)]
