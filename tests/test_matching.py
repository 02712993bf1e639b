"""Tests for C-FIND attribute matching (PS3.4 C.2.2.2).

All names are made up.
"""

import fnmatch
import time
from datetime import date, datetime, timedelta
from datetime import time as clock
from io import BytesIO

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import Dataset

from appliance.catalog.matching import (
    KeyMatcher,
    match_datetime_pair,
    normalize,
    parse_key,
)


def matches(vr: str, query: str | None, stored: str | None) -> bool:
    return parse_key("TestKey", vr, query).matches(stored)


def pair(date_query: str, time_query: str, stored_date: str, stored_time: str) -> bool:
    date_key = parse_key("StudyDate", "DA", date_query)
    time_key = parse_key("StudyTime", "TM", time_query)
    return match_datetime_pair(date_key, time_key, stored_date, stored_time)


def round_trip_name(charset: str | list[str], name: str) -> str:
    """Encode a PatientName in a character set and decode it back."""
    dataset = Dataset()
    dataset.SpecificCharacterSet = charset
    dataset.PatientName = name
    buffer = BytesIO()
    dataset.save_as(buffer, implicit_vr=False, little_endian=True)

    decoded = pydicom.dcmread(BytesIO(buffer.getvalue()), force=True)
    return str(decoded.PatientName)


UNIVERSAL = [
    ("PN", None, None),
    ("PN", "", "Doe^John"),
    ("PN", "   ", None),
    ("PN", "*", ""),
    ("PN", "**", "Doe^John"),
    ("PN", "^^^", "Doe^John"),
    ("PN", "==", None),
    ("LO", "*", None),
    ("CS", "", "CT"),
    ("DA", "*", "20260101"),
    ("DA", "*", None),
    ("TM", "*", "not a time"),
    ("DT", "*", ""),
    ("UI", "*", "1.2.3"),
    ("IS", "*", "42"),
    ("LT", "\x00", "text"),
]


@pytest.mark.parametrize(("vr", "query", "stored"), UNIVERSAL)
def test_universal_matching(vr: str, query: str | None, stored: str | None) -> None:
    key = parse_key("TestKey", vr, query)

    assert key.kind == "universal"
    assert key.matches(stored)


SINGLE = [
    ("CS", "CT", "CT", True),
    ("CS", "CT", "MR", False),
    ("CS", "CT", "CTX", False),
    ("CS", "CT", None, False),
    ("CS", "CT", "", False),
    ("CS", "CT", "MR\\CT", True),
    ("LO", "ACC-001", "ACC-001", True),
    ("LO", "ACC-001", "ACC-0011", False),
    ("SH", "A1", "  A1  ", True),
    ("IS", "42", "42", True),
    ("IS", "42", "420", False),
    ("UI", "1.2.840.99.1", "1.2.840.99.1", True),
    ("UI", "1.2.840.99.1", "1.2.840.99.10", False),
    ("UI", "1.2.840.99.1", None, False),
    # Non-conformant UIDs are kept, so they must be findable by their value.
    ("UI", "1.2.abc", "1.2.abc", True),
    ("UI", "../x", "../x", True),
    ("DA", "20260115", "20260115", True),
    ("DA", "20260115", "20260116", False),
    ("DA", "20260115", "2026.01.15", True),
    ("DA", "2026.01.15", "20260115", True),
    ("DA", "20260115", None, False),
    ("DA", "20260115", "garbage", False),
    ("TM", "08", "080000", True),
    ("TM", "08", "080001", False),
    ("TM", "0830", "083000.000", True),
    ("TM", "083000.5", "083000.500000", True),
    ("TM", "083000.5", "083000.4", False),
    ("TM", "08:30:00", "083000", True),
    ("DT", "20260115", "20260115000000", True),
    ("DT", "20260115", "20260115000001", False),
    ("DT", "20260115120000+0100", "20260115110000+0000", True),
    ("DT", "20260115120000+0100", "20260115120000", True),
    ("DT", "20260115120000-0500", "20260115170000+0000", True),
]


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), SINGLE)
def test_single_value_matching(
    vr: str, query: str, stored: str | None, expected: bool
) -> None:
    key = parse_key("TestKey", vr, query)

    assert key.kind == "single"
    assert key.matches(stored) is expected


