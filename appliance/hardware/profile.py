"""Hardware profiles: what a supported layout is expected to have.

A profile is a TOML file (``hardware/NAME.toml``, described in
``hardware/README.md``)::

    [profile]   name, summary
    [host]      min_memory_gib, min_cpu_cores, min_open_files
    [online]    mount, device, raid, array, media, capacity
    [nearline]  (the same keys)
    [catalog]   (the same keys)
    [offline]   kind, drives, changer, generation, copies
    [mirror]    kind

Every section but ``[profile]`` is optional, and so is every key in it: a
profile states only what it expects. Loading checks every key and raises
ProfileError listing every problem, each named by its key.
"""

from __future__ import annotations

import logging
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import MIRROR_KINDS, VOLUME_KINDS
from appliance.errors import ConfigError
from appliance.hardware.units import LTO_NATIVE, parse_size
from appliance.toml_text import shown

logger = logging.getLogger(__name__)

AREAS = ("online", "nearline", "catalog")
RAID_LEVELS = ("none", "raid1", "raid5", "raid6", "raid10")
SOFTWARE_RAID = ("raid1", "raid5", "raid6", "raid10")
MEDIA = ("nvme", "ssd", "hdd")

# Where ``--profile NAME`` looks, after the current folder's hardware/: the
# checkout the code runs from, and an installation's folder, where the
# virtual environment sits beside hardware/ (/opt/pacs-appliance/.venv).
REPOSITORY_PROFILES = Path(__file__).resolve().parents[2] / "hardware"
INSTALLED_PROFILES = Path(sys.prefix).parent / "hardware"

Check = Callable[[Any], str | None]


class ProfileError(ConfigError):
    """A hardware profile cannot be found, read or is invalid.

    Like ConfigError, ``problems`` lists ``(key, message)`` pairs.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.source = source
        lines = [f"{key}: {message}" for key, message in problems]
        self.args = (f"hardware profile {source}:\n  " + "\n  ".join(lines),)


@dataclass(frozen=True)
class Area:
    """What a profile expects of one storage area: a tier or the catalog.

    ``mount`` is the mount point the area's folder must be on (its own file
    system), ``device`` the block device mounted there, ``raid`` the RAID
    level, ``array`` the software RAID array (``md0``) in /proc/mdstat, and
    ``capacity`` the least size of its file system, in bytes.
    """

    name: str
    mount: str | None = None
    device: str | None = None
    raid: str | None = None
    array: str | None = None
    media: str | None = None
    capacity: int | None = None


@dataclass(frozen=True)
class Offline:
    """What a profile expects of the offline tier's volume library."""

    kind: str = "directory"
    drives: int = 0
    changer: bool = False
    generation: str | None = None
    copies: int = 1

    @property
    def media_capacity(self) -> int | None:
        """The native capacity of one cartridge, when a generation is given."""
        return LTO_NATIVE.get(self.generation or "")


@dataclass(frozen=True)
class Profile:
    """A loaded hardware profile; ``source`` is the file it came from."""

    name: str
    summary: str
    source: str
    min_memory_gib: float | None = None
    min_cpu_cores: int | None = None
    min_open_files: int | None = None
    areas: Mapping[str, Area] = field(default_factory=dict)
    offline: Offline | None = None
    mirror_kind: str | None = None


NO_PROFILE = Profile("(none)", "no profile: only the configuration is checked", "")


# --- checks of single values -----------------------------------------------


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer from {low} to {high}"
        return None if low <= value <= high else f"must be from {low} to {high}"

    return check


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number from {low:g} to {high:g}"
        return None if low <= value <= high else f"must be from {low:g} to {high:g}"

    return check


def _one_of(choices: Iterable[str]) -> Check:
    allowed = tuple(choices)

    def check(value: Any) -> str | None:
        if value in allowed:
            return None
        return "must be one of " + ", ".join(repr(c) for c in allowed)

    return check


