"""Replication bandwidth: the timetable grammar, the token bucket under a
simulated clock, the runtime override file, and the limiter's status."""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import LimiterClosed, StorageError
from appliance.replication.bandwidth import (
    DAY_NAMES,
    WEEK_MINUTES,
    Limiter,
    Override,
    check_timetable,
    clear_override,
    format_rate,
    parse_rate,
    parse_timetable,
    read_override,
    write_override,
)

MONDAY = datetime(2024, 6, 3)  # a Monday, 00:00 local time
KIB, MIB = 1024, 1024 * 1024
WINDOW = 30.0
WEEK = timedelta(days=7)


def at(day: str, hhmm: str, seconds: float = 0.0) -> datetime:
    """The datetime of ``day`` (mon..sun) at ``hhmm`` in the week of MONDAY."""
    hour, minute = map(int, hhmm.split(":"))
    offset = timedelta(days=DAY_NAMES.index(day), hours=hour, minutes=minute)
    return MONDAY + offset + timedelta(seconds=seconds)


class FakeClock:
    """Monotonic and wall clocks that move only when someone sleeps."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.origin = self.now = 5000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return self.start + timedelta(seconds=self.now - self.origin)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def elapsed(self) -> float:
        return self.now - self.origin


def limiter_for(text: str, clock: FakeClock, **options) -> Limiter:
    return Limiter(
        parse_timetable(text),
        clock=clock.monotonic,
        wall=clock.wall,
        sleep=clock.sleep,
        **options,
    )


# -- Parsing -------------------------------------------------------------

VALID = [
    # text, when, bytes per second (None: no limit)
    ("", at("wed", "12:00"), None),
    ("off", at("wed", "12:00"), None),
    ("  OFF ", at("sun", "23:59"), None),
    ("2MB", at("tue", "03:00"), 2e6),
    ("2MB/s", at("tue", "03:00"), 2e6),
    ("pause", at("tue", "03:00"), 0.0),
    ("0", at("tue", "03:00"), 0.0),
    ("0MB", at("tue", "03:00"), 0.0),
    ("07:00,2MB 19:00,40MB", at("mon", "12:00"), 2e6),
    ("07:00,2MB 19:00,40MB", at("mon", "20:00"), 40e6),
    ("7:30,500KB 8:00,off", at("thu", "07:45"), 5e5),
    ("7:30,500kB 8:00,off", at("thu", "07:45"), 5e5),
    ("00:00,1.5GB/s", at("fri", "00:00"), 1.5e9),
    ("08:00,100Mbit 18:00,off", at("mon", "09:00"), 12.5e6),
    ("08:00,100mbit/s 18:00,off", at("mon", "09:00"), 12.5e6),
    ("08:00,8kbit", at("mon", "09:00"), 1000.0),
    ("08:00,1Gbit", at("mon", "09:00"), 125e6),
    ("09:00,pause 17:00,off", at("mon", "10:00"), 0.0),
    ("09:00,0 17:00,off", at("mon", "10:00"), 0.0),
    ("09:00,PAUSE 17:00,Off", at("mon", "18:00"), None),
    ("mon-fri 07:00,2MB 19:00,40MB; sat-sun off", at("tue", "08:00"), 2e6),
    ("MON-FRI 07:00,2MB 19:00,40MB; Sat,Sun off", at("sat", "08:00"), None),
    ("sat,sun off; 08:00,2MB", at("wed", "09:00"), 2e6),
    ("fri-mon 08:00,1MB", at("sun", "09:00"), 1e6),
    ("mon,wed-thu 08:00,1MB", at("thu", "09:00"), 1e6),
]


@pytest.mark.parametrize(("text", "when", "rate"), VALID)
def test_valid_timetables(text, when, rate):
    assert parse_timetable(text).rate_at(when) == rate
    assert check_timetable(text) is None


ERRORS = [
    ("25:00,2MB", "slot 1 '25:00,2MB': hour must be 00-23"),
    ("07:00,2MB 25:00,2MB", "slot 2 '25:00,2MB': hour must be 00-23"),
    ("07:60,2MB", "slot 1 '07:60,2MB': minute must be 00-59"),
    ("7h,2MB", "slot 1 '7h,2MB': time must be HH:MM, e.g. 07:00"),
    ("07:00", "slot 1 '07:00': expected HH:MM,RATE, e.g. 07:00,2MB"),
    ("07:00,2MB,3", "slot 1 '07:00,2MB,3': expected HH:MM,RATE, e.g. 07:00,2MB"),
    ("off 07:00,2MB", "slot 1 'off': expected HH:MM,RATE, e.g. 07:00,2MB"),
    (
        "07:00,fast",
        "slot 1 '07:00,fast': rate 'fast' is not understood; write off, pause, "
        "0 or a number with a unit, e.g. 2MB",
    ),
    (
        "fast",
        "rate 'fast' is not understood; write off, pause, 0 or a number with "
        "a unit, e.g. 2MB",
    ),
    ("07:00,2", "slot 1 '07:00,2': rate '2' needs a unit, e.g. 2MB"),
    (
        "07:00,2XB",
        "slot 1 '07:00,2XB': unit 'XB' is not known; use KB, MB, GB (bytes per "
        "second) or kbit, Mbit, Gbit (bits per second)",
    ),
    (
        "07:00,100Mbps",
        "slot 1 '07:00,100Mbps': unit 'Mbps' is not known; use KB, MB, GB "
        "(bytes per second) or kbit, Mbit, Gbit (bits per second)",
    ),
    (
        "07:00,2Mb",
        "slot 1 '07:00,2Mb': unit 'Mb' is ambiguous; write MB for bytes or "
        "Mbit for bits per second",
    ),
    (
        "07:00,300kb",
        "slot 1 '07:00,300kb': unit 'kb' is ambiguous; write KB for bytes or "
        "kbit for bits per second",
    ),
    (
        "07:00,0.5KB",
        "slot 1 '07:00,0.5KB': rate 0.5 KB/s is below 1 KB/s; write 0 or pause "
        "to stop sending",
    ),
    (
        "19:00,2MB 07:00,40MB",
        "slot 2 '07:00,40MB': 07:00 is not after the previous slot's 19:00; "
        "list slots in order of time",
    ),
    (
        "07:00,2MB 07:00,4MB",
        "slot 2 '07:00,4MB': 07:00 is not after the previous slot's 07:00; "
        "list slots in order of time",
    ),
    (
        "mon-fir 07:00,2MB",
        "weekdays 'mon-fir': 'fir' is not a day; use mon, tue, wed, thu, fri, "
        "sat or sun",
    ),
    ("mon,,fri 07:00,2MB", "weekdays 'mon,,fri': a day name is missing"),
    (
        "mon-fri",
        "'mon-fri': weekdays must be followed by slots (HH:MM,RATE) or a rate",
    ),
    (
        "mon-fri 07:00,2MB; fri-sun off",
        "group 2 'fri-sun off': fri is already in group 1",
    ),
    (
        "07:00,2MB; 08:00,off",
        "group 2 '08:00,off': only one group may leave out the weekdays (group 1 does)",
    ),
    ("mon 07:00,2MB;", "group 2 is empty; remove the extra ';'"),
    ("mon 07:00,2MB; sat 25:00,off", "group 2, slot 1 '25:00,off': hour must be 00-23"),
    (
        "mon 07:00,2MB; sat-sun 2Mb",
        "group 2 'sat-sun 2Mb': unit 'Mb' is ambiguous; write MB for bytes or "
        "Mbit for bits per second",
    ),
    (
        "mon 07:00,2MB; sate 25:00,off",
        "group 2, weekdays 'sate': 'sate' is not a day; use mon, tue, wed, thu, "
        "fri, sat or sun",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_invalid_timetables_say_what_and_where(text, message):
    with pytest.raises(ValueError) as raised:
        parse_timetable(text)
    assert str(raised.value) == message
    assert check_timetable(text) == message


def test_check_timetable_refuses_other_types():
    assert check_timetable(2) == 'must be a string such as "07:00,2MB 19:00,40MB"'


@pytest.mark.parametrize(
    ("text", "rate", "shown"),
    [
        ("off", None, "unlimited"),
        ("pause", 0.0, "paused"),
        ("2MB", 2e6, "2 MB/s"),
        ("100Mbit/s", 12.5e6, "12.5 MB/s"),
        ("1.5GB", 1.5e9, "1.5 GB/s"),
        ("800KB", 8e5, "800 KB/s"),
    ],
)
def test_single_rates(text, rate, shown):
    assert parse_rate(text) == rate
    assert format_rate(rate) == shown


# -- Weekdays, midnight and slot changes ---------------------------------

WEEKLY = "mon-fri 07:00,2MB 19:00,40MB; sat-sun off"
DEFAULT_GROUP = "sat-sun 10:00,1MB; 07:00,2MB 19:00,40MB"
ONE_DAY = "mon 08:00,1MB"


@pytest.mark.parametrize(
    ("text", "when", "rate", "description"),
    [
        # Sunday's last slot runs on until Monday's first.
        (WEEKLY, at("mon", "03:00"), None, "sat-sun from 00:00: unlimited"),
        (WEEKLY, at("mon", "07:00"), 2e6, "mon-fri from 07:00: 2 MB/s"),
        (WEEKLY, at("mon", "06:59", 59.999), None, "sat-sun from 00:00: unlimited"),
        (WEEKLY, at("tue", "03:00"), 40e6, "mon-fri from 19:00: 40 MB/s"),
        (WEEKLY, at("fri", "23:59"), 40e6, "mon-fri from 19:00: 40 MB/s"),
        (WEEKLY, at("sat", "00:00"), None, "sat-sun from 00:00: unlimited"),
        # The group without weekdays covers the other days.
        (DEFAULT_GROUP, at("sat", "09:00"), 40e6, "mon-fri from 19:00: 40 MB/s"),
        (DEFAULT_GROUP, at("sat", "10:00"), 1e6, "sat-sun from 10:00: 1 MB/s"),
        (DEFAULT_GROUP, at("mon", "06:00"), 1e6, "sat-sun from 10:00: 1 MB/s"),
        (DEFAULT_GROUP, at("mon", "07:00"), 2e6, "mon-fri from 07:00: 2 MB/s"),
        # Days no group names send without limit, from 00:00.
        (
            ONE_DAY,
            at("mon", "07:00"),
            None,
            "tue-sun from 00:00: unlimited (no group names these days)",
        ),
        (ONE_DAY, at("mon", "23:59"), 1e6, "mon from 08:00: 1 MB/s"),
        ("07:00,2MB", at("thu", "01:00"), 2e6, "daily from 07:00: 2 MB/s"),
        ("off", at("thu", "01:00"), None, "daily from 00:00: unlimited"),
        ("08:00,100Mbit", at("thu", "09:00"), 12.5e6, "daily from 08:00: 100 Mbit/s"),
    ],
)
def test_rate_across_midnight_and_weekdays(text, when, rate, description):
    timetable = parse_timetable(text)
    assert timetable.rate_at(when) == rate
    assert timetable.slot_at(when).description == description


@pytest.mark.parametrize(
    ("text", "when", "change"),
    [
        ("07:00,2MB 19:00,40MB", at("mon", "12:00"), at("mon", "19:00")),
        ("07:00,2MB 19:00,40MB", at("mon", "19:00"), at("tue", "07:00")),
        ("07:00,2MB 19:00,40MB", at("mon", "18:59", 59.9), at("mon", "19:00")),
        ("07:00,2MB 19:00,40MB", at("sun", "20:00"), at("mon", "07:00") + WEEK),
        (WEEKLY, at("fri", "20:00"), at("sat", "00:00")),
        (WEEKLY, at("sat", "12:00"), at("mon", "07:00") + WEEK),
        (WEEKLY, at("sun", "12:00"), at("mon", "07:00") + WEEK),
        ("off", at("wed", "10:00"), at("mon", "00:00") + WEEK),
    ],
)
def test_next_change(text, when, change):
    assert parse_timetable(text).next_change(when) == change


def test_next_change_keeps_the_time_zone():
    when = at("mon", "12:00").replace(tzinfo=UTC)
    assert parse_timetable("19:00,1MB").next_change(when) == when.replace(hour=19)


# -- Random timetables ---------------------------------------------------

RATES = [
    ("off", None),
    ("pause", 0.0),
    ("0", 0.0),
    ("2MB", 2e6),
    ("40MB", 40e6),
    ("500KB", 5e5),
    ("100Mbit", 12.5e6),
    ("1.5GB/s", 1.5e9),
    ("8kbit", 1000.0),
]

# A group: its days (None: the days no other group names) and its slots as
# (minute of the day, (rate text, rate)); a bare rate is a lone slot at -1.
Group = tuple[frozenset[int] | None, list[tuple[int, tuple[str, float | None]]]]


@st.composite
def timetable_specs(draw) -> list[Group]:
    groups: list[Group] = []
    free = set(range(7))
    has_default = False
    for _ in range(draw(st.integers(1, 4))):
        days = None
        if has_default or not draw(st.booleans()):
            if not free:
                break
            days = frozenset(draw(st.sets(st.sampled_from(sorted(free)), min_size=1)))
            free -= days
        has_default = has_default or days is None
        if draw(st.booleans()):
            slots = [(-1, draw(st.sampled_from(RATES)))]
        else:
            starts = draw(st.sets(st.integers(0, 1439), min_size=1, max_size=5))
            slots = [(m, draw(st.sampled_from(RATES))) for m in sorted(starts)]
        groups.append((days, slots))
    return groups


def render(groups: list[Group]) -> str:
    parts = []
    for days, slots in groups:
        words = [] if days is None else [",".join(DAY_NAMES[d] for d in sorted(days))]
        for minute, (text, _) in slots:
            words.append(
                text if minute < 0 else f"{minute // 60:02d}:{minute % 60:02d},{text}"
            )
        parts.append(" ".join(words))
    return "; ".join(parts)


def covering(groups: list[Group], day: int) -> Group | None:
    named = [g for g in groups if g[0] is not None and day in g[0]]
    default = [g for g in groups if g[0] is None]
    return (named or default or [None])[0]


def starting(groups: list[Group], minute_of_week: int) -> tuple[object, float | None]:
    """The slot (a key and its rate) starting at this minute of the week."""
    day, minute = divmod(minute_of_week, 24 * 60)
    group = covering(groups, day)
    if group is None:
        return ("no group" if minute == 0 else None), None
    for number, (start, (_, rate)) in enumerate(group[1]):
        if max(start, 0) == minute:
            return (id(group), number), rate
    return None, None


def minute_of_week(when: datetime) -> int:
    return when.weekday() * 1440 + when.hour * 60 + when.minute


def reference_slot(groups: list[Group], when: datetime) -> tuple[object, float | None]:
    """The slot found by walking back minute by minute to a slot's start."""
    minute = minute_of_week(when)
    for back in range(WEEK_MINUTES):
        key, rate = starting(groups, (minute - back) % WEEK_MINUTES)
        if key is not None:
            return key, rate
    raise AssertionError("no slot in the week")