CASE = [
    ("PN", "doe^john", "DOE^JOHN", True),
    ("PN", "DOE^JOHN", "Doe^John", True),
    ("PN", "müller^jürgen", "MÜLLER^JÜRGEN", True),
    ("PN", "do*", "DOE^JOHN", True),
    ("LO", "doe", "DOE", False),
    ("LO", "DOE", "DOE", True),
    ("CS", "ct", "CT", False),
    ("SH", "ab*", "ABC", False),
    ("AE", "archive", "ARCHIVE", False),
]


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), CASE)
def test_case_sensitivity(vr: str, query: str, stored: str, expected: bool) -> None:
    assert matches(vr, query, stored) is expected


WILDCARD = [
    ("LO", "AB*", "ABC", True),
    ("LO", "AB*", "AB", True),
    ("LO", "AB*", "XAB", False),
    ("LO", "*AB", "XXAB", True),
    ("LO", "*AB*", "XXABYY", True),
    ("LO", "A?C", "ABC", True),
    ("LO", "A?C", "AC", False),
    ("LO", "A?C", "ABBC", False),
    ("LO", "A*B*C", "AXXBYYC", True),
    ("LO", "A*B*C", "AXXCYYB", False),
    ("LO", "?", "", False),
    ("LO", "a.b*", "a.b.c", True),
    ("LO", "a.b*", "axb", False),
    ("LO", "(x)+*", "(x)+y", True),
    ("SH", "A*", "B\\AX", True),
    ("CS", "C?", "CT", True),
    ("CS", "C?", "MR", False),
    ("AE", "ARCH*", "ARCHIVE1", True),
    ("UC", "*end", "the end", True),
    ("UR", "http://*", "http://example.invalid/x", True),
    ("LT", "*\\*", "a\\b", True),
    ("ST", " lead*", " leading", True),
    ("ST", " lead*", "leading", False),
    ("UT", "*", None, True),
    ("PN", "Doe*", "Doe^John", True),
    ("PN", "Doe^J*", "Doe^John", True),
    ("PN", "*^John", "Doe^John", True),
    ("PN", "Doe^J?hn", "Doe^John^^^", True),
    ("PN", "Doe*", None, False),
]


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), WILDCARD)
def test_wildcard_matching(
    vr: str, query: str, stored: str | None, expected: bool
) -> None:
    key = parse_key("TestKey", vr, query)

    assert key.kind in {"wildcard", "universal"}
    assert key.matches(stored) is expected


RANGE = [
    ("DA", "20260101-20260131", "20260101", True),
    ("DA", "20260101-20260131", "20260131", True),
    ("DA", "20260101-20260131", "20260115", True),
    ("DA", "20260101-20260131", "20251231", False),
    ("DA", "20260101-20260131", "20260201", False),
    ("DA", "20260101-20260131", None, False),
    ("DA", "-20260131", "19000101", True),
    ("DA", "-20260131", "20260201", False),
    ("DA", "20260101-", "29991231", True),
    ("DA", "20260101-", "20251231", False),
    ("DA", "2026.01.01-2026.01.31", "2026.01.15", True),
    ("DA", "20260131-20260101", "20260115", False),
    ("TM", "0800-1200", "0800", True),
    ("TM", "0800-1200", "100000", True),
    ("TM", "0800-1200", "120059.999999", True),
    ("TM", "0800-1200", "120100", False),
    ("TM", "0800-1200", "075959.999", False),
    ("TM", "08-12", "125959", True),
    ("TM", "08-12", "130000", False),
    ("TM", "080000.123-080000.124", "080000.1235", True),
    ("TM", "080000.123-080000.124", "080000.125", False),
    ("TM", "080000.123-080000.124", "080000.122999", False),
    ("TM", "-0800", "000000", True),
    ("TM", "-0800", "0801", False),
    ("TM", "1700-", "235959", True),
    ("TM", "1700-", "1659", False),
    ("TM", "2200-0200", "2300", True),
    ("TM", "2200-0200", "0100", True),
    ("TM", "2200-0200", "0200", True),
    ("TM", "2200-0200", "1200", False),
    ("TM", "2200-0200", "0300", False),
    ("TM", "22:00-02:00", "23:30:00", True),
    ("DT", "20260101-20260102", "20260102235959", True),
    ("DT", "20260101-20260102", "20260103", False),
    ("DT", "202601-202602", "20260228", True),
    ("DT", "2025-2026", "20261231235959.999999", True),
    ("DT", "2025-2026", "2027", False),
    ("DT", "2026010112-", "20260101115959", False),
    ("DT", "-2026010112", "20260101125959", True),
    ("DT", "20260101000000+0100-20260101010000+0100", "20251231233000+0000", True),
    ("DT", "20260101000000+0100-20260101010000+0100", "20260101003000+0000", False),
    ("DT", "20260101000000+0100-20260101010000+0100", "20260101003000", True),
    ("DT", "20260101120000-0500-20260101130000-0500", "20260101173000+0000", True),
]


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), RANGE)
def test_range_matching(
    vr: str, query: str, stored: str | None, expected: bool
) -> None:
    key = parse_key("TestKey", vr, query)

    assert key.kind == "range"
    assert key.matches(stored) is expected