def _absolute(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("/"):
        return 'must be an absolute path, e.g. "/srv/pacs/online"'
    return None


def _device(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("/dev/"):
        return 'must be a device under /dev, e.g. "/dev/md0"'
    return None


def _array(value: Any) -> str | None:
    if not isinstance(value, str) or not re.fullmatch(r"md[A-Za-z0-9_]+", value):
        return 'must be an array name as /proc/mdstat shows it, e.g. "md0"'
    return None


def _size(value: Any) -> str | None:
    try:
        parse_size(value)
    except ValueError:
        return 'must be a size such as "800G" or "3.84T" (decimal units)'
    return None


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be text"


def _name(value: Any) -> str | None:
    if isinstance(value, str) and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", value):
        return None
    return "must be 1 to 64 lower-case letters, digits or '-'"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


_AREA_KEYS: dict[str, Check] = {
    "mount": _absolute,
    "device": _device,
    "raid": _one_of(RAID_LEVELS),
    "array": _array,
    "media": _one_of(MEDIA),
    "capacity": _size,
}

SCHEMA: dict[str, dict[str, Check]] = {
    "profile": {"name": _name, "summary": _text},
    "host": {
        "min_memory_gib": _number(0.5, 65536),
        "min_cpu_cores": _integer(1, 1024),
        "min_open_files": _integer(64, 2**30),
    },
    **{area: _AREA_KEYS for area in AREAS},
    "offline": {
        "kind": _one_of(VOLUME_KINDS),
        "drives": _integer(0, 64),
        "changer": _boolean,
        "generation": _one_of(LTO_NATIVE),
        "copies": _integer(1, 4),
    },
    "mirror": {"kind": _one_of(MIRROR_KINDS)},
}

# --- loading -----------------------------------------------------------------


def load_profile(path: Path) -> Profile:
    """Read and validate the profile in ``path``; raises ProfileError."""
    document = _read(path)
    problems = _problems(document)
    if problems:
        raise ProfileError(str(path), problems)
    profile = _build(document, str(path))
    logger.debug("hardware profile %s loaded from %s", profile.name, path)
    return profile


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ProfileError(str(path), [("(file)", "does not exist")]) from None
    except OSError as exc:
        raise ProfileError(str(path), [("(file)", f"cannot be read: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        problem = [("(file)", f"is not valid TOML: {exc}")]
        raise ProfileError(str(path), problem) from exc


def _problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for section, content in document.items():
        keys = SCHEMA.get(section)
        if keys is None:
            problems.append((section, "unknown section"))
        elif not isinstance(content, dict):
            problems.append((section, "must be a table ([section])"))
        else:
            problems += _section_problems(section, content, keys)

    for name in ("name", "summary"):
        if name not in document.get("profile", {}):
            problems.append((f"profile.{name}", "is required"))
    if problems:
        return problems
    return _area_problems(document) + _offline_problems(document.get("offline", {}))


def _section_problems(
    section: str, content: dict[str, Any], keys: dict[str, Check]
) -> list[tuple[str, str]]:
    problems = []
    for name, value in content.items():
        check = keys.get(name)
        problem = "unknown key" if check is None else check(value)
        if problem:
            got = "" if check is None else f" (got {shown(value)})"
            problems.append((f"{section}.{name}", problem + got))
    return problems


def _area_problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for area in AREAS:
        content = document.get(area, {})
        if "array" in content and content.get("raid") not in SOFTWARE_RAID:
            problems.append(
                (
                    f"{area}.raid",
                    "must be one of " + ", ".join(SOFTWARE_RAID) + " when "
                    f"{area}.array names a software RAID array",
                )
            )
    return problems


def _offline_problems(content: dict[str, Any]) -> list[tuple[str, str]]:
    if content.get("kind", "directory") == "tape":
        return []
    return [
        (f"offline.{name}", 'applies to kind = "tape" only')
        for name in ("drives", "changer", "generation")
        if name in content
    ]


def _build(document: dict[str, Any], source: str) -> Profile:
    host = document.get("host", {})
    areas = {
        area: _build_area(area, document[area]) for area in AREAS if area in document
    }
    offline = None
    if "offline" in document:
        offline = Offline(**document["offline"])
    return Profile(
        name=document["profile"]["name"],
        summary=document["profile"]["summary"].strip(),
        source=source,
        min_memory_gib=host.get("min_memory_gib"),
        min_cpu_cores=host.get("min_cpu_cores"),
        min_open_files=host.get("min_open_files"),
        areas=areas,
        offline=offline,
        mirror_kind=document.get("mirror", {}).get("kind"),
    )


def _build_area(name: str, content: dict[str, Any]) -> Area:
    values = dict(content)
    if "capacity" in values:
        values["capacity"] = parse_size(values["capacity"])
    return Area(name=name, **values)


# --- finding profiles ----------------------------------------------------------


def search_path() -> tuple[Path, ...]:
    """Folders searched for ``NAME.toml``: ./hardware, then the checkout's,
    then the installation's."""
    return (Path.cwd() / "hardware", REPOSITORY_PROFILES, INSTALLED_PROFILES)


def find_profile(wanted: str, folders: Iterable[Path] | None = None) -> Path:
    """The file for ``--profile``: a path (with ``/`` or ending ``.toml``)
    as given, otherwise ``NAME.toml`` in the first folder holding it."""
    if "/" in wanted or wanted.endswith(".toml"):
        return Path(wanted)
    searched = tuple(folders if folders is not None else search_path())
    for folder in searched:
        candidate = folder / f"{wanted}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({path.stem for path in available(searched)})
    listing = ", ".join(known) if known else "none found"
    raise ProfileError(
        wanted,
        [("(name)", f"no profile of that name; known profiles: {listing}")],
    )


def available(folders: Iterable[Path] | None = None) -> list[Path]:
    """Every profile file in the search folders; the first of a name wins."""
    found: dict[str, Path] = {}
    for folder in folders if folders is not None else search_path():
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return sorted(found.values(), key=lambda path: path.stem)
