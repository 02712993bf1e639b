"""Sizes as people write them (``18T``, ``3.84T``) and LTO generations.

Disk and tape capacities are sold in decimal units, so ``1T`` here is
10**12 bytes, as in ``appliance volumes label --capacity``. Memory is
counted in GiB (2**30 bytes), as it is sold.
"""

from __future__ import annotations

import logging
import math
import re

logger = logging.getLogger(__name__)

GIB = 2**30

_FACTORS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)B?\s*", re.IGNORECASE)

# Native (uncompressed) capacity of one cartridge, in bytes. Packs are
# compressed and encrypted already, so drive compression adds nothing.
LTO_NATIVE: dict[str, int] = {
    "LTO-5": 1_500 * 10**9,
    "LTO-6": 2_500 * 10**9,
    "LTO-7": 6 * 10**12,
    "LTO-8": 12 * 10**12,
    "LTO-9": 18 * 10**12,
}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional K, M, G, T or P suffix.

    Raises ValueError for anything else, and for sizes of 0 bytes.
    """
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 800G or 3.84T")
    number, unit = match.groups()
    value = float(number) * _FACTORS[unit.upper()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} must be at least 1 byte")
    return int(value)


def format_size(count: float) -> str:
    """A byte count in decimal units with two decimals: ``12.00 TB``."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            return f"{int(count)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} PB"


def format_gib(count: int) -> str:
    """A memory size in GiB with one decimal: ``31.3 GiB``."""
    return f"{count / GIB:.1f} GiB"
