"""The replication bandwidth limiter: a weekly timetable of rates, a token
bucket that keeps uploads to the mirror under the rate, and a runtime
override that the command line writes for the service to read.

Timetable
---------
One string (``replication.timetable``) describes the rate for every minute
of the week, in the appliance's local wall-clock time::

    timetable := "" | group (";" group)*
    group     := [weekdays] slot (" " slot)*  |  [weekdays] rate
    weekdays  := day ("," day)*      where day is NAME or NAME "-" NAME
    NAME      := mon | tue | wed | thu | fri | sat | sun
    slot      := HH:MM "," rate      "from this time on, this rate"
    rate      := off | pause | 0 | NUMBER UNIT ["/s"]
    UNIT      := KB | MB | GB        (bytes: 1 MB = 1,000,000 bytes)
               | kbit | Mbit | Gbit  (bits: 100Mbit = 12.5 MB/s)

Examples: ``"off"``, ``"07:00,2MB 19:00,40MB"``,
``"mon-fri 07:00,2MB 19:00,40MB; sat-sun off"``,
``"sat,sun 10:00,5MB; 07:00,2MB 19:00,off"``.

- ``off`` sends without limit, ``pause`` (or ``0``, ``0MB``) sends nothing.
  An empty string or ``off`` alone means no limit at any time.
- A rate alone (``sat-sun off``) holds the whole day, from 00:00.
- Each slot holds until the next slot starts; the last slot of a day holds
  past midnight until the next day's first slot, whichever group that day
  belongs to. Slots are listed in order of time, at most one per minute.
- Weekday ranges may wrap (``fri-mon``). A day belongs to at most one group.
  One group may leave out the weekdays: it covers every day no other group
  names. Days that no group covers send without limit (from 00:00).
- Day names, ``off`` and ``pause`` are case-insensitive. Units are written
  as shown (``kbit`` in any case); ``Mb``, ``mb`` or ``kb`` are refused as
  ambiguous between bits and bytes. Rates below 1 KB/s are refused.

Limiter
-------
A token bucket holding at most ``burst_seconds`` of the current rate. A
request waits, first come first served, until the bucket holds its bytes;
a request larger than the bucket waits until the bucket is full, then takes
everything and leaves a debt that later requests wait out. Bytes released
over any window of W seconds are therefore at most ``rate * W`` plus the
larger of the bucket and the largest request: within 10% of the rate over
30 s as long as requests stay below 3 s worth of the rate (acquire per
block of the upload, e.g. 1 MiB, rather than per pack).

Override file
-------------
``appliance replication rate`` (another process) writes a small JSON file
that the limiter re-reads every few seconds; it replaces the timetable
until ``until`` passes, or until the file is removed::

    {"version": 1, "rate": 5000000.0, "until": "2024-06-01T19:00:00+02:00"}

``rate`` is bytes per second, ``null`` for no limit or ``"pause"``;
``until`` is an ISO 8601 time with its UTC offset, or ``null`` for an
override that lasts until it is cleared. A damaged file is ignored (with
one warning) and the timetable applies.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any, Literal

from appliance.errors import LimiterClosed, StorageError
from appliance.storage.durable import (
    fsync_directory,
    make_directories,
    move_into_place,
    translate_os_error,
)

logger = logging.getLogger(__name__)

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_MINUTES = 24 * 60
WEEK_MINUTES = 7 * DAY_MINUTES
MIN_RATE = 1000.0  # bytes per second; anything slower is surely a typo
OVERRIDE_VERSION = 1

_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([A-Za-z]*)(?:/s)?")
_BYTE_UNITS = {"KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9}
_BIT_UNITS = {
    "kbit": ("kbit", 1e3 / 8),
    "mbit": ("Mbit", 1e6 / 8),
    "gbit": ("Gbit", 1e9 / 8),
}
_RATE_WORDS = ("off", "pause")
_RATE_USAGE = "write off, pause, 0 or a number with a unit, e.g. 2MB"
_UNIT_USAGE = "use KB, MB, GB (bytes per second) or kbit, Mbit, Gbit (bits per second)"

# The rate is looked up again at least this often even if the timetable
# announces no change, so that a wall-clock jump (NTP, DST) is noticed.
_RECHECK_SECONDS = 60.0
# The shortest sleep: a shorter one may not move a large monotonic clock
# reading at all, and the loop would spin.
_MIN_SLEEP = 0.001
_HISTORY_SECONDS = 300

Rate = float | None
"""Bytes per second; ``None`` sends without limit and ``0.0`` sends nothing."""


# -- Rates ---------------------------------------------------------------


def parse_rate(text: str) -> Rate:
    """Read one rate (``off``, ``pause``, ``0``, ``2MB``, ``100Mbit/s``).

    Returns bytes per second, ``None`` for no limit, ``0.0`` for pause;
    raises ValueError saying what is wrong.
    """
    return _parse_rate(text)[0]


def format_rate(rate: Rate) -> str:
    """Show a rate for people: ``unlimited``, ``paused`` or ``2 MB/s``."""
    if rate is None:
        return "unlimited"
    if rate == 0:
        return "paused"
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if rate >= size:
            return f"{rate / size:.3g} {unit}/s"
    return f"{rate / 1e3:.3g} KB/s"


def _parse_rate(text: str) -> tuple[Rate, str]:
    """A rate and its label as written (``100 Mbit/s``), or ValueError."""
    word = text.lower()
    if word == "off":
        return None, "unlimited"
    if word == "pause":
        return 0.0, "paused"
    match = _RATE.fullmatch(text)
    if not match:
        raise ValueError(f"rate {text!r} is not understood; {_RATE_USAGE}")

    number, unit = float(match[1]), match[2]
    if number == 0:
        return 0.0, "paused"
    if not unit:
        raise ValueError(f"rate {text!r} needs a unit, e.g. {text}MB")
    name, factor = _unit(unit)
    if number * factor < MIN_RATE:
        raise ValueError(
            f"rate {number:g} {name}/s is below 1 KB/s; "
            "write 0 or pause to stop sending"
        )
    return number * factor, f"{number:g} {name}/s"


def _unit(unit: str) -> tuple[str, float]:
    """The canonical name and bytes-per-second factor of a rate unit."""
    if unit in _BYTE_UNITS:
        return unit.upper(), _BYTE_UNITS[unit]
    if unit.lower() in _BIT_UNITS:
        return _BIT_UNITS[unit.lower()]
    if unit.lower() in ("kb", "mb", "gb"):
        # A network engineer's "Mb" is megabits, a storage one's megabytes:
        # eight times apart, so neither reading is guessed.
        prefix = unit[0].upper()
        raise ValueError(
            f"unit {unit!r} is ambiguous; write {prefix}B for bytes or "
            f"{'k' if prefix == 'K' else prefix}bit for bits per second"
        )
    raise ValueError(f"unit {unit!r} is not known; {_UNIT_USAGE}")


# -- Timetable -----------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A stretch of the timetable: from ``start`` on ``days``, ``rate``."""

    days: str
    start: clock_time
    rate: Rate
    rate_text: str

    @property
    def description(self) -> str:
        """For people and logs, e.g. ``mon-fri from 07:00: 2 MB/s``."""
        return f"{self.days} from {self.start:%H:%M}: {self.rate_text}"


