"""Migration policy: rule matching, planning, watermarks and the release rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.hsm.policy import (
    COPY_TARGETS,
    RELEASE_SOURCES,
    TIERS,
    AnyOf,
    Between,
    Decision,
    Rule,
    StudyFacts,
    may_release,
    plan,
    release_for_watermark,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
INSTANCES = 10


def on(*tiers: str) -> dict[str, int]:
    """A ``verified`` map with every instance verified on each of ``tiers``."""
    return dict.fromkeys(tiers, INSTANCES)


def study(**changes) -> StudyFacts:
    """A CT study of 50 MB received 10 days ago, on the online tier only."""
    facts = StudyFacts(
        study_uid="1.2.3",
        instances=INSTANCES,
        size_bytes=50_000_000,
        received=NOW - 10 * DAY,
        study_date=(NOW - 10 * DAY).date(),
        modalities=frozenset({"CT"}),
        calling_ae_titles=frozenset({"CT1"}),
        verified=on("online"),
    )
    return replace(facts, **changes)


def copy_to(target, *conditions, name="r"):
    return Rule(name, "copy", None, target, tuple(conditions))


def release_from(source, *conditions, name="r"):
    return Rule(name, "release", source, None, tuple(conditions))


def move(source, target, *conditions, name="r"):
    return Rule(name, "move", source, target, tuple(conditions))


def steps(decisions):
    """Decisions as (action, study, source, target) for compact comparisons."""
    return [(d.action, d.study_uid, d.source, d.target) for d in decisions]


# --- rule matching ---------------------------------------------------------

AGE_MIN_30 = Between("study_age_days", at_least=30)
AGE_MAX_30 = Between("study_age_days", at_most=30)
AGE_10_TO_20 = Between("study_age_days", 10, 20)
RECEIVED_MIN_1 = Between("days_since_received", at_least=1)
RECEIVED_MAX_7 = Between("days_since_received", at_most=7)
ACCESS_MIN_90 = Between("days_since_access", at_least=90)
SIZE_MIN_100 = Between("study_size_mb", at_least=100)
SIZE_MAX_HALF = Between("study_size_mb", at_most=0.5)
CT_OR_MR = AnyOf("modalities", frozenset({"CT", "MR"}))
NOT_MG = AnyOf("modalities", frozenset({"MG"}), exclude=True)
FROM_CT1 = AnyOf("calling_ae_titles", frozenset({"CT1", "CT2"}))
NOT_FROM_CT1 = AnyOf("calling_ae_titles", frozenset({"CT1"}), exclude=True)

MATCHING = [
    # (condition, changes to the study, matches); NOW is 2024-06-01 12:00
    (AGE_MIN_30, {"study_date": date(2024, 5, 3)}, False),  # 29 days
    (AGE_MIN_30, {"study_date": date(2024, 5, 2)}, True),  # 30 days
    (AGE_MIN_30, {"study_date": date(2024, 5, 1)}, True),
    (AGE_MIN_30, {"study_date": None}, False),
    (AGE_MAX_30, {"study_date": date(2024, 5, 2)}, True),
    (AGE_MAX_30, {"study_date": date(2024, 5, 1)}, False),
    (AGE_MAX_30, {"study_date": None}, False),
    (AGE_MAX_30, {"study_date": date(2024, 6, 2)}, True),  # dated tomorrow
    (Between("study_age_days", at_least=0), {"study_date": date(2024, 6, 2)}, False),
    (AGE_10_TO_20, {"study_date": date(2024, 5, 23)}, False),  # 9 days
    (AGE_10_TO_20, {"study_date": date(2024, 5, 22)}, True),
    (AGE_10_TO_20, {"study_date": date(2024, 5, 12)}, True),
    (AGE_10_TO_20, {"study_date": date(2024, 5, 11)}, False),  # 21 days
    (RECEIVED_MIN_1, {"received": NOW - DAY + SECOND}, False),
    (RECEIVED_MIN_1, {"received": NOW - DAY}, True),
    (RECEIVED_MAX_7, {"received": NOW - 8 * DAY + SECOND}, True),  # 7 whole days
    (RECEIVED_MAX_7, {"received": NOW - 8 * DAY}, False),
    (ACCESS_MIN_90, {"received": NOW - 100 * DAY}, True),  # never retrieved
    (ACCESS_MIN_90, {"received": NOW - 89 * DAY}, False),
    (
        ACCESS_MIN_90,
        {"received": NOW - 200 * DAY, "last_access": NOW - 90 * DAY},
        True,
    ),
    (
        ACCESS_MIN_90,
        {"received": NOW - 200 * DAY, "last_access": NOW - 90 * DAY + SECOND},
        False,
    ),
    # an instance received after the last retrieval counts as a touch
    (
        ACCESS_MIN_90,
        {"received": NOW - 10 * DAY, "last_access": NOW - 120 * DAY},
        False,
    ),
    (SIZE_MIN_100, {"size_bytes": 99_999_999}, False),
    (SIZE_MIN_100, {"size_bytes": 100_000_000}, True),
    (SIZE_MAX_HALF, {"size_bytes": 500_000}, True),
    (SIZE_MAX_HALF, {"size_bytes": 500_001}, False),
    (CT_OR_MR, {"modalities": frozenset({"MR", "SR"})}, True),
    (CT_OR_MR, {"modalities": frozenset({"US"})}, False),
    (CT_OR_MR, {"modalities": frozenset()}, False),
    (NOT_MG, {"modalities": frozenset({"CT"})}, True),
    (NOT_MG, {"modalities": frozenset({"MG", "SR"})}, False),
    (NOT_MG, {"modalities": frozenset()}, True),
    (FROM_CT1, {"calling_ae_titles": frozenset({"CT2", "WS"})}, True),
    (FROM_CT1, {"calling_ae_titles": frozenset({"MR1"})}, False),
    (FROM_CT1, {"calling_ae_titles": frozenset()}, False),
    (NOT_FROM_CT1, {"calling_ae_titles": frozenset({"CT1", "MR1"})}, False),
    (NOT_FROM_CT1, {"calling_ae_titles": frozenset({"MR1"})}, True),
]


@pytest.mark.parametrize(("condition", "changes", "expected"), MATCHING)
def test_each_condition_and_its_boundaries(condition, changes, expected):
    facts = study(**changes)
    assert copy_to("nearline", condition).matches(facts, NOW) is expected


def test_all_conditions_must_hold():
    facts = study(study_date=date(2024, 1, 1), modalities=frozenset({"US"}))
    assert copy_to("nearline", AGE_MIN_30).matches(facts, NOW)
    assert not copy_to("nearline", AGE_MIN_30, CT_OR_MR).matches(facts, NOW)
    assert copy_to("nearline", AGE_MIN_30, NOT_MG).matches(facts, NOW)


def test_a_rule_without_conditions_matches_every_study():
    assert copy_to("nearline").evaluate(study(study_date=None), NOW) == (
        True,
        "every study",
    )


@pytest.mark.parametrize(
    ("conditions", "changes", "expected"),
    [
        ((AGE_MIN_30,), {"study_date": date(2024, 4, 17)}, "study age 45 days >= 30"),
        ((AGE_MIN_30,), {"study_date": date(2024, 5, 20)}, "study age 12 days < 30"),
        ((AGE_MIN_30,), {"study_date": None}, "study age unknown (no StudyDate)"),
        ((AGE_10_TO_20,), {}, "study age 10 days >= 10 and <= 20"),
        ((RECEIVED_MIN_1,), {}, "received 10 days ago >= 1"),
        ((ACCESS_MIN_90,), {}, "not retrieved since receipt 10 days ago < 90"),
        (
            (ACCESS_MIN_90,),
            {"last_access": NOW - 95 * DAY, "received": NOW - 99 * DAY},
            "last access 95 days ago >= 90",
        ),
        ((SIZE_MIN_100,), {}, "size 50.0 MB < 100"),
        ((CT_OR_MR, NOT_MG), {}, "modality [CT] in [CT, MR], no modality of [MG]"),
        ((CT_OR_MR,), {"modalities": frozenset()}, "no modality recorded"),
        ((NOT_FROM_CT1,), {}, "calling AE title [CT1] excluded"),
    ],
)
def test_evaluate_says_why(conditions, changes, expected):
    _matched, why = copy_to("nearline", *conditions).evaluate(study(**changes), NOW)
    assert why == expected


@pytest.mark.parametrize(
    ("make", "parameter"),
    [
        (lambda: Rule("r", "copy", "online", "nearline"), "source"),
        (lambda: Rule("r", "copy", None, "online"), "target"),
        (lambda: Rule("r", "copy", None, None), "target"),
        (lambda: Rule("r", "release", "online", "offline"), "target"),
        (lambda: Rule("r", "release", "offline", None), "source"),
        (lambda: Rule("r", "move", "nearline", "nearline"), "differ"),
        (lambda: Rule("r", "delete", "online", None), "action"),
        (lambda: Between("study_age_days"), "at_least"),
        (lambda: Between("study_age_days", 20, 10), "at_least"),
        (lambda: Between("age", 1), "measure"),
        (lambda: AnyOf("modalities", frozenset()), "values"),
    ],
)
def test_misuse_raises_naming_the_parameter(make, parameter):
    with pytest.raises(ValueError, match=parameter):
        make()


# --- may_release -----------------------------------------------------------

RELEASES = [
    # (verified copies, tier released, min_copies, allowed)
    (on("online"), "online", 0, False),  # the last copy, whatever min_copies says
    (on("online"), "online", 1, False),
    (on("online", "nearline"), "online", 0, True),
    (on("online", "nearline"), "online", 1, True),
    (on("online", "nearline"), "online", 2, False),
    (on("online", "nearline", "offline"), "online", 2, True),
    (on("online", "nearline", "offline"), "online", 3, False),
    (on("online", "nearline", "offline", "offsite"), "nearline", 3, True),
    # unverified (partial) copies do not count
    ({"online": 10, "nearline": 9, "offline": 10}, "online", 1, True),
    ({"online": 10, "nearline": 9, "offline": 10}, "online", 2, False),
    ({"online": 10, "nearline": 0}, "online", 0, False),
    # nothing to release where the study is not wholly verified
    ({"online": 10, "nearline": 9, "offline": 10}, "nearline", 0, False),
    (on("online", "nearline"), "offline", 0, False),
]


@pytest.mark.parametrize(("verified", "tier", "min_copies", "allowed"), RELEASES)
def test_may_release(verified, tier, min_copies, allowed):
    assert may_release(study(verified=verified), tier, min_copies)[0] is allowed


@pytest.mark.parametrize(
    ("verified", "min_copies", "expected"),
    [
        (on("online"), 0, "online holds the last verified copy"),
        (
            on("online", "nearline"),
            2,
            "only 1 other verified copy (nearline), min_copies 2",
        ),
        (
            on("online", "offline", "nearline"),
            2,
            "2 other verified copies (nearline, offline), min_copies 2",
        ),
        ({"online": 3}, 1, "not every instance has a verified copy on online"),
    ],
)
def test_may_release_says_why(verified, min_copies, expected):
    assert may_release(study(verified=verified), "online", min_copies)[1] == expected


def test_min_copies_must_be_a_count():
    with pytest.raises(ValueError, match="min_copies"):
        may_release(study(), "online", -1)
    with pytest.raises(TypeError, match="min_copies"):
        may_release(study(), "online", True)


def test_an_empty_study_is_on_no_tier():
    empty = study(instances=0, verified={"online": 0, "nearline": 0})
    assert empty.tiers() == ()
    assert not may_release(empty, "online", 0)[0]


# --- planning --------------------------------------------------------------

DEFAULTS = [
    copy_to("nearline", RECEIVED_MIN_1, name="copy-to-nearline"),
    copy_to("offline", Between("days_since_received", at_least=7), name="to-off"),
    release_from("online", ACCESS_MIN_90, name="release-online"),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # too new for anything
        ({"received": NOW - 12 * timedelta(hours=1)}, []),
        # a day old: the nearline copy only
        ({"received": NOW - 2 * DAY}, [("copy", "1.2.3", "online", "nearline")]),
        # ten days old: both copies, in rule order
        (
            {},
            [
                ("copy", "1.2.3", "online", "nearline"),
                ("copy", "1.2.3", "online", "offline"),
            ],
        ),
        # already on nearline: that copy is done, never planned again
        (
            {"verified": on("online", "nearline")},
            [("copy", "1.2.3", "online", "offline")],
        ),
        # unused for 100 days, copies made: released
        (
            {
                "received": NOW - 100 * DAY,
                "verified": on("online", "nearline", "offline"),
            },
            [("release", "1.2.3", "online", None)],
        ),
        # unused for 100 days, but only one other copy: copied, release held
        (
            {"received": NOW - 100 * DAY, "verified": on("online", "nearline")},
            [
                ("copy", "1.2.3", "online", "offline"),
                ("hold", "1.2.3", "online", None),
            ],
        ),
        # released from online already: nothing left to do
        ({"received": NOW - 100 * DAY, "verified": on("nearline", "offline")}, []),
    ],
)
def test_plan_with_hospital_defaults(changes, expected):
    decisions = plan(DEFAULTS, [study(**changes)], NOW, min_copies=2)
    assert steps(decisions) == expected


def test_decisions_say_which_rule_and_why():
    rules = [copy_to("offline", AGE_MIN_30, name="ct-after-30-days")]
    facts = study(study_date=date(2024, 4, 17))

    [decision] = plan(rules, [facts], NOW, min_copies=2)

    assert decision == Decision(
        rule="ct-after-30-days",
        study_uid="1.2.3",
        action="copy",
        source="online",
        target="offline",
        size_bytes=50_000_000,
        reason="rule ct-after-30-days: study age 45 days >= 30",
    )
    assert str(decision) == (
        "copy 1.2.3 online -> offline (50.0 MB): "
        "rule ct-after-30-days: study age 45 days >= 30"
    )


def test_a_held_release_says_why():
    rules = [release_from("online", name="free")]
    [decision] = plan(
        rules, [study(verified=on("online", "nearline"))], NOW, min_copies=2
    )
    assert decision.action == "hold"
    assert decision.reason == (
        "rule free: every study; only 1 other verified copy (nearline), min_copies 2"
    )


def test_a_second_copy_to_the_same_tier_is_not_planned():
    rules = [
        copy_to("offline", CT_OR_MR, name="ct-mr"),
        copy_to("offline", RECEIVED_MIN_1, name="everything"),
    ]
    decisions = plan(rules, [study()], NOW, min_copies=2)
    assert [d.rule for d in decisions] == ["ct-mr"]


def test_rules_that_do_not_match_plan_nothing():
    rules = [copy_to("offline", NOT_MG, name="not-mg")]
    assert plan(rules, [study(modalities=frozenset({"MG"}))], NOW, min_copies=2) == []
    assert plan([], [study()], NOW, min_copies=2) == []


def test_nothing_is_copied_from_a_partial_copy():
    partial = study(verified={"online": 9})
    assert plan([copy_to("nearline")], [partial], NOW, min_copies=2) == []


def test_releases_count_the_copies_left_by_earlier_releases():
    rules = [release_from("online", name="a"), release_from("nearline", name="b")]
    facts = study(verified=on("online", "nearline", "offline"))

    assert steps(plan(rules, [facts], NOW, min_copies=1)) == [
        ("release", "1.2.3", "online", None),
        ("release", "1.2.3", "nearline", None),
    ]
    assert steps(plan(rules, [facts], NOW, min_copies=2)) == [
        ("release", "1.2.3", "online", None),
        ("hold", "1.2.3", "nearline", None),
    ]


def test_a_copy_after_a_release_reads_the_study_where_it_is_at_the_start():
    # A run makes a study's copies before its releases (MigrationJob.run):
    # the copy reads online, which the release frees afterwards.
    rules = [release_from("online", name="free"), copy_to("offline", name="tape")]
    facts = study(verified=on("online", "nearline", "offsite"))
    assert steps(plan(rules, [facts], NOW, min_copies=2)) == [
        ("release", "1.2.3", "online", None),
        ("copy", "1.2.3", "online", "offline"),
    ]


def test_planned_copies_do_not_count_for_a_release():
    rules = [copy_to("offline", name="tape"), release_from("online", name="free")]
    facts = study(verified=on("online", "nearline"))
    assert steps(plan(rules, [facts], NOW, min_copies=2)) == [
        ("copy", "1.2.3", "online", "offline"),
        ("hold", "1.2.3", "online", None),
    ]


@pytest.mark.parametrize(
    ("verified", "min_copies", "expected", "said"),
    [
        (on("online"), 1, [("move", "online", "nearline")], "after the copy 1 other"),
        # the release would leave too few copies: copy only
        (on("online"), 2, [("copy", "online", "nearline")], "copy only: "),
        (
            on("online", "offline"),
            2,
            [("move", "online", "nearline")],
            "after the copy 2 other verified copies (nearline, offline)",
        ),
        # already copied: only the release is left
        (
            on("online", "nearline"),
            1,
            [("release", "online", None)],
            "already on nearline; 1 other",
        ),
        (on("online", "nearline"), 2, [("hold", "online", None)], "only 1 other"),
        # not on the source tier: nothing to move
        (on("nearline", "offline"), 1, [], ""),
    ],
)
def test_move(verified, min_copies, expected, said):
    rules = [move("online", "nearline", name="mv")]
    decisions = plan(rules, [study(verified=verified)], NOW, min_copies=min_copies)
    assert [(d.action, d.source, d.target) for d in decisions] == expected
    assert all(said in d.reason for d in decisions)


def test_a_move_whose_copy_is_already_planned_and_unsafe_is_held():
    rules = [copy_to("nearline", name="cp"), move("online", "nearline", name="mv")]
    decisions = plan(rules, [study()], NOW, min_copies=2)
    assert steps(decisions) == [
        ("copy", "1.2.3", "online", "nearline"),
        ("hold", "1.2.3", "online", None),
    ]


@pytest.mark.parametrize(
    ("rules", "verified", "expected"),
    [
        (
            [move("nearline", "offline", name="out"), copy_to("nearline", name="in")],
            on("online", "nearline"),
            [("move", "1.2.3", "nearline", "offline")],
        ),
        (
            [release_from("nearline", name="out"), move("online", "nearline")],
            on("online", "nearline", "offline"),
            [("release", "1.2.3", "nearline", None)],
        ),
    ],
)
def test_of_two_contradicting_rules_the_earlier_wins(rules, verified, expected):
    decisions = plan(rules, [study(verified=verified)], NOW, min_copies=1)
    assert steps(decisions) == expected


def test_studies_keep_their_order_and_rules_theirs():
    rules = [copy_to("nearline", name="a"), copy_to("offline", name="b")]
    studies = [study(study_uid="9"), study(study_uid="1")]
    assert [(d.study_uid, d.rule) for d in plan(rules, studies, NOW, min_copies=2)] == [
        ("9", "a"),
        ("9", "b"),
        ("1", "a"),
        ("1", "b"),
    ]


def test_sizes_are_those_on_the_source_tier():
    facts = study(
        verified=on("online", "nearline", "offline"),
        tier_bytes={"nearline": 20_000_000},
    )
    rules = [release_from("nearline", name="a"), release_from("online", name="b")]
    sizes = [d.size_bytes for d in plan(rules, [facts], NOW, min_copies=1)]
    assert sizes == [20_000_000, 50_000_000]


# --- watermarks ------------------------------------------------------------


def old_study(uid: str, touched_days_ago: int, size: int = 5, **changes):
    """A study on three tiers, last touched ``touched_days_ago`` days ago."""
    facts = study(
        study_uid=uid,
        size_bytes=size,
        received=NOW - 400 * DAY,
        last_access=NOW - touched_days_ago * DAY,
        verified=on("online", "nearline", "offline"),
    )
    return replace(facts, **changes)


def watermark(used, studies, capacity=100, high=85, low=75, min_copies=2):
    return release_for_watermark(
        "online", used, capacity, high, low, studies, min_copies
    )


STUDIES = [old_study(str(n), touched_days_ago=n) for n in range(1, 11)]


@pytest.mark.parametrize(
    ("used", "released"),
    [
        (80, []),  # between the marks
        (85, []),  # exactly at the high mark is not above it
        (86, ["10", "9", "8"]),  # 86 -> 71: least recently used first
        (90, ["10", "9", "8"]),  # 90 -> 75: exactly at the low mark is enough
        (91, ["10", "9", "8", "7"]),
    ],
)
def test_watermark_releases_least_recently_used_first(used, released):
    result = watermark(used, STUDIES)
    assert [d.study_uid for d in result.decisions] == released
    assert result.projected_bytes == used - 5 * len(released)
    assert result.warning is None


def test_watermark_decisions_say_why():
    [first, *_rest] = watermark(86, STUDIES).decisions
    assert first.rule == "online-watermark"
    assert (first.action, first.source, first.target) == ("release", "online", None)
    assert first.reason == (
        "online above its high watermark (86.0% used > 85%): least recently "
        "used, last touched 2024-05-22; 2 other verified copies (nearline, "
        "offline), min_copies 2"
    )


def test_watermark_ties_are_broken_by_receipt_then_uid():
    tied = [
        old_study("b", 50),
        old_study("a", 50),
        old_study("c", 50, received=NOW - 500 * DAY),
    ]
    for order in (tied, tied[::-1]):
        result = watermark(100, order, low=0, high=1)
        assert [d.study_uid for d in result.decisions] == ["c", "a", "b"]


def test_a_never_retrieved_study_counts_from_its_receipt():
    studies = [
        old_study("retrieved", 30),
        old_study("never", 0, last_access=None, received=NOW - 60 * DAY),
    ]
    result = watermark(86, studies, low=80)
    assert [d.study_uid for d in result.decisions] == ["never", "retrieved"]


def test_watermark_warns_when_it_cannot_reach_the_low_mark():
    studies = [
        old_study("1", 100, size=5),
        old_study("2", 200, size=5, verified=on("online", "nearline")),
        old_study("3", 300, size=5, verified=on("online")),
        old_study("4", 400, size=50, verified=on("nearline", "offline")),
    ]
    result = watermark(95, studies)

    assert [d.study_uid for d in result.decisions] == ["1"]
    assert result.projected_bytes == 90
    assert result.warning == (
        "online stays above its low watermark 75%: releasing all 1 releasable "
        "studies leaves 90.0% used; 2 other studies on online lack the other "
        "verified copies that min_copies asks for"
    )


def test_watermark_frees_the_bytes_on_its_tier():
    studies = [old_study("1", 10, size=50, tier_bytes={"online": 20})]
    result = watermark(90, studies)
    assert result.decisions[0].size_bytes == 20
    assert result.projected_bytes == 70


def test_watermarks_accept_fractions_of_a_percent():
    assert watermark(855, STUDIES, capacity=1000, high=85.5).decisions == ()
    assert watermark(856, STUDIES, capacity=1000, high=85.5).decisions


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"capacity": 0}, "capacity_bytes"),
        ({"low": 85}, "low < high"),
        ({"high": 101}, "high <= 100"),
        ({"low": -1}, "0 <= low"),
    ],
)
def test_watermark_misuse(arguments, message):
    with pytest.raises(ValueError, match=message):
        watermark(90, STUDIES, **arguments)


# --- properties ------------------------------------------------------------


@st.composite
def study_facts(draw, uid: str = "1.2.3") -> StudyFacts:
    instances = draw(st.integers(1, 3))
    counts = st.integers(0, instances)
    verified = draw(st.dictionaries(st.sampled_from(TIERS), counts))
    received = NOW - draw(st.integers(0, 400)) * DAY
    accessed = draw(st.none() | st.integers(0, 400).map(lambda n: NOW - n * DAY))
    return StudyFacts(
        study_uid=uid,
        instances=instances,
        size_bytes=draw(st.integers(1, 10**9)),
        received=received,
        study_date=draw(st.none() | st.dates(date(2000, 1, 1), date(2025, 1, 1))),
        last_access=accessed,
        modalities=draw(st.frozensets(st.sampled_from(["CT", "MR", "MG"]))),
        verified=verified,
    )


@st.composite
def rules(draw) -> Rule:
    action = draw(st.sampled_from(["copy", "move", "release"]))
    source = draw(st.sampled_from(RELEASE_SOURCES)) if action != "copy" else None
    targets = [t for t in COPY_TARGETS if t != source]
    target = draw(st.sampled_from(targets)) if action != "release" else None
    conditions = draw(
        st.lists(
            st.sampled_from(
                [ACCESS_MIN_90, AGE_MIN_30, NOT_MG, CT_OR_MR, SIZE_MIN_100]
            ),
            max_size=2,
        )
    )
    return Rule(draw(st.text(min_size=1)), action, source, target, tuple(conditions))


def assert_never_below_min_copies(facts, decisions, min_copies):
    """Replay the decisions, assuming every plain copy fails: each release
    still leaves max(min_copies, 1) other verified copies."""
    verified = set(facts.tiers())
    for decision in decisions:
        if decision.action == "move":
            verified.add(decision.target)  # released only once it is verified
        if decision.action in ("move", "release"):
            assert decision.source in verified
            verified.discard(decision.source)
            assert len(verified) >= max(min_copies, 1), decision
        if decision.action in ("copy", "move"):
            assert decision.target not in facts.tiers(), "already there"


@settings(max_examples=400, deadline=None)
@given(
    facts=study_facts(),
    rule_list=st.lists(rules(), max_size=6),
    min_copies=st.integers(0, 3),
)
def test_no_plan_releases_below_min_copies(facts, rule_list, min_copies):
    decisions = plan(rule_list, [facts], NOW, min_copies=min_copies)
    assert_never_below_min_copies(facts, decisions, min_copies)


@settings(max_examples=300, deadline=None)
@given(
    studies=st.lists(study_facts(), max_size=8),
    used=st.integers(0, 2 * 10**9),
    marks=st.tuples(st.integers(0, 99), st.integers(1, 100)).filter(
        lambda m: m[0] < m[1]
    ),
    min_copies=st.integers(0, 3),
)
def test_no_watermark_release_goes_below_min_copies(studies, used, marks, min_copies):
    studies = [replace(facts, study_uid=str(n)) for n, facts in enumerate(studies)]
    low, high = marks
    result = release_for_watermark(
        "nearline", used, 10**9, high, low, studies, min_copies
    )

    by_uid = {facts.study_uid: facts for facts in studies}
    released = [d.study_uid for d in result.decisions]
    assert len(released) == len(set(released))
    for decision in result.decisions:
        facts = by_uid[decision.study_uid]
        assert_never_below_min_copies(facts, [decision], min_copies)
