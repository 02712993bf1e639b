"""Values of a TOML file as its author wrote them, for messages.

A problem found in a configuration file or a hardware profile quotes the
value it got. Python's ``repr`` spells booleans ``True`` and ``False``,
which a TOML file cannot hold: quoting them as the file spells them
(``true``, ``false``) points the reader at what to change.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def shown(value: Any) -> str:
    """``value`` for a message: booleans, lists and tables as TOML spells
    them; everything else (strings, numbers) as ``repr`` does, which for
    them reads as TOML too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{name} = {shown(item)}" for name, item in value.items())
        return "{" + ", ".join(pairs) + "}"
    return repr(value)