def reference_change(groups: list[Group], when: datetime) -> datetime:
    """The next minute another slot starts; with one slot, its first start."""
    current, _ = reference_slot(groups, when)
    minute = minute_of_week(when)
    for ahead in range(1, WEEK_MINUTES + 1):
        key, _ = starting(groups, (minute + ahead) % WEEK_MINUTES)
        if key is not None and key != current:
            return when.replace(second=0, microsecond=0) + timedelta(minutes=ahead)
    first = next(m for m in range(WEEK_MINUTES) if starting(groups, m)[0])
    ahead = (first - minute) % WEEK_MINUTES or WEEK_MINUTES
    return when.replace(second=0, microsecond=0) + timedelta(minutes=ahead)


@settings(max_examples=150, deadline=None)
@given(
    timetable_specs(),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)),
)
def test_random_timetables_give_a_declared_rate(groups, when):
    timetable = parse_timetable(render(groups))
    declared = {rate for _, slots in groups for _, (_, rate) in slots}
    if any(covering(groups, day) is None for day in range(7)):
        declared.add(None)

    assert timetable.rate_at(when) in declared
    assert timetable.rate_at(when) == reference_slot(groups, when)[1]
    assert timetable.next_change(when) == reference_change(groups, when)


# -- The limiter's accuracy ----------------------------------------------


