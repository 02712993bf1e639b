"""C-FIND attribute matching (DICOM PS3.4 C.2.2.2).

A pure module: it parses one query key into a :class:`KeyMatcher` and tests
stored catalog values against it. Values are text that pydicom has already
decoded from the requester's or the modality's character set, so matching
works across character sets. Stored values are text as the catalog holds
them, multi-valued ones backslash-joined; a stored multi-value matches when
any of its values matches, and a stored ``None`` or ``''`` is unknown.

Choices made where the standard leaves room:

* Universal matching (C.2.2.2.3): an empty query value, or one made only of
  ``*``, is universal for every VR and also matches unknown stored values.
* Padding: trailing spaces and NULs are never significant; leading spaces are
  significant only for LT, ST, UT and UC (PS3.5 6.2), and LT, ST and UT are
  single-valued, so a backslash in them is text, not a value separator.
* Case: PN is compared case-insensitively (``str.casefold``), as
  C.2.2.2.1 allows; every other VR is case-sensitive.
* Wildcards (C.2.2.2.4) apply to AE, CS, LO, LT, PN, SH, ST, UC, UR and UT.
  Any other VR with ``*`` or ``?`` (other than a lone ``*``) is a bad query.
* A non-UI query value with a backslash is an OR-list of values, each
  matched on its own (a lenient extension, common for ModalitiesInStudy).
  Empty members are dropped. A UI backslash list is C.2.2.2.2.
* Dates and times (C.2.2.2.5): a single value matches only the same instant,
  with missing parts taken as zero (TM ``08`` is 08:00:00.000000). In a
  range the start takes missing parts as zero and the end as their maximum,
  so TM ``0800-1200`` includes 12:00:30 and DT ``2025-2026`` includes all of
  2026. Stored values stand for their earliest instant. Legacy ACR-NEMA
  forms ``YYYY.MM.DD`` and ``HH:MM:SS`` are accepted.
* A TM range whose start is later than its end crosses midnight and matches
  ``t >= start or t <= end``. A reversed DA or DT range matches nothing.
* DT values are compared as UTC instants when both carry a UTC offset, and
  as naive wall-clock text otherwise. A DT query such as ``2026-0500`` that
  reads both as one value with an offset and as a range is taken as the
  single value; other ambiguous DT ranges are bad queries.
* Person names are compared group by group (alphabetic, ideographic,
  phonetic). A query with several groups (it contains ``=``) needs each
  non-empty group to match the same stored group; a one-group query matches
  when any stored group does. A group is compared as its whole
  ``^``-joined string, components stripped of spaces and trailing empty
  components dropped, so ``Doe^John^^^`` equals ``Doe^John``.
* Bad query values raise :class:`ValueError` naming the keyword and value;
  bad stored values never raise, they just do not match.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
KINDS = frozenset({"universal", "single", "wildcard", "range", "list"})

_LEADING_SPACE_VRS = frozenset({"LT", "ST", "UT", "UC"})
_SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT"})
_TEMPORAL_VRS = frozenset({"DA", "TM", "DT"})
_WILDCARDS = frozenset("*?")

_US_PER_SECOND = 1_000_000
_US_PER_MINUTE = 60 * _US_PER_SECOND
_US_PER_HOUR = 60 * _US_PER_MINUTE
_US_PER_DAY = 24 * _US_PER_HOUR

_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_LEGACY_DA = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_LEGACY_TM = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?")
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})"
    r"(?:\.(\d{1,6}))?)?)?)?)?)?([+-]\d{4})?"
)


class _Point(NamedTuple):
    """A moment as microseconds on a wall-clock time line, plus its offset."""

    wall: int
    offset: int | None = None

    def utc(self) -> int:
        """Microseconds on the UTC time line; only valid with an offset."""
        return self.wall - (self.offset or 0) * _US_PER_MINUTE


@dataclass(frozen=True)
class KeyMatcher:
    """One parsed C-FIND query key (PS3.4 C.2.2.2).

    ``pattern`` holds the normalised text of a single or wildcard value,
    ``groups`` the person-name groups of a PN value, ``low`` and ``high``
    the bounds of a DA, TM or DT value (equal for a single value, ``None``
    for an open end) and ``alternatives`` the members of a list.
    """

    keyword: str
    vr: str
    kind: str
    pattern: str = ""
    groups: tuple[str, ...] = ()
    low: _Point | None = None
    high: _Point | None = None
    alternatives: tuple[KeyMatcher, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.keyword}: unknown matching kind {self.kind!r}")

    def matches(self, stored: str | None) -> bool:
        """Return whether a stored value matches this key (PS3.4 C.2.2.2).

        Universal keys (C.2.2.2.3) match anything, unknown values included.
        Any other key never matches an unknown (``None`` or empty) value,
        and matches a multi-valued one when any of its values matches.
        """
        if self.kind == "universal":
            return True

        if self.kind == "list":
            return any(member.matches(stored) for member in self.alternatives)

        values = _stored_values(self.vr, stored)
        return any(self._matches_value(value) for value in values)

    def _matches_value(self, value: str) -> bool:
        if self.vr == "PN":
            return _names_match(self.groups, _name_groups(value))

        if self.vr in _TEMPORAL_VRS:
            point = _stored_point(self.vr, value)
            return point is not None and self._contains(point)

        if self.kind == "wildcard":
            return _wildcard_match(self.pattern, value)

        return value == self.pattern

    def _contains(self, point: _Point) -> bool:
        after_low = self.low is None or _compare(point, self.low) >= 0
        before_high = self.high is None or _compare(point, self.high) <= 0

        if self._crosses_midnight():
            return after_low or before_high
        return after_low and before_high

    def _crosses_midnight(self) -> bool:
        if self.vr != "TM" or self.low is None or self.high is None:
            return False
        return self.low.wall > self.high.wall


def normalize(vr: str, value: str | None) -> str:
    """Trim the padding that is not significant when comparing values.

    Trailing spaces and NULs are always dropped. Leading spaces are dropped
    too, except for LT, ST, UT and UC where PS3.5 6.2 makes them significant
    (PS3.4 C.2.2.2.1 compares values without insignificant padding).
    ``None`` becomes ``''``.
    """
    if value is None:
        return ""

    text = value.rstrip(" \x00")
    if vr in _LEADING_SPACE_VRS:
        return text
    return text.lstrip(" ")


def parse_key(keyword: str, vr: str, value: str | None) -> KeyMatcher:
    """Parse one decoded query value into a :class:`KeyMatcher`.

    ``value`` is text (PN as ``str(PersonName)``, multiple values joined by
    backslashes). Empty or ``*`` is universal (PS3.4 C.2.2.2.3); otherwise
    the value is a UID list (C.2.2.2.2), an OR-list, a range
    (C.2.2.2.5), a wildcard (C.2.2.2.4) or a single value (C.2.2.2.1).
    Raises ValueError naming the keyword and value when it is malformed.
    """
    text = normalize(vr, value)
    try:
        return _parse_text(keyword, vr, text)
    except ValueError as error:
        raise ValueError(f"{keyword}: bad query value {value!r}: {error}") from None


def match_datetime_pair(
    date_key: KeyMatcher,
    time_key: KeyMatcher,
    stored_date: str | None,
    stored_time: str | None,
) -> bool:
    """Match a DA key and a TM key as one date-time range (PS3.4 C.2.2.2.5.1).

    Used when the requester negotiated combined date and time matching:
    StudyDate ``20260101-20260102`` with StudyTime ``2200-0200`` means from
    2026-01-01 22:00 to 2026-01-02 02:00. A single value counts as a range
    from itself to itself; an open time end falls back to the start or end
    of the day. An unknown stored date or time never matches. When either
    key is not a single or range value, each key is matched on its own.
    """
    if date_key.vr != "DA" or time_key.vr != "TM":
        raise ValueError("match_datetime_pair needs a DA key and a TM key")

    bounded = {"single", "range"}
    if date_key.kind not in bounded or time_key.kind not in bounded:
        return date_key.matches(stored_date) and time_key.matches(stored_time)

    low, high = _combined_bounds(date_key, time_key)
    moments = _stored_moments(stored_date, stored_time)
    return any(_within(moment, low, high) for moment in moments)


def _parse_text(keyword: str, vr: str, text: str) -> KeyMatcher:
    if _is_universal(vr, text):
        return KeyMatcher(keyword, vr, "universal")

    if "\\" in text and vr not in _SINGLE_VALUED_VRS:
        return _parse_list(keyword, vr, text)

    return _parse_value(keyword, vr, text)


def _is_universal(vr: str, text: str) -> bool:
    if text == "" or set(text) == {"*"}:
        return True
    return vr == "PN" and not any(_name_groups(text))


def _parse_list(keyword: str, vr: str, text: str) -> KeyMatcher:
    members = [normalize(vr, part) for part in text.split("\\")]
    members = [member for member in members if member]
    if not members:
        return KeyMatcher(keyword, vr, "universal")

    alternatives = tuple(_parse_text(keyword, vr, member) for member in members)
    return KeyMatcher(keyword, vr, "list", alternatives=alternatives)


def _parse_value(keyword: str, vr: str, text: str) -> KeyMatcher:
    if vr in _TEMPORAL_VRS:
        return _parse_temporal(keyword, vr, text)

    kind = "wildcard" if _WILDCARDS & set(text) else "single"
    if kind == "wildcard" and vr not in WILDCARD_VRS:
        raise ValueError(f"wildcards are not allowed for VR {vr}")

    if vr == "PN":
        return KeyMatcher(keyword, vr, kind, pattern=text, groups=_name_groups(text))

    return KeyMatcher(keyword, vr, kind, pattern=text)


def _parse_temporal(keyword: str, vr: str, text: str) -> KeyMatcher:
    bounds = _split_range(vr, text)
    if bounds is None:
        point = _parse_point(vr, text)[0]
        return KeyMatcher(keyword, vr, "single", pattern=text, low=point, high=point)

    start, end = bounds
    low = _parse_point(vr, start)[0] if start else None
    high = _parse_point(vr, end)[1] if end else None
    return KeyMatcher(keyword, vr, "range", pattern=text, low=low, high=high)


def _split_range(vr: str, text: str) -> tuple[str, str] | None:
    """Return the start and end text of a range, or None for a single value."""
    if "-" not in text:
        return None

    if vr == "DT":
        bounds = _split_dt_range(text)
    elif text.count("-") > 1:
        raise ValueError("a range has exactly one '-'")
    else:
        start, _, end = text.partition("-")
        bounds = (start.strip(), end.strip())

    if bounds == ("", ""):
        raise ValueError("a range needs a start or an end")
    return bounds


def _split_dt_range(text: str) -> tuple[str, str] | None:
    if _is_valid_dt(text):
        return None

    splits = [
        (text[:index].strip(), text[index + 1 :].strip())
        for index, char in enumerate(text)
        if char == "-"
    ]
    valid = [
        bounds
        for bounds in splits
        if all(part == "" or _is_valid_dt(part) for part in bounds)
    ]
    if len(valid) != 1:
        raise ValueError("not a DT value or an unambiguous DT range")
    return valid[0]


def _is_valid_dt(text: str) -> bool:
    try:
        _parse_dt(text)
    except ValueError:
        return False
    return True


def _parse_point(vr: str, text: str) -> tuple[_Point, _Point]:
    """Return the earliest and latest moments a DA, TM or DT value covers."""
    if vr == "DA":
        return _parse_da(text)

    if vr == "TM":
        first, last = _parse_tm(text)
        return _Point(first), _Point(last)

    return _parse_dt(text)


def _stored_point(vr: str, text: str) -> _Point | None:
    try:
        return _parse_point(vr, text)[0]
    except ValueError:
        return None


def _parse_da(text: str) -> tuple[_Point, _Point]:
    found = _DA.fullmatch(text) or _LEGACY_DA.fullmatch(text)
    if found is None:
        raise ValueError("not a DA value (YYYYMMDD)")

    year, month, day = (int(part) for part in found.groups())
    start = _checked_date(year, month, day).toordinal() * _US_PER_DAY
    return _Point(start), _Point(start + _US_PER_DAY - 1)


def _parse_tm(text: str) -> tuple[int, int]:
    if _LEGACY_TM.fullmatch(text):
        text = text.replace(":", "")

    found = _TM.fullmatch(text)
    if found is None:
        raise ValueError("not a TM value (HHMMSS.FFFFFF)")
    return _time_span(*found.groups())


def _parse_dt(text: str) -> tuple[_Point, _Point]:
    found = _DT.fullmatch(text)
    if found is None:
        raise ValueError("not a DT value (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")

    year, month, day, hour, minute, second, fraction, zone = found.groups()
    offset = _parse_offset(zone)
    first_day, last_day = _date_span(year, month, day)

    first_time, last_time = 0, _US_PER_DAY - 1
    if hour is not None:
        first_time, last_time = _time_span(hour, minute, second, fraction)

    first = first_day.toordinal() * _US_PER_DAY + first_time
    last = last_day.toordinal() * _US_PER_DAY + last_time
    return _Point(first, offset), _Point(last, offset)


def _time_span(
    hour: str, minute: str | None, second: str | None, fraction: str | None
) -> tuple[int, int]:
    """Return the first and last microsecond of the day a time covers."""
    hours, minutes, seconds = int(hour), int(minute or 0), int(second or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        raise ValueError("time out of range")

    micros = int((fraction or "").ljust(6, "0"))
    first = hours * _US_PER_HOUR + minutes * _US_PER_MINUTE
    first += seconds * _US_PER_SECOND + micros

    if fraction is not None:
        width = 10 ** (6 - len(fraction))
    elif second is not None:
        width = _US_PER_SECOND
    elif minute is not None:
        width = _US_PER_MINUTE
    else:
        width = _US_PER_HOUR
    return first, first + width - 1


def _date_span(year: str, month: str | None, day: str | None) -> tuple[date, date]:
    """Return the first and last day a DT date part covers."""
    years = int(year)
    if month is None:
        return _checked_date(years, 1, 1), _checked_date(years, 12, 31)

    months = int(month)
    if day is None:
        first = _checked_date(years, months, 1)
        return first, first.replace(day=calendar.monthrange(years, months)[1])

    exact = _checked_date(years, months, int(day))
    return exact, exact


def _checked_date(year: int, month: int, day: int) -> date:
    try:
        return date(year, month, day)
    except ValueError:
        raise ValueError(f"no such date {year:04d}-{month:02d}-{day:02d}") from None


def _parse_offset(zone: str | None) -> int | None:
    """Return a UTC offset ``&ZZXX`` in minutes (PS3.5 6.2, -1200 to +1400)."""
    if zone is None:
        return None

    hours, minutes = int(zone[1:3]), int(zone[3:5])
    total = hours * 60 + minutes
    if minutes > 59 or (zone[0] == "-" and total > 12 * 60) or total > 14 * 60:
        raise ValueError(f"UTC offset {zone} out of range")
    return -total if zone[0] == "-" else total


def _compare(left: _Point, right: _Point) -> int:
    """Compare on UTC when both moments have an offset, else on wall clock."""
    if left.offset is not None and right.offset is not None:
        a, b = left.utc(), right.utc()
    else:
        a, b = left.wall, right.wall
    return (a > b) - (a < b)


def _within(point: _Point, low: _Point | None, high: _Point | None) -> bool:
    after_low = low is None or _compare(point, low) >= 0
    before_high = high is None or _compare(point, high) <= 0
    return after_low and before_high


def _combined_bounds(
    date_key: KeyMatcher, time_key: KeyMatcher
) -> tuple[_Point | None, _Point | None]:
    low = None
    if date_key.low is not None:
        time_of_day = time_key.low.wall if time_key.low is not None else 0
        low = _Point(_day_start(date_key.low) + time_of_day)

    high = None
    if date_key.high is not None:
        last = _US_PER_DAY - 1
        time_of_day = time_key.high.wall if time_key.high is not None else last
        high = _Point(_day_start(date_key.high) + time_of_day)
    return low, high


def _day_start(point: _Point) -> int:
    return point.wall - point.wall % _US_PER_DAY


def _stored_moments(stored_date: str | None, stored_time: str | None) -> list[_Point]:
    days = [_stored_point("DA", text) for text in _stored_values("DA", stored_date)]
    times = [_stored_point("TM", text) for text in _stored_values("TM", stored_time)]
    return [
        _Point(day.wall + time.wall)
        for day in days
        if day is not None
        for time in times
        if time is not None
    ]


def _stored_values(vr: str, stored: str | None) -> list[str]:
    """Split a stored value into its normalised, non-empty values."""
    if stored is None:
        return []

    parts = [stored] if vr in _SINGLE_VALUED_VRS else stored.split("\\")
    values = [normalize(vr, part) for part in parts]
    return [value for value in values if value]


def _name_groups(text: str) -> tuple[str, ...]:
    """Split a person name into its case-folded, cleaned component groups."""
    return tuple(_clean_group(group) for group in text.split("="))


def _clean_group(group: str) -> str:
    components = [component.strip(" ") for component in group.split("^")]
    return "^".join(components).rstrip("^").casefold()


def _names_match(query: tuple[str, ...], stored: tuple[str, ...]) -> bool:
    if len(query) == 1:
        return any(_wildcard_match(query[0], group) for group in stored)

    for index, pattern in enumerate(query):
        group = stored[index] if index < len(stored) else ""
        if pattern and not _wildcard_match(pattern, group):
            return False
    return True


def _wildcard_match(pattern: str, text: str) -> bool:
    """Match ``*`` (any run) and ``?`` (one character) (PS3.4 C.2.2.2.4).

    The pattern is cut at each ``*`` into segments. The first segment must
    start the text, the last must end it, and the ones between are found
    left to right, each at its earliest place. Earliest placement is always
    safe because a segment has a fixed length, so there is no backtracking
    and the cost is at most text length times pattern length.
    """
    segments = pattern.split("*")
    if len(segments) == 1:
        return len(text) == len(pattern) and _segment_at(pattern, text, 0)

    head, *middle, tail = segments
    end = len(text) - len(tail)
    if len(head) > end:
        return False
    if not (_segment_at(head, text, 0) and _segment_at(tail, text, end)):
        return False

    position = len(head)
    for segment in middle:
        found = _find_segment(segment, text, position, end)
        if found < 0:
            return False
        position = found + len(segment)
    return True


def _segment_at(segment: str, text: str, start: int) -> bool:
    if start + len(segment) > len(text):
        return False
    pairs = zip(segment, text[start : start + len(segment)], strict=True)
    return all(want in ("?", have) for want, have in pairs)


def _find_segment(segment: str, text: str, start: int, end: int) -> int:
    """Return the earliest index in ``text[start:end]`` matching a segment."""
    if "?" not in segment:
        return text.find(segment, start, end)

    for index in range(start, end - len(segment) + 1):
        if _segment_at(segment, text, index):
            return index
    return -1
