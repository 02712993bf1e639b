"""The settings of each mirror transport, read from the ``[mirror]`` section.

Every key has a unit and, unless it is required, a default::

    [mirror]
    kind = "sftp"                 # "directory" or "sftp"
    client = "openssh"            # sftp: "openssh" (the ssh program) or "paramiko"
    path = "/mnt/mirror"          # directory: the mirror folder (must exist)
    host = "mirror.example.org"   # sftp: required
    port = 22
    user = "pacs"                 # sftp: required
    key_file = "/etc/pacs-appliance/mirror_key"  # sftp: required
    known_hosts = "/etc/pacs-appliance/mirror_known_hosts"  # sftp: required
    remote_path = "."             # the mirror root, from the login folder
    timeout = 30.0                # seconds: connect, log in, each read/write
    stall_timeout = 120.0         # seconds without progress before cutting off
    keepalive = 15.0              # seconds between SSH keepalives, 0 = none
    retries = 5                   # reconnections per operation before failing
    backoff = 1.0                 # seconds before the first reconnection
    backoff_max = 60.0            # seconds, the longest wait between attempts
    block_size = 1048576          # bytes per write (and per throttle call)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from appliance.errors import ConfigError

# The SFTP clients: OpenSSH's ssh as a child process, or paramiko in-process.
CLIENTS = ("openssh", "paramiko")
MIN_BLOCK_SIZE = 32 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class DirectorySettings:
    """A mirror folder, local or mounted."""

    path: Path
    block_size: int = 1024 * 1024

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with these values, as ``(key, message)``."""
        return _block_size_problems(self.block_size)


@dataclass(frozen=True)
class SftpSettings:
    """An SFTP mirror: where, who, which keys, and how patient to be."""

    host: str
    user: str
    key_file: Path
    known_hosts: Path
    port: int = 22
    client: str = "openssh"
    remote_path: str = "."
    timeout: float = 30.0
    stall_timeout: float = 120.0
    keepalive: float = 15.0
    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    block_size: int = 1024 * 1024

    @property
    def where(self) -> str:
        """``user@host:port``, for messages."""
        return f"{self.user}@{self.host}:{self.port}"

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with these values, as ``(key, message)``."""
        found = _block_size_problems(self.block_size)
        if self.client not in CLIENTS:
            found.append(("mirror.client", f"must be one of {', '.join(CLIENTS)}"))
        if not 0 < self.port < 65536:
            found.append(("mirror.port", f"{self.port} is not a TCP port"))
        for key in ("timeout", "stall_timeout", "backoff", "backoff_max"):
            if getattr(self, key) <= 0:
                found.append((f"mirror.{key}", "must be more than 0 seconds"))
        if self.keepalive < 0:
            found.append(("mirror.keepalive", "must be 0 (off) or more seconds"))
        if self.retries < 0:
            found.append(("mirror.retries", "must be 0 or more"))
        for key in ("host", "user"):
            if not getattr(self, key):
                found.append((f"mirror.{key}", "must not be empty"))
        return found


S = TypeVar("S", DirectorySettings, SftpSettings)


def read_settings(cls: type[S], values: Mapping[str, object], kind: str) -> S:
    """Build ``cls`` from the ``[mirror]`` keys it has; ConfigError if wrong.

    Keys of the other kind of mirror are ignored: a configuration may keep
    both while switching.
    """
    problems: list[tuple[str, str]] = []
    found: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        key = f"mirror.{field.name}"
        if field.name not in values:
            if field.default is dataclasses.MISSING:
                problems.append((key, f"required for a {kind} mirror"))
            continue
        try:
            found[field.name] = _convert(field.type, values[field.name])
        except ValueError as exc:
            problems.append((key, str(exc)))
    if not problems:
        settings = cls(**found)  # type: ignore[arg-type]
        problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    return settings


def _convert(kind: object, value: object) -> object:
    """One value as the type its field names (annotations are strings)."""
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "Path" and isinstance(value, str | Path) and str(value):
        return Path(value)
    if isinstance(value, bool):
        pass  # True is an int to Python, not a number to a person
    elif kind == "int" and isinstance(value, int):
        return value
    elif kind == "float" and isinstance(value, int | float):
        return float(value)
    raise ValueError(f"{value!r} is not a {_TYPE_WORDS.get(str(kind), kind)}")


_TYPE_WORDS = {
    "str": "string",
    "Path": "path",
    "int": "whole number",
    "float": "number",
}


def _block_size_problems(block_size: int) -> list[tuple[str, str]]:
    if MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        return []
    return [
        (
            "mirror.block_size",
            f"must be between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes",
        )
    ]