def window_extremes(events: list[tuple[float, int]]) -> tuple[int, int]:
    """Most and fewest bytes released in any WINDOW seconds of the run.

    The most fall in a window opening at a release; the fewest in one
    opening just after a release (only windows that end within the run).
    """
    times = [t for t, _ in events]
    totals = [0]
    for _, size in events:
        totals.append(totals[-1] + size)
    most = max(
        totals[bisect.bisect_left(times, t + WINDOW)] - totals[i]
        for i, t in enumerate(times)
    )
    fewest = min(
        totals[bisect.bisect_right(times, t + WINDOW)]
        - totals[bisect.bisect_right(times, t)]
        for t in times
        if t + WINDOW <= times[-1]
    )
    return most, fewest


def run_saturated(limiter, clock, sizes, seconds) -> list[tuple[float, int]]:
    """Acquire back to back for ``seconds``; (time released, bytes) each."""
    events = []
    while clock.elapsed() < seconds:
        size = next(sizes)
        limiter.acquire(size)
        events.append((clock.monotonic(), size))
    return events


def mixed_sizes(seed: int, low: int = KIB, high: int = 4 * MIB):
    """Request sizes spread evenly on a log scale from ``low`` to ``high``."""
    rng = random.Random(seed)
    while True:
        yield int(2 ** rng.uniform(low.bit_length() - 1, high.bit_length() - 1))


