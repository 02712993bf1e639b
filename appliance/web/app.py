"""The web application: every route module's routes, behind the access log.

A module that serves routes holds a ``ROUTES`` list (made with
:func:`appliance.web.auth.route`, which names the role each needs) and is
named in ``ROUTE_MODULES``; nothing else needs to change to add one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from appliance.config import Config
from appliance.web import history
from appliance.web.access_log import AccessLog
from appliance.web.accounts import parse_accounts
from appliance.web.archive import Archive
from appliance.web.auth import Authenticator, problem
from appliance.web.throttle import LoginThrottle

logger = logging.getLogger(__name__)

ROUTE_MODULES = (
    "appliance.web.health",
    "appliance.web.openapi",
    "appliance.web.scrape",
    "appliance.web.dicomweb",
    "appliance.web.wado_uri",
    "appliance.web.admin",
    "appliance.web.dashboard",
)


def routes() -> list[BaseRoute]:
    """The routes of every module in ``ROUTE_MODULES``, in that order."""
    found: list[BaseRoute] = []
    for name in ROUTE_MODULES:
        found += importlib.import_module(name).ROUTES
    return found


def build_app(config: Config) -> Starlette:
    """The application the web child serves (the archive opens at start)."""
    accounts, _problems = parse_accounts(config.get("web.accounts"))
    if not accounts:
        logger.warning(
            "no web accounts configured: the HTTP server refuses everything "
            "but /health; add a [[web.accounts]] table with a password_hash "
            "from 'appliance web hash-password' (docs/web.md)"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.archive = Archive(config)
        try:
            with history.sampling(app.state.archive.catalog, config.data_dir):
                yield
        finally:
            app.state.archive.close()

    app = Starlette(
        routes=routes(),
        middleware=[Middleware(AccessLog)],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    # A path with a trailing slash is not redirected: the redirect would be
    # answered before any credentials are checked, to an absolute URL made
    # from the caller's Host header, and a STOW-RS body would be sent twice.
    app.router.redirect_slashes = False
    app.state.config = config
    app.state.authenticator = Authenticator(
        accounts,
        LoginThrottle(
            config.get("web.login_failures"),
            config.get("web.login_address_failures"),
            config.get("web.login_window"),
            config.get("web.login_lock_max"),
        ),
    )
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, exc.detail, dict(exc.headers or {}))