@dataclass(frozen=True)
class Timetable:
    """The rate for every minute of a week, parsed from the config string.

    ``starts`` holds the minutes since Monday 00:00 at which another slot
    takes over, in order; ``slots`` the slot taking over there. A slot holds
    until the next start, and the week's last slot holds into the next week.
    """

    text: str
    starts: tuple[int, ...] = field(repr=False)
    slots: tuple[Slot, ...] = field(repr=False)

    def slot_at(self, when: datetime) -> Slot:
        """The slot in force at wall-clock time ``when``."""
        # Before the week's first start, index -1 is the week's last slot:
        # Sunday's last slot running on past midnight.
        index = bisect.bisect_right(self.starts, _minute_of_week(when)) - 1
        return self.slots[index]

    def rate_at(self, when: datetime) -> Rate:
        """Bytes per second allowed at ``when``; None means no limit."""
        return self.slot_at(when).rate

    def next_change(self, when: datetime) -> datetime:
        """When another slot takes over, strictly after ``when``.

        The next slot may have the same rate. A timetable of one slot
        (``off``, ``07:00,2MB``) returns that slot's next start on a Monday.
        """
        index = bisect.bisect_right(self.starts, _minute_of_week(when))
        if index < len(self.starts):
            start = self.starts[index]
        else:
            start = self.starts[0] + WEEK_MINUTES
        monday = when.replace(hour=0, minute=0, second=0, microsecond=0)
        monday -= timedelta(days=when.weekday())
        return monday + timedelta(minutes=start)