@pytest.mark.parametrize(
    ("text", "rate", "seconds"), [("2MB", 2e6, 600), ("40MB", 40e6, 300)]
)
def test_every_30_second_window_stays_within_10_percent(text, rate, seconds):
    clock = FakeClock(at("wed", "10:00"))
    limiter = limiter_for(text, clock)
    events = run_saturated(limiter, clock, mixed_sizes(seed=7), seconds)

    most, fewest = window_extremes(events)
    cap = rate * WINDOW
    assert most <= 1.1 * cap, f"{most / cap:.3f} of the cap"
    assert fewest >= 0.9 * cap, f"{fewest / cap:.3f} of the cap"
    assert max(clock.sleeps) <= 1.0


def test_a_slot_change_takes_effect_at_its_minute():
    clock = FakeClock(at("mon", "18:59"))
    limiter = limiter_for("07:00,2MB 19:00,40MB", clock)
    events = run_saturated(limiter, clock, iter(lambda: 64 * KIB, None), 120)

    boundary = clock.origin + 60
    before = sum(size for t, size in events if t < boundary)
    last_second = sum(size for t, size in events if boundary - 1 <= t < boundary)
    after = sum(size for t, size in events if boundary <= t < boundary + 60)
    # 60 s at 2 MB/s, plus the initial bucket of 1 s and one request.
    assert 120e6 <= before <= 122e6 + 64 * KIB
    assert last_second <= 2e6 + 64 * KIB
    assert 0.995 * 2400e6 <= after <= 2400e6 + 2e6 + 64 * KIB
    assert limiter.status()["description"] == "daily from 19:00: 40 MB/s"


