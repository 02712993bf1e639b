"""When to try again after the mirror could not be reached: capped
exponential backoff."""

from __future__ import annotations


def backoff_delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...).

    ``first``, then twice as long after each further failure, never more
    than ``cap``: 1, 2, 4, 8, ... 60, 60 with the defaults.
    """
    if failures < 1:
        raise ValueError(f"failures must be 1 or more, not {failures}")
    # Cap the exponent too, so that a long outage cannot overflow a float.
    return float(min(cap, first * 2 ** min(failures - 1, 62)))
