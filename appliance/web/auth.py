"""Who is calling: HTTP Basic and Bearer authentication against the
configured accounts, and the role each route needs.

Every route but the health check is made with :func:`route`, which names
the role it needs; the wrapper answers 401 (with WWW-Authenticate) to a
caller without valid credentials and 403 to one whose role is too low,
before the endpoint runs (RFC 9110 11.6.1, RFC 7617, RFC 6750).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance import audit
from appliance.web.accounts import (
    Account,
    verify_password,
    verify_token,
    verify_unknown,
)
from appliance.web.throttle import Lock, LoginThrottle

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

PUBLIC = "public"
REALM = "pacs-appliance"
_CHALLENGE = f'Basic realm="{REALM}", Bearer realm="{REALM}"'
# Checked credentials remembered (as a digest) so that a viewer paging
# through results does not pay for a slow password hash on every request.
_REMEMBERED = 256


class Authenticator:
    """Checks the Authorization header of a request against the accounts."""

    def __init__(
        self, accounts: list[Account], throttle: LoginThrottle | None = None
    ) -> None:
        self.by_name = {account.name: account for account in accounts}
        self.throttle = throttle or LoginThrottle()
        self._remembered: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def account_for(self, header: str) -> Account | None:
        """The account the header's credentials belong to, or None."""
        scheme, _, credentials = header.strip().partition(" ")
        credentials = credentials.strip()
        if not credentials:
            return None
        digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        with self._lock:
            known = self._remembered.get(digest)
        if known is not None and known in self.by_name:
            return self.by_name[known]
        if scheme.lower() == "basic":
            account = self._basic(credentials)
        elif scheme.lower() == "bearer":
            account = self._bearer(credentials)
        else:
            return None
        if account is not None:
            with self._lock:
                if len(self._remembered) >= _REMEMBERED:
                    self._remembered.clear()
                self._remembered[digest] = account.name
        return account

    def _basic(self, credentials: str) -> Account | None:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        name, colon, password = decoded.partition(":")
        account = self.by_name.get(name)
        if not colon or account is None or not account.password_hash:
            verify_unknown(password)
            return None
        return account if verify_password(account.password_hash, password) else None

    def _bearer(self, token: str) -> Account | None:
        found = None
        # Every account is compared, so the time taken names none of them.
        for account in self.by_name.values():
            if account.token_hash and verify_token(account.token_hash, token):
                found = account
        return found


def route(
    path: str, endpoint: Endpoint, role: str, methods: tuple[str, ...] = ("GET",)
) -> Route:
    """A route whose endpoint runs only for callers holding ``role``
    (``PUBLIC``: for anyone)."""
    guarded = endpoint if role == PUBLIC else _guard(endpoint, role)
    made = Route(path, guarded, methods=list(methods))
    if role != PUBLIC and made.methods is not None:
        # Starlette answers HEAD through the GET endpoint, run whole and its
        # body dropped: a retrieval would recall from a volume and be
        # audited as a disclosure for a request that received nothing.
        made.methods.discard("HEAD")
    made.role = role  # type: ignore[attr-defined]
    return made


def role_of(made: Any) -> str:
    """The role a route made with :func:`route` needs."""
    return str(getattr(made, "role", ""))


def _guard(endpoint: Endpoint, role: str) -> Endpoint:
    async def guarded(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        account = await _login(request, header) if header else None
        if isinstance(account, Response):
            return account
        if account is None:
            return unauthorised("credentials required" if not header else None)
        request.state.account = account.name
        if not account.may(role):
            return problem(403, f"this needs the {role} role")
        return await endpoint(request)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


async def _login(request: Request, header: str) -> Account | Response | None:
    """The account the credentials name; None when they are wrong; or the
    429 answer while their user name and address, or the address, is
    locked (:mod:`appliance.web.throttle`), checking nothing then: not
    even credentials found right before, or a guesser could tell the right
    password by the answer."""
    authenticator: Authenticator = request.app.state.authenticator
    throttle = authenticator.throttle
    address = request.client.host if request.client else ""
    user = basic_user(header)
    wait = throttle.wait(address, user)
    if wait:
        return problem(
            429,
            f"too many failed logins; try again in {wait} s",
            {"Retry-After": str(wait)},
        )
    account = await run_in_threadpool(authenticator.account_for, header)
    if account is not None:
        throttle.succeeded(address, user)
        return account
    locks = throttle.failed(address, user)
    await run_in_threadpool(_refused, request, user, address, locks)
    return None


def _refused(request: Request, user: str, address: str, locks: list[Lock]) -> None:
    """Wrong credentials: a record in the audit trail, naming the user a
    Basic header gave (never the password or token); and a log line and a
    record for each lock they begin."""
    for lock in locks:
        who = f"user {lock.user!r} from" if lock.user is not None else "any user from"
        logger.warning(
            "web login locked for %d s: %s %s, after %d failed logins in %d s",
            lock.seconds,
            who,
            lock.address or "-",
            lock.failures,
            request.app.state.authenticator.throttle.window,
        )
    archive = getattr(request.app.state, "archive", None)
    if archive is None:
        return
    audit.login_refused(archive.tiers.audit, user, address)
    for lock in locks:
        audit.login_refused(
            archive.tiers.audit,
            lock.user or "",
            address,
            f"login locked for {lock.seconds:.0f} s after {lock.failures} "
            "failed logins",
        )


def basic_user(header: str) -> str:
    """The user name of an HTTP Basic header, or "" (a token, or garbage)."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0][:64]


def unauthorised(message: str | None) -> Response:
    response = problem(401, message or "wrong user name, password or token")
    response.headers["WWW-Authenticate"] = _CHALLENGE
    return response


def problem(
    status: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    """An error answer: a JSON object with the message, and the status."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)