def test_pause_waits_for_the_next_slot_in_bounded_steps():
    clock = FakeClock(at("mon", "18:00"))
    limiter = limiter_for("07:00,pause 19:00,2MB", clock)
    status = limiter.status()
    assert (status["rate"], status["rate_text"]) == (0.0, "paused")
    assert status["until"] == "2024-06-03T19:00:00"

    limiter.acquire(1000)

    assert at("mon", "19:00") <= clock.wall() < at("mon", "19:00", 0.01)
    assert max(clock.sleeps) <= 1.0
    assert limiter.status()["rate"] == 2e6


def test_off_never_waits():
    clock = FakeClock(at("mon", "12:00"))
    limiter = limiter_for("off", clock)
    for _ in range(10):
        limiter.acquire(10**9)
    assert clock.sleeps == []
    assert limiter.status()["rate_text"] == "unlimited"


def test_a_request_larger_than_the_bucket_goes_into_debt():
    clock = FakeClock(at("mon", "12:00"))
    limiter = limiter_for("100KB", clock)

    limiter.acquire(MIB)  # a full bucket lets it through, owing the rest
    assert clock.elapsed() == 0
    limiter.acquire(MIB)  # waits out the debt and a full bucket again
    assert clock.elapsed() == pytest.approx(MIB / 100e3, rel=1e-3)


