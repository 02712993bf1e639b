"""Remote names on the mirror: a strict grammar, so that none leaves its root.

A remote name is one to eight segments joined by ``/``. A segment is 1 to
100 ASCII letters, digits, ``.``, ``_`` or ``-`` and starts with a letter or
a digit, so ``.``, ``..``, hidden files, absolute paths, empty segments,
spaces and backslashes cannot be written. Examples::

    packs/123/p-000000123.pack
    catalog/snapshot-000000000042
    journal/000000000001-000000000124

A name never ends in ``.partial``: that suffix marks an upload in progress
(``packs/123/p-000000123.pack.partial``), which is never listed as a file.
"""

from __future__ import annotations

import re

PARTIAL_SUFFIX = ".partial"

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT}){{0,7}}")
# A prefix is whole segments, each followed by "/", then the start of one
# more segment (possibly empty): "", "packs/", "packs/12", "catalog/snap".
_PREFIX = re.compile(rf"(?:{_SEGMENT}/){{0,7}}(?:{_SEGMENT})?")


def is_valid_name(name: object) -> bool:
    """Whether ``name`` may name a file on the mirror."""
    return (
        isinstance(name, str)
        and _NAME.fullmatch(name) is not None
        and not name.endswith(PARTIAL_SUFFIX)
    )


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid remote name, else raise ValueError."""
    if not is_valid_name(name):
        raise ValueError(
            f"name {name!r} is not a remote name: use 1 to 8 segments of "
            "letters, digits, '.', '_' or '-' joined by '/', each starting "
            f"with a letter or digit, and not ending in {PARTIAL_SUFFIX!r}"
        )
    return name


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if names can start with it, else raise ValueError."""
    if not isinstance(prefix, str) or _PREFIX.fullmatch(prefix) is None:
        raise ValueError(
            f"prefix {prefix!r} cannot start a remote name: use whole "
            "segments ending in '/', optionally followed by the start of one"
        )
    return prefix


def partial_name(name: str) -> str:
    """The temporary name an upload of ``name`` is written under."""
    return name + PARTIAL_SUFFIX


def is_partial(path: str) -> bool:
    """Whether a remote path is an upload in progress."""
    return path.endswith(PARTIAL_SUFFIX)


def parent_of(prefix: str) -> str:
    """The folder holding every name that starts with ``prefix`` ("" = root)."""
    return prefix.rpartition("/")[0]


def folders_of(path: str) -> list[str]:
    """The folders above a remote path, outermost first (``a``, ``a/b``)."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