@dataclass(frozen=True)
class _Group:
    """One ``;``-separated part: its weekdays (None: the others), slots."""

    number: int
    text: str
    days: frozenset[int] | None
    slots: tuple[tuple[int, Rate, str], ...]  # minute of day, rate, label


def parse_timetable(text: str) -> Timetable:
    """Read a timetable string; raise ValueError saying what and where.

    The grammar is in this module's docstring. Messages name the group
    (when there are several) and the slot, e.g. ``slot 2 '25:00,2MB':
    hour must be 00-23``.
    """
    if not text.strip():
        text = "off"
    parts = text.split(";")
    several = len(parts) > 1
    groups = [
        _parse_group(part, number, several)
        for number, part in enumerate(parts, start=1)
    ]
    _check_groups(groups, several)
    return _build(text, groups)


def check_timetable(value: Any) -> str | None:
    """A config schema check: None if ``value`` is a valid timetable."""
    if not isinstance(value, str):
        return 'must be a string such as "07:00,2MB 19:00,40MB"'
    try:
        parse_timetable(value)
    except ValueError as exc:
        return str(exc)
    return None


def _parse_group(text: str, number: int, several: bool) -> _Group:
    prefix = f"group {number}, " if several else ""
    tokens = text.split()
    if not tokens:
        raise ValueError(f"group {number} is empty; remove the extra ';'")

    # A bare rate is named in messages by its group, if there are several.
    rate_prefix = f"{_group_where(number, text, several)}: " if several else ""
    days = None
    if tokens[0][0].isalpha() and tokens[0].lower() not in _RATE_WORDS:
        if len(tokens) == 1 and not _looks_like_days(tokens[0]):
            _parse_rate_in(tokens[0], rate_prefix)  # a mistyped rate: say so
        days = _parse_days_in(tokens[0], prefix)
        tokens = tokens[1:]
        if not tokens:
            raise ValueError(
                f"{_group_where(number, text, several)}: weekdays must be "
                "followed by slots (HH:MM,RATE) or a rate"
            )

    slots: tuple[tuple[int, Rate, str], ...]
    if len(tokens) == 1 and not set(tokens[0]) & set(",:"):
        slots = ((0, *_parse_rate_in(tokens[0], rate_prefix)),)
    else:
        slots = _parse_slots(tokens, prefix)
    return _Group(number, text.strip(), days, slots)


def _looks_like_days(token: str) -> bool:
    try:
        _parse_days(token)
    except ValueError:
        return False
    return True


def _parse_rate_in(token: str, prefix: str) -> tuple[Rate, str]:
    try:
        return _parse_rate(token)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None


def _parse_days_in(token: str, prefix: str) -> frozenset[int]:
    try:
        return _parse_days(token)
    except ValueError as exc:
        raise ValueError(f"{prefix}weekdays {token!r}: {exc}") from None


def _parse_days(token: str) -> frozenset[int]:
    """Weekday numbers (Monday = 0) of ``mon-fri``, ``sat,sun``, ``fri-mon``."""
    days: set[int] = set()
    for item in token.lower().split(","):
        first, dash, last = item.partition("-")
        start = _day_number(first)
        end = _day_number(last) if dash else start
        days.update((start + step) % 7 for step in range((end - start) % 7 + 1))
    return frozenset(days)