def test_an_idle_minute_saves_up_one_burst_only():
    clock = FakeClock(at("mon", "12:00"))
    limiter = limiter_for("1MB", clock)
    clock.sleep(60)

    limiter.acquire(1_000_000)
    assert clock.elapsed() == 60
    limiter.acquire(1_000_000)
    assert clock.elapsed() == pytest.approx(61, abs=0.002)


def test_the_bucket_fills_only_from_the_slot_change():
    clock = FakeClock(at("mon", "18:59"))
    limiter = limiter_for("07:00,pause 19:00,2MB", clock)
    assert limiter.status()["rate"] == 0.0
    clock.sleep(60.5)  # idle across 19:00: half a second at 2 MB/s

    limiter.acquire(2_000_000)
    assert clock.elapsed() == pytest.approx(61, abs=0.002)


def test_acquire_refuses_negative_sizes_and_passes_zero():
    clock = FakeClock(at("mon", "12:00"))
    limiter = limiter_for("pause", clock)
    with pytest.raises(ValueError, match="n_bytes must be 0 or more"):
        limiter.acquire(-1)
    limiter.acquire(0)
    assert clock.sleeps == []


# -- Threads -------------------------------------------------------------


def run_threads(limiter: Limiter, sizes: list[list[int]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def upload(mine: list[int]) -> None:
        try:
            for size in mine:
                limiter.acquire(size)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(mine,)) for mine in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
        assert not thread.is_alive(), "an upload thread is stuck"
    return errors


def test_threads_share_the_rate_with_a_simulated_clock():
    clock = FakeClock(at("mon", "12:00"))
    limiter = limiter_for("2MB", clock)
    rng = random.Random(3)
    sizes = [[rng.randint(KIB, MIB) for _ in range(40)] for _ in range(4)]

    assert run_threads(limiter, sizes) == []

    total = sum(map(sum, sizes))
    # Everything past the first full bucket was paid for at 2 MB/s.
    assert clock.elapsed() == pytest.approx((total - 2e6) / 2e6, rel=0.02)
    assert limiter.status()["waiting"] == 0


def test_requests_are_served_in_arrival_order():
    clock = FakeClock(at("mon", "12:00"))
    first_asleep, wake_first = threading.Event(), threading.Event()

    def sleep(seconds: float) -> None:
        # The first upload dozes until the test lets it go on.
        if threading.current_thread().name == "first":
            first_asleep.set()
            wake_first.wait(5)
        clock.sleep(seconds)

    limiter = Limiter(
        parse_timetable("1MB"), clock=clock.monotonic, wall=clock.wall, sleep=sleep
    )
    limiter.acquire(1_000_000)  # empties the bucket
    served: list[str] = []

    def upload(size: int) -> None:
        limiter.acquire(size)
        served.append(threading.current_thread().name)

    first = threading.Thread(target=upload, args=(1_000_000,), name="first")
    first.start()
    assert first_asleep.wait(5)
    second = threading.Thread(target=upload, args=(1000,), name="second")
    second.start()
    second.join(timeout=0.2)  # a small request must not overtake
    assert second.is_alive()

    wake_first.set()
    first.join(timeout=5)
    second.join(timeout=5)
    assert served == ["first", "second"]


def test_threads_share_the_rate_with_the_real_clock():
    limiter = Limiter(parse_timetable("2MB"), burst_seconds=0.05)
    started = time.monotonic()

    assert run_threads(limiter, [[25_000] * 10 for _ in range(4)]) == []

    # 1 MB at 2 MB/s, less a bucket of 100 KB: 0.45 s.
    assert 0.4 <= time.monotonic() - started < 1.8


def test_close_stops_waiting_uploads():
    clock = FakeClock(at("mon", "12:00"))
    stop = threading.Event()
    limiter = Limiter(
        parse_timetable("pause"),
        clock=clock.monotonic,
        wall=clock.wall,
        sleep=stop.wait,
    )
    outcome: list[BaseException] = []
    thread = threading.Thread(
        target=lambda: outcome.extend(run_threads(limiter, [[1000]]))
    )
    thread.start()
    while limiter.status()["waiting"] == 0:
        stop.wait(0.001)

    limiter.close()
    stop.set()
    thread.join(timeout=5)

    assert [type(exc) for exc in outcome] == [LimiterClosed]
    with pytest.raises(LimiterClosed):
        limiter.acquire(1)


# -- Override file -------------------------------------------------------

LATER = datetime(2024, 6, 3, 19, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("rate", "until", "expected"),
    [
        (5e6, LATER, Override(5e6, LATER)),
        (None, None, Override(None, None)),
        ("pause", LATER, Override(0.0, LATER)),
        (0, None, Override(0.0, None)),
        (
            5e6,
            datetime(2024, 6, 3, 19),
            Override(5e6, datetime(2024, 6, 3, 19).astimezone()),
        ),
    ],
)
def test_override_round_trip(tmp_path, rate, until, expected):
    path = tmp_path / "bandwidth-override.json"
    write_override(path, rate, until)
    assert read_override(path) == expected
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    clear_override(path)
    assert read_override(path) is None


@pytest.mark.parametrize("rate", [-1.0, float("nan"), True, "fast"])
def test_override_refuses_bad_rates(tmp_path, rate):
    with pytest.raises(ValueError, match="rate must be bytes per second"):
        write_override(tmp_path / "override.json", rate, None)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "Expecting property name"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "expected a JSON object with version 1"),
        (b'{"version": 2, "rate": null, "until": null}', "with version 1"),
        (b'{"version": 1, "rate": null}', "rate or until is missing"),
        (b'{"version": 1, "rate": -5, "until": null}', "rate must be"),
        (b'{"version": 1, "rate": "fast", "until": null}', "rate must be"),
        (b'{"version": 1, "rate": 1e6, "until": "soon"}', "until must be"),
        (b'{"version": 1, "rate": 1e6, "until": 12}', "until must be"),
    ],
)
def test_a_damaged_override_is_reported(tmp_path, content, reason):
    path = tmp_path / "override.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        read_override(path)
    assert str(raised.value).startswith(f"{path} is not a bandwidth override: ")
    assert reason in str(raised.value)