def test_dt_with_negative_offset_is_a_single_value() -> None:
    key = parse_key("AcquisitionDateTime", "DT", "2026-0500")

    assert key.kind == "single"
    assert key.matches("20260101000000-0500")
    assert not key.matches("20270101000000-0500")


DATETIME_PAIR = [
    ("20260101-20260102", "2200-0200", "20260101", "2300", True),
    ("20260101-20260102", "2200-0200", "20260102", "0100", True),
    ("20260101-20260102", "2200-0200", "20260102", "0200", True),
    ("20260101-20260102", "2200-0200", "20260101", "2100", False),
    ("20260101-20260102", "2200-0200", "20260102", "0300", False),
    ("20260101-20260102", "2200-0200", "20260101", "0100", False),
    ("20260101-20260102", "2200-0200", "20260102", "2300", False),
    ("20260101-20260103", "2200-0200", "20260102", "1200", True),
    ("20260101-", "2200-", "20260101", "2230", True),
    ("20260101-", "2200-", "20260101", "2130", False),
    ("-20260102", "-0200", "20251201", "1200", True),
    ("-20260102", "-0200", "20260102", "0300", False),
    ("20260101-20260102", "2200-", "20260102", "2359", True),
    ("20260101-20260102", "-0200", "20260101", "0000", True),
    ("20260101", "0800-1200", "20260101", "1000", True),
    ("20260101", "0800-1200", "20260102", "1000", False),
    ("20260101-20260102", "2200-0200", "20260101", None, False),
    ("20260101-20260102", "2200-0200", None, "2300", False),
    ("20260101-20260102", "", "20260102", None, True),
    ("", "2200-0200", None, "0100", True),
    ("", "2200-0200", None, "1200", False),
]


@pytest.mark.parametrize(
    ("date_query", "time_query", "stored_date", "stored_time", "expected"),
    DATETIME_PAIR,
)
def test_combined_date_time_matching(
    date_query: str,
    time_query: str,
    stored_date: str | None,
    stored_time: str | None,
    expected: bool,
) -> None:
    assert pair(date_query, time_query, stored_date, stored_time) is expected


def test_combined_matching_needs_a_date_and_a_time_key() -> None:
    date_key = parse_key("StudyDate", "DA", "20260101")

    with pytest.raises(ValueError, match="DA key and a TM key"):
        match_datetime_pair(date_key, date_key, "20260101", "20260101")


UID_LIST = [
    ("1.2.3\\1.2.4", "1.2.3", True),
    ("1.2.3\\1.2.4", "1.2.4", True),
    ("1.2.3\\1.2.4", "1.2.5", False),
    ("1.2.3\\1.2.4", "1.2.34", False),
    ("1.2.3\\1.2.4", None, False),
    ("1.2.3\\1.2.4\\", "1.2.4", True),
    ("1.2.3\x00\\1.2.4\x00", "1.2.4\x00", True),
]


