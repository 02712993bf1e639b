"""The dashboard: one HTML page, its script and its style sheet, all served
from the appliance's own files (``static/``), for viewers.

The page draws what the admin API answers; it loads nothing from anywhere
else, and its Content-Security-Policy tells the browser to refuse anything
that is not from this server, so that a page that tried would be seen
failing in the browser's console. The browser's HTTP Basic login is the
login: the page is refused with a Basic challenge like every other route,
and the browser then sends the same credentials with the page's API calls.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from appliance.web.accounts import VIEWER
from appliance.web.auth import route

STATIC = Path(__file__).resolve().parent / "static"

_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'none'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@cache
def _content(name: str) -> bytes:
    # The files ship with the package and never change while it runs.
    return (STATIC / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(
        _content(name),
        media_type=_TYPES[Path(name).suffix],
        headers={
            "Content-Security-Policy": _POLICY,
            "X-Content-Type-Options": "nosniff",
            # Credentials-protected pages are not kept by shared caches.
            "Cache-Control": "no-cache, private",
        },
    )


async def page(request: Request) -> Response:
    """The dashboard's HTML page."""
    return _serve("dashboard.html")


async def script(request: Request) -> Response:
    return _serve("dashboard.js")


async def style(request: Request) -> Response:
    return _serve("dashboard.css")


async def icon(request: Request) -> Response:
    return _serve("favicon.svg")


ROUTES: list[BaseRoute] = [
    route("/", page, VIEWER),
    route("/dashboard/dashboard.js", script, VIEWER),
    route("/dashboard/dashboard.css", style, VIEWER),
    route("/dashboard/favicon.svg", icon, VIEWER),
]
