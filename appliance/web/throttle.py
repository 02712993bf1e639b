"""Failed web logins counted, and who made too many of them locked out.

Failures are counted twice: for the pair (client address, user name) and
for the client address alone. Either count reaching its limit within the
window locks that pair or that address: its requests are answered 429
(RFC 6585 4) with Retry-After, without their credentials being checked,
until the lock ends. The first lock lasts a minute, each further lock of
the same pair or address twice as long as the one before, up to the
longest lock; a successful login of the pair clears its count.

Nothing is counted per user name alone, so that someone guessing the
administrator's password from one address cannot lock the administrator
out everywhere: a correct login from another address still works. The
cost is that guesses spread over many addresses are slowed only by the
password hash.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Seconds the first lock of a pair or address lasts.
FIRST_LOCK = 60.0
# Pairs and addresses remembered at most: someone spraying user names or
# addresses must not grow the table without bound.
_REMEMBERED = 10_000


@dataclass
class _Record:
    """The recent failures of one pair or address, and its lock."""

    failures: deque[float] = field(default_factory=deque)
    locks: int = 0
    locked_until: float = 0.0
    last_seen: float = 0.0


@dataclass(frozen=True)
class Lock:
    """A lock that has just begun: whom it holds and for how long."""

    address: str
    user: str | None  # None: the address, whatever the user names
    seconds: float
    failures: int


class LoginThrottle:
    """Counts failed logins per (address, user) and per address.

    ``clock`` gives seconds (monotonic); tests pass their own.
    """

    def __init__(
        self,
        pair_failures: int = 5,
        address_failures: int = 20,
        window: float = 300.0,
        longest_lock: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pair_failures = pair_failures
        self.address_failures = address_failures
        self.window = window
        self.longest_lock = longest_lock
        self.clock = clock
        self._records: dict[tuple[str, str | None], _Record] = {}
        self._lock = threading.Lock()

    def wait(self, address: str, user: str) -> int:
        """Whole seconds until ``user`` may try to log in from ``address``
        again; 0 when neither the pair nor the address is locked."""
        now = self.clock()
        with self._lock:
            until = max(
                self._until((address, user), now), self._until((address, None), now)
            )
        return math.ceil(until - now) if until > now else 0

    def failed(self, address: str, user: str) -> list[Lock]:
        """Count a failed login; the locks it begins (to be logged once)."""
        now = self.clock()
        begun = []
        with self._lock:
            self._forget_old(now)
            for key, limit in (
                ((address, user), self.pair_failures),
                ((address, None), self.address_failures),
            ):
                seconds = self._count(key, limit, now)
                if seconds:
                    begun.append(Lock(address, key[1], seconds, limit))
        return begun

    def succeeded(self, address: str, user: str) -> None:
        """A correct login of the pair: its failures and lock history go."""
        with self._lock:
            self._records.pop((address, user), None)

    def _until(self, key: tuple[str, str | None], now: float) -> float:
        record = self._records.get(key)
        return record.locked_until if record is not None else 0.0

    def _count(self, key: tuple[str, str | None], limit: int, now: float) -> float:
        """Add a failure to ``key``; the seconds of the lock it begins, or 0."""
        record = self._records.setdefault(key, _Record())
        record.last_seen = now
        if record.locked_until > now:
            # Already locked (a request that was checked before the lock).
            return 0.0
        record.failures.append(now)
        while record.failures and record.failures[0] <= now - self.window:
            record.failures.popleft()
        if len(record.failures) < limit:
            return 0.0
        seconds = min(FIRST_LOCK * 2**record.locks, self.longest_lock)
        record.locks += 1
        record.locked_until = now + seconds
        record.failures.clear()
        return seconds

    def _forget_old(self, now: float) -> None:
        """Drop records quiet for longer than a window and the longest
        lock, so that a lock's growth is forgotten in time; past the
        table's size, the quietest go first."""
        quiet = now - self.window - self.longest_lock
        stale = [k for k, r in self._records.items() if r.last_seen < quiet]
        for key in stale:
            del self._records[key]
        if len(self._records) >= _REMEMBERED:
            by_age = sorted(self._records, key=lambda k: self._records[k].last_seen)
            for key in by_age[: len(self._records) - _REMEMBERED // 2]:
                del self._records[key]