@pytest.mark.parametrize(("query", "stored", "expected"), UID_LIST)
def test_uid_list_matching(query: str, stored: str | None, expected: bool) -> None:
    key = parse_key("StudyInstanceUID", "UI", query)

    assert key.kind == "list"
    assert key.matches(stored) is expected


OR_LIST = [
    ("CS", "CT\\MR", "MR", True),
    ("CS", "CT\\MR", "US", False),
    ("CS", "CT\\MR", "US\\MR", True),
    ("CS", "CT\\MR", "", False),
    ("CS", "CT\\ M?", "MG", True),
    ("LO", "ACC*\\XYZ", "ACC-7", True),
    ("PN", "Doe*\\Roe*", "Roe^Jane", True),
    ("PN", "Doe*\\Roe*", "Poe^Jane", False),
    ("DA", "20260101\\20260201-20260228", "20260214", True),
    ("DA", "20260101\\20260201-20260228", "20260102", False),
    ("TM", "0800\\2200-0200", "0100", True),
]


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), OR_LIST)
def test_or_list_matching(vr: str, query: str, stored: str, expected: bool) -> None:
    key = parse_key("TestKey", vr, query)

    assert key.kind == "list"
    assert key.matches(stored) is expected


def test_backslash_in_single_valued_text_is_not_a_list() -> None:
    key = parse_key("StudyComments", "LT", "a\\b")

    assert key.kind == "single"
    assert key.matches("a\\b")
    assert not key.matches("a")


NORMALIZE = [
    ("LO", None, ""),
    ("LO", "", ""),
    ("LO", "  ABC  ", "ABC"),
    ("LO", "ABC\x00", "ABC"),
    ("LO", "ABC \x00 ", "ABC"),
    ("CS", " CT ", "CT"),
    ("PN", "Doe^John ", "Doe^John"),
    ("UI", "1.2.3\x00", "1.2.3"),
    ("DA", "20260101 ", "20260101"),
    ("LT", "  indented  ", "  indented"),
    ("ST", " x\x00", " x"),
    ("UT", " x ", " x"),
    ("UC", " x ", " x"),
    ("LO", "A  B", "A  B"),
]


@pytest.mark.parametrize(("vr", "value", "expected"), NORMALIZE)
def test_normalize(vr: str, value: str | None, expected: str) -> None:
    assert normalize(vr, value) == expected


PADDING = [
    ("LO", "ABC  ", " ABC", True),
    ("CS", "CT\x00", "CT ", True),
    ("PN", " Doe^John ", "Doe^John", True),
    ("PN", "Doe ^ John", "Doe^John", True),
    ("UI", "1.2.3", "1.2.3\x00", True),
    ("LT", " text", " text  ", True),
    ("LT", " text", "text", False),
    ("SH", "A1", " \x00", False),
]


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), PADDING)
def test_padding_is_trimmed(vr: str, query: str, stored: str, expected: bool) -> None:
    assert matches(vr, query, stored) is expected


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"

PERSON_NAMES = [
    ("Doe^John", "Doe^John^^^", True),
    ("Doe^John^^^", "Doe^John", True),
    ("Doe", "Doe^John", False),
    ("Doe^John", "Doe", False),
    ("Doe^John^Q", "Doe^John", False),
    ("Yamada^Tarou", JAPANESE, True),
    ("山田^太郎", JAPANESE, True),
    ("やまだ*", JAPANESE, True),
    ("Yamada*=山田*", JAPANESE, True),
    ("Yamada*=やまだ*", JAPANESE, False),
    ("=山田^太郎", JAPANESE, True),
    ("==やまだ^たろう", JAPANESE, True),
    ("=やまだ^たろう", JAPANESE, False),
    ("Yamada^Tarou=", JAPANESE, True),
    ("Yamada^Tarou=山田^太郎", "Yamada^Tarou", False),
    ("*=山田*", "Yamada^Tarou=山田^太郎", True),
    ("Y*=*", "Yamada^Tarou", True),
    ("Y*=?*", "Yamada^Tarou", False),
    ("Roe*", "Doe^John\\Roe^Jane", True),
]


