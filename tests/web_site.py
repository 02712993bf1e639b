"""A running ``appliance serve`` with web accounts, and HTTP clients for it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx

from appliance.web.accounts import hash_password, hash_token
from tests.conftest import Appliance

VIEWER = ("reader", "viewer-secret")
OPERATOR = ("uploader", "operator-secret")
VIEWER_TOKEN = "a-viewer-token-for-the-tests-only"
_TLS = ssl.create_default_context()


def accounts() -> list[dict[str, str]]:
    return [
        {
            "name": VIEWER[0],
            "role": "viewer",
            "password_hash": hash_password(VIEWER[1]),
            "token_hash": hash_token(VIEWER_TOKEN),
        },
        {
            "name": OPERATOR[0],
            "role": "operator",
            "password_hash": hash_password(OPERATOR[1]),
        },
    ]


@dataclass
class Site:
    """The appliance and the base URL of its HTTP server."""

    appliance: Appliance

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.appliance.web_port}"

    def client(self, auth: tuple[str, str] | None = None) -> httpx.Client:
        # One TLS context for all clients: loading the CA store for each
        # new client costs a quarter of a second.
        return httpx.Client(base_url=self.url, auth=auth, timeout=60, verify=_TLS)


def start(  # type: ignore[no-untyped-def]
    factory, settings: dict | None = None, **more
) -> Site:
    """An appliance with the two test accounts (and ``settings``) started."""
    merged: dict[str, dict[str, object]] = {"web": {"accounts": accounts()}}
    for section, keys in (settings or {}).items():
        merged.setdefault(section, {}).update(keys)
    return Site(factory(merged, **more).start())
