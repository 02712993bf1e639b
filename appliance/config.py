"""The appliance's configuration: one TOML file, every key with a default.

The schema below is the single description of every key: its type, default,
unit and what is allowed. Loading, ``appliance config check``, the example
file (``appliance config example``) and docs/configuration.md all follow it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

logger = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("refuse", "keep_first", "replace")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives, its default and its rule."""

    section: str
    name: str
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda value: None

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"


def _ae_title(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16:
        return "must be 1 to 16 characters"
    if not stripped.isascii() or "\\" in stripped:
        return "must be ASCII without backslash"
    if any(ord(c) < 0x20 for c in stripped):
        return "must not contain control characters"
    return None


def _integer(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer from {low} to {high}"
        if not low <= value <= high:
            return f"must be an integer from {low} to {high}"
        return None

    return check


def _seconds(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number of seconds greater than 0"
    if value <= 0:
        return "must be a number of seconds greater than 0"
    return None


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            return "must be one of " + ", ".join(repr(c) for c in choices)
        return None

    return check


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _path(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a path (a non-empty string)"
    return None


def _ip_address(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be an IPv4 or IPv6 address"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address, e.g. 127.0.0.1 or 0.0.0.0"
    return None


def _ae_title_list(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of AE titles"
    for item in value:
        problem = _ae_title(item)
        if problem:
            return f"entry {item!r} {problem}"
    return None


KEYS: tuple[Key, ...] = (
    Key("node", "ae_title", "APPLIANCE", "The appliance's own AE title.", _ae_title),
    Key(
        "node",
        "bind_address",
        "127.0.0.1",
        "Address the DICOM listener binds to; 0.0.0.0 for every IPv4 address.",
        _ip_address,
    ),
    Key("node", "port", 11112, "DICOM listener TCP port.", _integer(1, 65535)),
    Key(
        "node",
        "check_called_ae_title",
        True,
        "Reject associations addressed to another AE title than node.ae_title "
        "(a sender configured for another archive).",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "node",
        "max_associations",
        32,
        "Associations served at once, over all workers; more are rejected "
        "with 'local limit exceeded'.",
        _integer(1, 1000),
    ),
    Key(
        "node",
        "workers",
        0,
        "Worker processes serving associations; 0 means one per CPU core.",
        _integer(0, 64),
    ),
    Key(
        "node",
        "max_pdu_size",
        262144,
        "Largest PDU the appliance receives, in bytes; 0 means no limit.",
        _integer(0, 2**31 - 1),
    ),
    Key(
        "timeouts",
        "association",
        30.0,
        "Seconds to wait for association request, accept or release.",
        _seconds,
    ),
    Key(
        "timeouts",
        "dimse",
        60.0,
        "Seconds to wait for the next DIMSE message of an operation.",
        _seconds,
    ),
    Key(
        "timeouts",
        "network",
        120.0,
        "Seconds an association may stay silent before it is closed.",
        _seconds,
    ),
    Key(
        "timeouts",
        "connect",
        10.0,
        "Seconds to wait for a TCP connection to a peer (C-MOVE).",
        _seconds,
    ),
    Key(
        "storage",
        "data_dir",
        "appliance-data",
        "Directory holding everything by default; relative to the directory "
        "the appliance starts in.",
        _path,
    ),
    Key(
        "storage",
        "online_path",
        "",
        "Online tier directory; empty means DATA_DIR/online.",
        _text,
    ),
    Key(
        "storage",
        "catalog_path",
        "",
        "Catalog (LMDB) directory; empty means DATA_DIR/catalog.",
        _text,
    ),
    Key(
        "storage",
        "catalog_max_size",
        64 * 2**30,
        "Largest size the catalog may grow to, in bytes (sparse file).",
        _integer(2**20, 2**44),
    ),
    Key(
        "storage",
        "reserved_bytes",
        64 * 2**20,
        "Free space, in bytes, that storing never uses on the online tier; "
        "stores that would eat into it are refused with 0xA700.",
        _integer(0, 2**50),
    ),
    Key(
        "storage",
        "duplicate_policy",
        "refuse",
        "What to do when a SOP Instance UID arrives again with different "
        "bytes: refuse (0x0111), keep_first (answer success, keep the stored "
        "copy) or replace (store the new bytes).",
        _one_of(DUPLICATE_POLICIES),
    ),
    Key(
        "access",
        "restrict_storage",
        False,
        "Only peers named in access.storage may store.",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "access",
        "storage",
        [],
        "AE titles of [[peers]] allowed to store (checked with the peer's host).",
        _ae_title_list,
    ),
    Key(
        "access",
        "restrict_query",
        False,
        "Only peers named in access.query may query and retrieve.",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "access",
        "query",
        [],
        "AE titles of [[peers]] allowed to query and retrieve.",
        _ae_title_list,
    ),
    Key("logging", "level", "INFO", "Log level.", _one_of(LOG_LEVELS)),
    Key(
        "logging",
        "format",
        "text",
        "text for people, json (one object per line) for journald.",
        _one_of(LOG_FORMATS),
    ),
)

PEER_KEYS: dict[str, tuple[Callable[[Any], str | None], str]] = {
    "ae_title": (_ae_title, "The peer's AE title."),
    "host": (_text, "Host name or address the peer connects from and listens on."),
    "port": (_integer(1, 65535), "The peer's DICOM port (C-MOVE destination)."),
}


@dataclass(frozen=True)
class Peer:
    """A known DICOM peer: a C-MOVE destination and a caller the lists name."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    """The validated configuration, as typed values and resolved paths."""

    values: dict[str, Any]
    peers: tuple[Peer, ...] = ()
    base_dir: Path = field(default_factory=Path.cwd)

    def get(self, path: str) -> Any:
        return self.values[path]

    @property
    def data_dir(self) -> Path:
        return self._resolve(self.values["storage.data_dir"])

    @property
    def online_path(self) -> Path:
        return self._tier_path("storage.online_path", "online")

    @property
    def catalog_path(self) -> Path:
        return self._tier_path("storage.catalog_path", "catalog")

    @property
    def workers(self) -> int:
        configured = self.values["node.workers"]
        return configured or max(1, os.cpu_count() or 1)

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def _tier_path(self, key: str, default_name: str) -> Path:
        value = self.values[key]
        if value:
            return self._resolve(value)
        return self.data_dir / default_name

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def defaults() -> dict[str, Any]:
    """Every key's default, by dotted path."""
    return {key.path: key.default for key in KEYS}


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a configuration file (or only the defaults).

    ``overrides`` (dotted path to value, e.g. from command-line options) win
    over the file. Raises ConfigError listing every problem found.
    """
    document: dict[str, Any] = {}
    if path is not None:
        document = _read_toml(path)

    values, peers, problems = _validate(document)
    for dotted, value in (overrides or {}).items():
        values[dotted] = value
    problems += _check_references(values, peers)

    if problems:
        raise ConfigError(problems)
    return Config(values=values, peers=tuple(peers), base_dir=Path.cwd())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([("(file)", f"{path} does not exist")]) from None
    except OSError as exc:
        raise ConfigError([("(file)", f"cannot read {path}: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("(file)", f"{path} is not valid TOML: {exc}")]) from exc


def _validate(
    document: dict[str, Any],
) -> tuple[dict[str, Any], list[Peer], list[tuple[str, str]]]:
    values = defaults()
    problems: list[tuple[str, str]] = []
    sections = {key.section for key in KEYS}

    for section, content in document.items():
        if section == "peers":
            continue
        if section not in sections:
            problems.append((section, "unknown section"))
            continue
        if not isinstance(content, dict):
            problems.append((section, "must be a table ([section])"))
            continue
        for name, value in content.items():
            problems += _set_value(values, f"{section}.{name}", value)

    peers, peer_problems = _parse_peers(document.get("peers", []))
    return values, peers, problems + peer_problems


def _set_value(
    values: dict[str, Any], dotted: str, value: Any
) -> list[tuple[str, str]]:
    key = next((k for k in KEYS if k.path == dotted), None)
    if key is None:
        return [(dotted, "unknown key")]
    if isinstance(key.default, float) and isinstance(value, int):
        value = float(value)
    problem = key.check(value)
    if problem:
        return [(dotted, f"{problem} (got {value!r})")]
    values[dotted] = value
    return []


def _parse_peers(raw: Any) -> tuple[list[Peer], list[tuple[str, str]]]:
    if not isinstance(raw, list):
        return [], [("peers", "must be an array of tables ([[peers]])")]

    peers: list[Peer] = []
    problems: list[tuple[str, str]] = []
    for index, entry in enumerate(raw):
        where = f"peers[{index}]"
        if not isinstance(entry, dict):
            problems.append((where, "must be a table"))
            continue
        entry_problems = _peer_problems(where, entry)
        if entry_problems:
            problems += entry_problems
            continue
        peers.append(Peer(entry["ae_title"].strip(), entry["host"], int(entry["port"])))

    seen: set[str] = set()
    for peer in peers:
        if peer.ae_title in seen:
            problems.append(("peers", f"AE title {peer.ae_title!r} is listed twice"))
        seen.add(peer.ae_title)
    return peers, problems


def _peer_problems(where: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for name in entry:
        if name not in PEER_KEYS:
            problems.append((f"{where}.{name}", "unknown key"))
    for name, (check, _help) in PEER_KEYS.items():
        if name not in entry:
            problems.append((f"{where}.{name}", "is required"))
            continue
        problem = check(entry[name])
        if problem:
            problems.append((f"{where}.{name}", f"{problem} (got {entry[name]!r})"))
    return problems


def _check_references(
    values: dict[str, Any], peers: list[Peer]
) -> list[tuple[str, str]]:
    known = {peer.ae_title for peer in peers}
    problems = []
    for list_key in ("access.storage", "access.query"):
        for title in values[list_key]:
            if title.strip() not in known:
                problems.append(
                    (list_key, f"{title!r} is not the AE title of any [[peers]] entry")
                )
    if values["node.ae_title"].strip() in known:
        problems.append(("node.ae_title", "must differ from every peer's AE title"))
    return problems


def example() -> str:
    """A complete configuration file with a comment on every key."""
    lines = [
        "# pacs-appliance configuration. Every key is shown with its default;",
        "# delete the ones you do not change. Durations are in seconds, sizes",
        "# in bytes, relative paths start from the directory the appliance",
        "# starts in.",
    ]
    section = None
    for key in KEYS:
        if key.section != section:
            section = key.section
            lines += ["", f"[{section}]"]
        lines += [f"# {line}" for line in _wrap(key.help)]
        lines.append(f"{key.name} = {toml_value(key.default)}")

    lines += ["", "# Known DICOM peers: C-MOVE destinations, and the callers that"]
    lines += ["# access.storage and access.query name. Repeat the table per peer."]
    for name, (_check, help_text) in PEER_KEYS.items():
        lines.append(f"# {name}: {help_text}")
    lines += ["# [[peers]]", '# ae_title = "WORKSTATION1"', '# host = "127.0.0.1"']
    lines.append("# port = 11113")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 76) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current] if current else lines


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)
