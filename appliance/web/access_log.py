"""One access log line per request, without patient data.

The line names the route template (``/studies/{study}/series``), never the
path as requested or its query string: both carry UIDs and search keys
such as a patient's name.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("appliance.web.access")


class AccessLog:
    """ASGI middleware: logs method, route, status, account and seconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            logger.info(
                "%s %s %d %s %.3f s",
                scope.get("method", "-"),
                _template(scope),
                status,
                _account(scope),
                time.monotonic() - started,
            )


def _template(scope: Scope) -> str:
    # The router leaves the route it chose in the scope.
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "(no route)"


def _account(scope: Scope) -> str:
    state = scope.get("state") or {}
    return str(state.get("account") or "-")