@pytest.mark.parametrize(("query", "stored", "expected"), PERSON_NAMES)
def test_person_name_groups(query: str, stored: str, expected: bool) -> None:
    assert matches("PN", query, stored) is expected


CHARACTER_SETS = [
    (["", "ISO 2022 IR 87"], JAPANESE, "ISO_IR 192", "やまだ*", True),
    (["", "ISO 2022 IR 87"], JAPANESE, "ISO_IR 192", "山田^太郎", True),
    (["", "ISO 2022 IR 87"], JAPANESE, "ISO_IR 192", "=山田*", True),
    (["", "ISO 2022 IR 87"], JAPANESE, "ISO_IR 192", "=やまだ*", False),
    (["", "ISO 2022 IR 87"], JAPANESE, "ISO_IR 100", "yamada^tarou", True),
    ("ISO_IR 192", "Müller^Jürgen", "ISO_IR 100", "Müller*", True),
    ("ISO_IR 192", "Müller^Jürgen", "ISO_IR 100", "MÜLLER^JÜRGEN", True),
    ("ISO_IR 192", "Müller^Jürgen", "ISO_IR 100", "Muller*", False),
    ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 192", "M?ller^J?rgen", True),
    ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 192", "Müller^Jürgen", True),
]


@pytest.mark.parametrize(
    ("stored_charset", "stored_name", "query_charset", "query_name", "expected"),
    CHARACTER_SETS,
)
def test_matching_across_character_sets(
    stored_charset: str | list[str],
    stored_name: str,
    query_charset: str,
    query_name: str,
    expected: bool,
) -> None:
    stored = round_trip_name(stored_charset, stored_name)
    query = round_trip_name(query_charset, query_name)

    assert stored == stored_name
    assert matches("PN", query, stored) is expected


BAD_QUERIES = [
    ("StudyDate", "DA", "2026-13-45x"),
    ("StudyDate", "DA", "20260101-20260102-20260103"),
    ("StudyDate", "DA", "20261345"),
    ("StudyDate", "DA", "20260230"),
    ("StudyDate", "DA", "2026*"),
    ("StudyDate", "DA", "202601"),
    ("StudyDate", "DA", "-"),
    ("StudyDate", "DA", "20260101-2026"),
    ("StudyTime", "TM", "2500"),
    ("StudyTime", "TM", "0860"),
    ("StudyTime", "TM", "08-09-10"),
    ("StudyTime", "TM", "083"),
    ("StudyTime", "TM", "080000.1234567"),
    ("AcquisitionDateTime", "DT", "20261301"),
    ("AcquisitionDateTime", "DT", "20260101+1500"),
    ("AcquisitionDateTime", "DT", "2026-0100-0100"),
    ("AcquisitionDateTime", "DT", "20260101-x"),
    ("StudyInstanceUID", "UI", "1.2.*"),
    ("NumberOfStudyRelatedInstances", "IS", "1?"),
]


@pytest.mark.parametrize(("keyword", "vr", "query"), BAD_QUERIES)
def test_bad_query_values_raise(keyword: str, vr: str, query: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_key(keyword, vr, query)

    assert keyword in str(caught.value)
    assert repr(query) in str(caught.value)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown matching kind"):
        KeyMatcher("PatientID", "LO", "fuzzy")


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("*a" * 500 + "*b", "a" * 20_000, False),
        ("*a?a?b" * 50 + "*", "a" * 20_000, False),
        ("*a?a?b" * 50 + "*", "aaab" * 5_000, False),
        ("*a?a?b" * 50 + "*", "aaaab" * 5_000, True),
    ],
)
def test_long_star_patterns_do_not_backtrack(
    pattern: str, text: str, expected: bool
) -> None:
    key = parse_key("PatientID", "LO", pattern)
    started = time.perf_counter()

    assert key.matches(text) is expected
    assert time.perf_counter() - started < 2.0


