"""Web accounts: who may call the HTTP server, with which role, and how
their passwords and bearer tokens are kept.

A password is kept as a self-describing scrypt hash::

    scrypt$n=16384,r=8,p=1$<salt, base64>$<derived key, base64>

and a token as the SHA-256 of the token, in hexadecimal (a token is long
and random: a slow hash adds nothing). Neither is ever kept in clear.
This module reads no files and opens no sockets: the configuration
validates accounts with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)
# An operator may do everything a viewer may.
_RANK = {VIEWER: 1, OPERATOR: 2}

ACCOUNT_KEYS = {
    "name": "The account's name (the user name of HTTP Basic).",
    "role": "viewer (DICOMweb reads, status) or operator (also STOW-RS and "
    "operator actions).",
    "password_hash": "From appliance web hash-password; empty for token-only.",
    "token_hash": "SHA-256 (hex) of a bearer token, from appliance web "
    "new-token; empty for password-only.",
}

_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_LENGTH = 32
_PASSWORD_HASH = re.compile(
    r"^scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$"
)
_TOKEN_HASH = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
# Verified against when the name is unknown, so that the answer takes as
# long as for a known name with a wrong password.
_DUMMY_HASH = ""


@dataclass(frozen=True)
class Account:
    """One configured caller of the HTTP server."""

    name: str
    role: str
    password_hash: str = ""
    token_hash: str = ""

    def may(self, role: str) -> bool:
        """Whether this account holds ``role`` (or one above it)."""
        return _RANK[self.role] >= _RANK[role]


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password`` in the self-describing form."""
    salt = secrets.token_bytes(16)
    derived = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    parameters = f"n={_SCRYPT_N},r={_SCRYPT_R},p={_SCRYPT_P}"
    encoded = [base64.b64encode(part).decode() for part in (salt, derived)]
    return "$".join(["scrypt", parameters, *encoded])


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` hashes to ``stored`` (compared in constant time)."""
    match = _PASSWORD_HASH.match(stored)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt = base64.b64decode(match.group(4))
    expected = base64.b64decode(match.group(5))
    derived = _scrypt(password, salt, n, r, p, len(expected))
    return hmac.compare_digest(derived, expected)


def verify_unknown(password: str) -> None:
    """Spend the time a password check takes, for a name nobody has."""
    global _DUMMY_HASH
    if not _DUMMY_HASH:
        _DUMMY_HASH = hash_password(secrets.token_hex(8))
    verify_password(_DUMMY_HASH, password)


def new_token() -> tuple[str, str]:
    """A fresh bearer token and the hash to put in the configuration."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(stored: str, token: str) -> bool:
    """Whether ``token`` is the one ``stored`` is the hash of."""
    return hmac.compare_digest(stored.encode(), hash_token(token).encode())


def _scrypt(
    password: str, salt: bytes, n: int, r: int, p: int, length: int = _SCRYPT_LENGTH
) -> bytes:
    # 128 * r * n bytes of memory, and a margin for OpenSSL's own use.
    memory = 128 * r * n * 2 + 2**20
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=memory, dklen=length
    )


# -- reading the configuration ----------------------------------------------------


def parse_accounts(raw: Any) -> tuple[list[Account], list[str]]:
    """The accounts of ``[[web.accounts]]`` tables and every problem found
    (each naming the entry), so that one check reports them all."""
    if not isinstance(raw, list):
        return [], ["must be an array of tables ([[web.accounts]])"]
    accounts: list[Account] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        found = _entry_problems(entry)
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"entry {index}" + (f" ({name!r})" if isinstance(name, str) else "")
        problems += [f"{where}: {problem}" for problem in found]
        if found:
            continue
        if name in seen:
            problems.append(f"{where}: the name is listed twice")
            continue
        seen.add(str(name))
        accounts.append(
            Account(
                name=entry["name"],
                role=entry["role"],
                password_hash=entry.get("password_hash", ""),
                token_hash=entry.get("token_hash", ""),
            )
        )
    return accounts, problems


def check_accounts(raw: Any) -> str | None:
    """The configuration check of ``web.accounts``: None, or every problem."""
    _accounts, problems = parse_accounts(raw)
    return "; ".join(problems) or None


def _entry_problems(entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return ["must be a table with name, role and a password or token hash"]
    problems = [f"unknown key {key!r}" for key in entry if key not in ACCOUNT_KEYS]
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(
            "name must be 1 to 64 letters, digits or . _ @ - (no colon or space)"
        )
    if entry.get("role") not in ROLES:
        problems.append(
            f"unknown role {entry.get('role')!r}: must be one of {', '.join(ROLES)}"
        )
    password_hash = entry.get("password_hash", "")
    token_hash = entry.get("token_hash", "")
    if not isinstance(password_hash, str) or (
        password_hash and not _well_formed_password_hash(password_hash)
    ):
        problems.append(
            "password_hash is malformed: paste the line appliance web "
            "hash-password prints"
        )
    if not isinstance(token_hash, str) or (
        token_hash and not _TOKEN_HASH.match(token_hash)
    ):
        problems.append("token_hash must be 64 hexadecimal digits (SHA-256)")
    if not password_hash and not token_hash:
        problems.append("needs a password_hash or a token_hash")
    return problems


def _well_formed_password_hash(text: str) -> bool:
    match = _PASSWORD_HASH.match(text)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not 2**10 <= n <= 2**20 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        return False
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        derived = base64.b64decode(match.group(5), validate=True)
    except ValueError:
        return False
    return len(salt) >= 8 and len(derived) >= 16