def test_an_override_holds_until_it_expires(tmp_path):
    clock = FakeClock(at("mon", "12:00"))
    path = tmp_path / "override.json"
    write_override(path, 40e6, clock.wall() + timedelta(minutes=10))
    limiter = limiter_for("2MB", clock, override_path=path)

    status = limiter.status()
    assert (status["rate"], status["source"]) == (40e6, "override")
    assert status["description"].startswith("override until 2024-06-03 12:10")

    clock.sleep(601)
    status = limiter.status()
    assert (status["rate"], status["source"]) == (2e6, "timetable")


def test_an_override_pause_ends_by_itself_inside_acquire(tmp_path):
    clock = FakeClock(at("mon", "12:00"))
    path = tmp_path / "override.json"
    write_override(path, "pause", clock.wall() + timedelta(seconds=120))
    limiter = limiter_for("2MB", clock, override_path=path)

    limiter.acquire(1000)

    assert 120 <= clock.elapsed() < 120.01


def test_the_override_file_is_read_at_most_every_interval(tmp_path):
    clock = FakeClock(at("mon", "12:00"))
    path = tmp_path / "override.json"
    limiter = limiter_for("2MB", clock, override_path=path, override_interval=5)
    assert limiter.status()["source"] == "timetable"

    write_override(path, "pause", None)
    clock.sleep(4.9)
    assert limiter.status()["source"] == "timetable"
    clock.sleep(0.1)
    status = limiter.status()
    assert (status["source"], status["rate"], status["until"]) == (
        "override",
        0.0,
        None,
    )
    assert status["description"] == "override without expiry: paused"

    clear_override(path)
    clock.sleep(5)
    assert limiter.status()["rate"] == 2e6