PN_TEXT = st.text(alphabet="ABCxyzÄéあ山 ^=-.", max_size=20)
LO_TEXT = st.text(alphabet="ABCxyzÄé 0123-._/", max_size=30)
SH_TEXT = st.text(alphabet="ABCxyz 019-", max_size=16)
CS_TEXT = st.text(alphabet="ABCDXYZ019_ ", max_size=16)
ALL_TEXT = st.one_of(st.none(), st.text(max_size=20))
ANY_VR = st.sampled_from(["PN", "LO", "SH", "CS", "DA", "TM", "DT", "UI", "IS", "LT"])


@given(st.one_of(PN_TEXT.map(lambda t: ("PN", t)), LO_TEXT.map(lambda t: ("LO", t))))
def test_value_matches_itself_pn_lo(vr_and_value: tuple[str, str]) -> None:
    vr, value = vr_and_value

    assert matches(vr, value, value)


@given(st.one_of(SH_TEXT.map(lambda t: ("SH", t)), CS_TEXT.map(lambda t: ("CS", t))))
def test_value_matches_itself_sh_cs(vr_and_value: tuple[str, str]) -> None:
    vr, value = vr_and_value

    assert matches(vr, value, value)


@given(ANY_VR, ALL_TEXT)
def test_star_matches_everything(vr: str, stored: str | None) -> None:
    assert matches(vr, "*", stored)


@given(
    st.text(alphabet="ab*?", min_size=1, max_size=12),
    st.text(alphabet="ab", min_size=1, max_size=12),
)
def test_wildcards_agree_with_fnmatch(pattern: str, text: str) -> None:
    assert matches("LO", pattern, text) is fnmatch.fnmatchcase(text, pattern)


@given(st.integers(min_value=1, max_value=300), st.integers(0, 3000))
def test_star_runs_stay_fast(repeats: int, length: int) -> None:
    key = parse_key("PatientID", "LO", "*a" * repeats + "*b")

    assert key.matches("a" * length + "b") is (length >= repeats)
    assert not key.matches("a" * length)


DATES = st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31))
TIMES = st.times()
DATETIMES = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1))


@given(DATES, DATES, DATES)
def test_date_range_matches_iff_between(low: date, high: date, value: date) -> None:
    query = f"{low:%Y%m%d}-{high:%Y%m%d}"

    assert matches("DA", query, f"{value:%Y%m%d}") is (low <= value <= high)


@given(TIMES, TIMES, TIMES)
def test_time_range_matches_iff_between(low: clock, high: clock, value: clock) -> None:
    query = f"{low:%H%M%S.%f}-{high:%H%M%S.%f}"
    inside = low <= value <= high if low <= high else value >= low or value <= high

    assert matches("TM", query, f"{value:%H%M%S.%f}") is inside


@given(DATETIMES, DATETIMES, DATETIMES)
def test_datetime_range_matches_iff_between(
    low: datetime, high: datetime, value: datetime
) -> None:
    query = f"{low:%Y%m%d%H%M%S.%f}-{high:%Y%m%d%H%M%S.%f}"

    assert matches("DT", query, f"{value:%Y%m%d%H%M%S.%f}") is (low <= value <= high)


@given(DATETIMES, DATETIMES, DATETIMES)
def test_date_time_pair_matches_iff_between(
    low: datetime, high: datetime, value: datetime
) -> None:
    low, high, value = (moment.replace(microsecond=0) for moment in (low, high, value))
    date_query = f"{low:%Y%m%d}-{high:%Y%m%d}"
    time_query = f"{low:%H%M%S}-{high:%H%M%S}"

    result = pair(date_query, time_query, f"{value:%Y%m%d}", f"{value:%H%M%S}")

    assert result is (low <= value <= high)


@given(DATETIMES, st.integers(min_value=-12 * 60, max_value=14 * 60))
def test_datetime_offsets_compare_as_instants(moment: datetime, minutes: int) -> None:
    shifted = moment + timedelta(minutes=minutes)
    sign = "-" if minutes < 0 else "+"
    zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"

    query = f"{shifted:%Y%m%d%H%M%S.%f}{zone}"

    assert matches("DT", query, f"{moment:%Y%m%d%H%M%S.%f}+0000")
