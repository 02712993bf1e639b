"""Text that came from a peer, fit to quote in one log line.

A sender's bytes (a UID, an HL7 field, a file name) may hold a line break
or another control character; written raw, it would split a log line or
forge a new one. Such characters are shown as ``\\xNN`` instead.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """``text`` with each control character shown as ``\\xNN``: what a
    sender wrote, fit to quote in one log line and an answer."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)