def test_a_corrupt_override_is_ignored_with_one_warning(tmp_path, caplog):
    clock = FakeClock(at("mon", "12:00"))
    path = tmp_path / "override.json"
    path.write_text("{not json")
    limiter = limiter_for("2MB", clock, override_path=path, override_interval=5)

    with caplog.at_level(logging.WARNING, logger="appliance.replication.bandwidth"):
        for _ in range(10):
            assert limiter.status()["rate"] == 2e6
            clock.sleep(5)
        assert len(caplog.records) == 1
        assert "ignoring the bandwidth override" in caplog.records[0].getMessage()

        write_override(path, 1e6, None)
        clock.sleep(5)
        assert limiter.status()["rate"] == 1e6
        path.write_text("[]")
        clock.sleep(5)
        assert limiter.status()["rate"] == 2e6
    assert len(caplog.records) == 2


# -- Status --------------------------------------------------------------


def test_status_counts_recent_bytes():
    clock = FakeClock(at("mon", "12:00"))
    limiter = limiter_for("07:00,1MB 19:00,off", clock)
    for _ in range(4):
        limiter.acquire(500_000)
    clock.sleep(40)
    limiter.acquire(100)

    status = limiter.status()
    assert (status["sent_30s"], status["sent_5min"]) == (100, 2_000_100)
    assert status["description"] == "daily from 07:00: 1 MB/s"
    assert status["until"] == "2024-06-03T19:00:00"
    assert status["source"] == "timetable"

    clock.sleep(300)
    assert limiter.status()["sent_5min"] == 0


def test_limiter_refuses_bad_settings():
    with pytest.raises(ValueError, match="burst_seconds"):
        Limiter(parse_timetable("off"), burst_seconds=0)


def test_the_override_path_may_be_missing_its_folder(tmp_path: Path):
    path = tmp_path / "run" / "override.json"
    write_override(path, 1e6, None)
    assert read_override(path) == Override(1e6, None)


def test_an_override_that_cannot_be_written_is_a_storage_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot write"):
        write_override(blocker / "override.json", 1e6, None)
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]


def test_clearing_a_missing_override_does_nothing(tmp_path):
    clear_override(tmp_path / "absent" / "override.json")
    clear_override(tmp_path / "override.json")


def test_paused_says_whether_the_rate_in_force_is_pause():
    clock = FakeClock(at("mon", "18:30"))
    limiter = limiter_for("07:00,pause 19:00,2MB", clock)

    assert limiter.paused()
    clock.sleep(3600)  # 19:30: 2 MB/s
    assert not limiter.paused()
    assert not limiter_for("off", clock).paused()
