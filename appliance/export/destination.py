"""Where an export goes: an AE title, a host and a port, written AE@host:port."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Characters kept in a destination's folder name; others become "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9.@_-]")


@dataclass(frozen=True)
class Destination:
    """A DICOM node that receives an export."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"

    @property
    def folder_name(self) -> str:
        """The name of the destination's folder under DATA_DIR/exports/:
        the AE title, host and port, with no character a path could misread."""
        return _UNSAFE.sub("_", f"{self.ae_title}@{self.host}-{self.port}")


def ae_title_problem(value: str) -> str | None:
    """What is wrong with an AE title (PS3.5 6.2, VR AE), or None."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16:
        return "an AE title has 1 to 16 characters"
    if not stripped.isascii() or "\\" in stripped:
        return "an AE title is ASCII without backslash"
    if any(ord(c) < 0x20 for c in stripped):
        return "an AE title has no control characters"
    return None


def parse_destination(text: str) -> Destination:
    """``AE@host:port`` (an IPv6 host in brackets: ``AE@[::1]:104``);
    ValueError saying what is wrong."""
    ae_title, at, address = text.rpartition("@")
    if not at:
        raise ValueError(f"{text!r} is not AE@host:port")
    problem = ae_title_problem(ae_title)
    if problem:
        raise ValueError(f"{ae_title!r} in {text!r}: {problem}")

    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r} is not AE@host:port (host or port missing)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]")
    if not host or any(c.isspace() for c in host) or not _resolvable(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    # isdigit() alone takes "²" and other scripts' digits.
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Destination(ae_title.strip(), host, int(port))


def _resolvable(host: str) -> bool:
    """Whether the resolver can be asked for ``host`` at all: a name with
    an empty label ("a..b") or a label over 63 characters makes it raise
    UnicodeError instead of answering."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True