def _day_number(name: str) -> int:
    if not name:
        raise ValueError("a day name is missing")
    if name not in DAY_NAMES:
        names = ", ".join(DAY_NAMES[:-1])
        raise ValueError(f"{name!r} is not a day; use {names} or {DAY_NAMES[-1]}")
    return DAY_NAMES.index(name)


def _parse_slots(tokens: list[str], prefix: str) -> tuple[tuple[int, Rate, str], ...]:
    slots: list[tuple[int, Rate, str]] = []
    for number, token in enumerate(tokens, start=1):
        where = f"{prefix}slot {number} {token!r}"
        try:
            minute, rate, label = _parse_slot(token)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if slots and minute <= slots[-1][0]:
            raise ValueError(
                f"{where}: {_hhmm(minute)} is not after the previous slot's "
                f"{_hhmm(slots[-1][0])}; list slots in order of time"
            )
        slots.append((minute, rate, label))
    return tuple(slots)


def _parse_slot(token: str) -> tuple[int, Rate, str]:
    time_text, comma, rate_text = token.partition(",")
    if not comma or "," in rate_text:
        raise ValueError("expected HH:MM,RATE, e.g. 07:00,2MB")
    match = _TIME.fullmatch(time_text)
    if not match:
        raise ValueError("time must be HH:MM, e.g. 07:00")
    hour, minute = int(match[1]), int(match[2])
    if hour > 23:
        raise ValueError("hour must be 00-23")
    if minute > 59:
        raise ValueError("minute must be 00-59")
    return (hour * 60 + minute, *_parse_rate(rate_text))


def _check_groups(groups: list[_Group], several: bool) -> None:
    """A day in one group only; one group at most without weekdays."""
    owner: dict[int, int] = {}
    default: int | None = None
    for group in groups:
        where = _group_where(group.number, group.text, several)
        if group.days is None:
            if default is not None:
                raise ValueError(
                    f"{where}: only one group may leave out the weekdays "
                    f"(group {default} does)"
                )
            default = group.number
            continue
        for day in sorted(group.days):
            if day in owner:
                raise ValueError(
                    f"{where}: {DAY_NAMES[day]} is already in group {owner[day]}"
                )
            owner[day] = group.number


def _build(text: str, groups: list[_Group]) -> Timetable:
    named = frozenset().union(*(g.days for g in groups if g.days is not None))
    others = frozenset(range(7)) - named
    points: list[tuple[int, Slot]] = []
    for group in groups:
        days = others if group.days is None else group.days
        points += _points(days, group.slots)
    if others and all(g.days is not None for g in groups):
        unnamed = ((0, None, "unlimited (no group names these days)"),)
        points += _points(others, unnamed)
    points.sort(key=lambda point: point[0])
    points = _without_repeats(points)
    return Timetable(
        text, tuple(start for start, _ in points), tuple(s for _, s in points)
    )


def _without_repeats(points: list[tuple[int, Slot]]) -> list[tuple[int, Slot]]:
    """Drop starts of the slot already in force (``2MB`` starts every day).

    Then ``next_change`` announces real changes only; the week's last slot
    is in force before the first start, hence the cyclic comparison.
    """
    kept = [
        point
        for index, point in enumerate(points)
        if point[1] is not points[index - 1][1]
    ]
    return kept or points[:1]


def _points(
    days: frozenset[int], slots: tuple[tuple[int, Rate, str], ...]
) -> list[tuple[int, Slot]]:
    """Each slot of a group, on each of its days, as (minute of week, slot)."""
    label = _days_label(days)
    made = [
        (minute, Slot(label, clock_time(minute // 60, minute % 60), rate, text))
        for minute, rate, text in slots
    ]
    return [
        (day * DAY_MINUTES + minute, slot)
        for day in sorted(days)
        for minute, slot in made
    ]


def _days_label(days: frozenset[int]) -> str:
    """``daily``, ``mon-fri`` or ``mon, wed-thu``: runs of the week's days."""
    if len(days) == 7:
        return "daily"
    runs: list[list[int]] = []
    for day in sorted(days):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return ", ".join(
        DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}"
        for r in runs
    )


def _group_where(number: int, text: str, several: bool) -> str:
    return f"group {number} {text.strip()!r}" if several else repr(text.strip())


def _minute_of_week(when: datetime) -> int:
    return when.weekday() * DAY_MINUTES + when.hour * 60 + when.minute


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# -- Override file -------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """A rate set at runtime, replacing the timetable until ``until``."""

    rate: Rate
    until: datetime | None  # with its UTC offset; None lasts until cleared

    def active(self, now: datetime) -> bool:
        """Whether the override still holds at wall-clock time ``now``."""
        return self.until is None or _aware(now) < self.until

    @property
    def description(self) -> str:
        """For people and logs, e.g. ``override until 2024-06-01 19:00: ...``."""
        if self.until is None:
            return f"override without expiry: {format_rate(self.rate)}"
        until = self.until.astimezone()
        return f"override until {until:%Y-%m-%d %H:%M}: {format_rate(self.rate)}"


def write_override(
    path: Path, rate: float | Literal["pause"] | None, until: datetime | None
) -> None:
    """Durably write an override for the limiter of the running service.

    ``rate`` is bytes per second, None for no limit, ``"pause"`` or 0 to
    stop sending; ``until`` (local time if naive) ends it, None never does.
    Raises ValueError for a bad rate, StorageError if the file cannot be
    written.
    """
    record = {
        "version": OVERRIDE_VERSION,
        "rate": _rate_field(rate),
        "until": None if until is None else _aware(until).isoformat(),
    }
    _write_durably(path, (json.dumps(record) + "\n").encode())


def read_override(path: Path) -> Override | None:
    """The override in ``path``, or None if there is no such file.

    Raises ValueError if the file is not a valid override, StorageError if
    it cannot be read.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise translate_os_error(exc, f"cannot read {path}") from exc
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a bandwidth override: not UTF-8") from None
    try:
        return _override_from(json.loads(text))
    except ValueError as exc:
        raise ValueError(f"{path} is not a bandwidth override: {exc}") from None


def clear_override(path: Path) -> None:
    """Remove the override file durably: the timetable applies again."""
    if not path.parent.is_dir():
        return
    try:
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)
    except OSError as exc:
        raise translate_os_error(exc, f"cannot remove {path}") from exc


def _rate_field(rate: float | str | None) -> float | str | None:
    if rate is None:
        return None
    if rate == "pause" or rate == 0:
        return "pause"
    usage = 'rate must be bytes per second (> 0), None or "pause"'
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ValueError(f"{usage}, not {rate!r}")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{usage}, not {rate!r}")
    return float(rate)


def _override_from(record: Any) -> Override:
    if not isinstance(record, dict) or record.get("version") != OVERRIDE_VERSION:
        raise ValueError(f"expected a JSON object with version {OVERRIDE_VERSION}")
    if "rate" not in record or "until" not in record:
        raise ValueError("rate or until is missing")
    rate = _rate_field(record["rate"])
    return Override(
        None if rate is None else 0.0 if rate == "pause" else float(rate),
        _until_from(record["until"]),
    )


def _until_from(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        return _aware(datetime.fromisoformat(value))
    except (TypeError, ValueError):
        raise ValueError(
            f"until must be an ISO 8601 time or null, not {value!r}"
        ) from None


def _write_durably(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename, directory fsync: all of it or none."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        make_directories(path.parent, Path(path.parent.anchor))
        temporary.write_bytes(data)
        move_into_place(temporary, path, path.parent)
    except OSError as exc:
        raise translate_os_error(exc, f"cannot write {path}") from exc
    finally:
        # Cleanup must not hide the error being raised (e.g. no folder).
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _aware(when: datetime) -> datetime:
    """``when`` with a UTC offset; a naive time is taken as local time."""
    return when if when.tzinfo is not None else when.astimezone()


# -- Limiter -------------------------------------------------------------


class Limiter:
    """Keeps the bytes sent to the mirror under the rate in force.

    Upload threads call ``acquire(n)`` before sending ``n`` bytes; one
    limiter is shared by every upload thread. The clocks and ``sleep`` are
    injectable: ``clock`` is monotonic seconds, ``wall`` the local time the
    timetable is read in. Pass ``sleep=stop_event.wait`` to let ``close``
    interrupt a wait at once; otherwise it is noticed within ``step``.

    ``burst_seconds`` of the rate may go out at once after a quiet spell;
    no single sleep lasts more than ``step`` seconds, so that a slot change,
    an override or ``close`` is noticed; ``override_path`` is read again at
    most every ``override_interval`` seconds.
    """

    def __init__(
        self,
        timetable: Timetable,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = datetime.now,
        sleep: Callable[[float], object] = time.sleep,
        burst_seconds: float = 1.0,
        override_path: Path | None = None,
        override_interval: float = 5.0,
        step: float = 1.0,
        purpose: str = "replication",
    ) -> None:
        if burst_seconds <= 0 or override_interval <= 0 or step <= 0:
            raise ValueError("burst_seconds, override_interval and step must be > 0")
        self._timetable = timetable
        self._clock, self._wall, self._sleep = clock, wall, sleep
        self._burst = burst_seconds
        self._override_path = override_path
        self._override_interval = override_interval
        self._step = step
        self._purpose = purpose  # what the log lines say the rate is for

        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # waiting requests, oldest first
        self._closed = False
        self._started = False
        self._rate: Rate = None
        self._source = self._description = ""
        self._ends: datetime | None = None
        self._tokens = 0.0
        self._last = clock()
        self._valid_until = -math.inf
        self._override: Override | None = None
        self._override_due = -math.inf
        self._override_warned = False
        self._history: deque[list[int]] = deque()  # [second, bytes released]

    def acquire(self, n_bytes: int) -> None:
        """Wait until ``n_bytes`` may be sent under the rate in force.

        Requests are served in arrival order. Raises LimiterClosed if the
        limiter is closed before or while waiting.
        """
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be 0 or more, not {n_bytes}")
        if n_bytes == 0:
            return
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        try:
            while (delay := self._attempt(ticket, n_bytes)) is not None:
                if delay > 0:
                    self._sleep(delay)
        finally:
            self._leave(ticket)

    def paused(self) -> bool:
        """Whether the rate in force now is "pause" (nothing may be sent)."""
        with self._cond:
            self._refresh(self._clock())
            return self._rate == 0

    def close(self) -> None:
        """Refuse further requests and wake the waiting ones (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        """The rate in force, where it comes from, and the bytes sent lately.

        Keys: ``rate`` (bytes/s, None for no limit, 0.0 paused),
        ``rate_text``, ``source`` (``timetable`` or ``override``),
        ``description`` (the slot or the override), ``until`` (ISO time the
        rate may change, None for an override without expiry),
        ``sent_30s`` and ``sent_5min`` (bytes, to the second), ``waiting``.
        """
        with self._cond:
            now = self._clock()
            self._refresh(now)
            return {
                "rate": self._rate,
                "rate_text": format_rate(self._rate),
                "source": self._source,
                "description": self._description,
                "until": None if self._ends is None else self._ends.isoformat(),
                "sent_30s": self._sent_within(now, 30),
                "sent_5min": self._sent_within(now, 300),
                "waiting": len(self._queue),
            }

    # The methods below run with self._cond held.

    def _attempt(self, ticket: object, n_bytes: int) -> float | None:
        """Take the bytes (None) or say how long to sleep before retrying."""
        with self._cond:
            if self._closed:
                raise LimiterClosed("the bandwidth limiter is closed")
            now = self._clock()
            self._refresh(now)
            if self._rate is None:
                self._record(now, n_bytes)
                return None
            if self._queue[0] is not ticket:
                # Not our turn: the request ahead wakes us when it leaves.
                self._cond.wait(timeout=self._step)
                return 0.0
            if self._rate > 0:
                return self._take(now, n_bytes, self._rate)
            # Paused: look again after a step, or when the slot ends.
            return max(min(self._step, self._valid_until - now), _MIN_SLEEP)

    def _take(self, now: float, n_bytes: int, rate: float) -> float | None:
        # A request larger than the bucket waits for a full bucket, then
        # goes into debt for the rest rather than waiting forever.
        needed = min(n_bytes, rate * self._burst)
        if self._tokens + 0.5 >= needed:  # half a byte absorbs float rounding
            self._tokens -= n_bytes
            self._record(now, n_bytes)
            return None
        wait = min((needed - self._tokens) / rate, self._step)
        return max(min(wait, self._valid_until - now), _MIN_SLEEP)

    def _leave(self, ticket: object) -> None:
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
            self._cond.notify_all()

    def _refresh(self, now: float) -> None:
        """Refill the bucket to ``now``, switching rate where it changed."""
        if now >= self._valid_until:
            # Up to the change at the old rate, after it at the new one.
            self._refill(self._valid_until)
            self._choose_rate(now)
        self._refill(now)

    def _refill(self, until: float) -> None:
        elapsed = until - self._last
        if elapsed <= 0:
            return
        self._last = until
        if self._rate:
            capacity = self._rate * self._burst
            self._tokens = min(self._tokens + elapsed * self._rate, capacity)

    def _choose_rate(self, now: float) -> None:
        wall = self._wall()
        override = self._current_override(now, wall)
        if override is not None:
            rate, source, description = override.rate, "override", override.description
            ends = override.until
        else:
            slot = self._timetable.slot_at(wall)
            rate, source, description = slot.rate, "timetable", slot.description
            ends = self._timetable.next_change(wall)

        valid = now + _RECHECK_SECONDS
        if ends is not None:
            valid = min(valid, now + (_aware(ends) - _aware(wall)).total_seconds())
        if self._override_path is not None:
            valid = min(valid, self._override_due)
        self._valid_until = max(valid, now + _MIN_SLEEP)
        self._switch(rate, source, description, ends)

    def _switch(
        self, rate: Rate, source: str, description: str, ends: datetime | None
    ) -> None:
        if rate:
            capacity = rate * self._burst
            full = not self._started or self._rate is None
            self._tokens = capacity if full else min(self._tokens, capacity)
        changed = (rate, description) != (self._rate, self._description)
        if changed or not self._started:
            logger.info(
                "%s bandwidth: %s (%s)", self._purpose, format_rate(rate), description
            )
            self._cond.notify_all()
        self._started = True
        self._rate, self._source, self._description = rate, source, description
        self._ends = ends

    def _current_override(self, now: float, wall: datetime) -> Override | None:
        if self._override_path is None:
            return None
        if now >= self._override_due:
            self._override = self._load_override(self._override_path)
            self._override_due = now + self._override_interval
        if self._override is None or not self._override.active(wall):
            return None
        return self._override

    def _load_override(self, path: Path) -> Override | None:
        try:
            override = read_override(path)
        except (ValueError, StorageError) as exc:
            # Warn once per bad spell, not every few seconds.
            if not self._override_warned:
                logger.warning("ignoring the bandwidth override: %s", exc)
                self._override_warned = True
            return None
        self._override_warned = False
        return override

    def _record(self, now: float, n_bytes: int) -> None:
        # Released bytes are kept per second, so that five minutes of tiny
        # requests cost at most 300 entries.
        second = int(now)
        if self._history and self._history[-1][0] == second:
            self._history[-1][1] += n_bytes
        else:
            self._history.append([second, n_bytes])
        while self._history and self._history[0][0] <= now - _HISTORY_SECONDS:
            self._history.popleft()

    def _sent_within(self, now: float, seconds: int) -> int:
        return sum(sent for second, sent in self._history if second > now - seconds)
