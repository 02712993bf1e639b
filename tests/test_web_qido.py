"""QIDO-RS parameters to C-FIND identifiers: keywords and tags, return keys
per level, paging values, and what is refused."""

from __future__ import annotations

import pytest

from appliance.web import qido


def test_keywords_and_tags_name_the_same_key() -> None:
    by_keyword = qido.parse(qido.STUDY, [("PatientName", "Doe*")], {})
    by_tag = qido.parse(qido.STUDY, [("00100010", "Doe*")], {})
    assert by_keyword.keys == by_tag.keys == {"PatientName": "Doe*"}


def test_a_repeated_key_is_a_list_of_values() -> None:
    search = qido.parse(qido.STUDY, [("PatientID", "A"), ("PatientID", "B")], {})
    assert search.keys == {"PatientID": "A\\B"}


def test_return_keys_per_level_and_includefield() -> None:
    studies = qido.parse(qido.STUDY, [("includefield", "StudyDescription")], {})
    assert "StudyDescription" in studies.returned
    assert "PatientName" in studies.returned
    assert "Modality" not in studies.returned

    within = qido.parse(qido.SERIES, [], {"StudyInstanceUID": "1.2"})
    assert within.keys == {"StudyInstanceUID": "1.2"}
    assert "PatientName" not in within.returned
    everywhere = qido.parse(qido.SERIES, [], {})
    assert "PatientName" in everywhere.returned

    everything = qido.parse(qido.IMAGE, [("includefield", "all")], {})
    assert {"ImageType", "ContentDate"} <= set(everything.returned)


def test_paging_values() -> None:
    search = qido.parse(qido.STUDY, [("limit", "10"), ("offset", "20")], {})
    assert (search.limit, search.offset) == (10, 20)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NotAKeyword", "x", "not a DICOM attribute"),
        ("limit", "ten", "whole number"),
        ("offset", "-1", "whole number"),
        ("limit", "\u00b2", "whole number"),
        ("offset", "9" * 20, "whole number"),
        ("limit", "9" * 5000, "whole number"),
        ("00091001", "x", "not a DICOM attribute"),
        ("ReferencedStudySequence", "x", "sequence"),
        ("00081110.00081150", "1.2", "inside sequences"),
    ],
)
def test_what_cannot_be_searched_is_refused(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(qido.BadSearch, match=message):
        qido.parse(qido.STUDY, [(name, value)], {})


def test_keys_not_matched_at_the_level_are_left_out_and_named() -> None:
    search = qido.parse(
        qido.STUDY,
        [("PatientID", "A"), ("Modality", "CT"), ("00180015", "HEAD")],
        {},
    )
    assert search.keys == {"PatientID": "A"}
    assert search.ignored == ["Modality", "00180015"]
    (text,) = qido.warnings(search)
    assert "study level" in text and "Modality, 00180015" in text
    # An empty value asks for the attribute back, not for a match.
    returned = qido.parse(qido.STUDY, [("Modality", "")], {})
    assert returned.ignored == [] and "Modality" in returned.returned
    # Where the catalog holds it, the same key is matched.
    series = qido.parse(qido.SERIES, [("Modality", "CT")], {})
    assert series.keys == {"Modality": "CT"} and qido.warnings(series) == []


def test_matching_options_not_offered_are_named_when_asked_for() -> None:
    asked = [
        ("fuzzymatching", "true"),
        ("emptyvaluematching", "TRUE"),
        ("multiplevaluematching", "false"),
    ]
    search = qido.parse(qido.STUDY, asked, {})
    assert search.options == ["fuzzymatching", "emptyvaluematching"]
    texts = qido.warnings(search)
    assert [text.split("=")[0] for text in texts] == search.options
    with pytest.raises(qido.BadSearch, match="true or false"):
        qido.parse(qido.STUDY, [("fuzzymatching", "yes")], {})


@pytest.mark.parametrize(
    "name, values",
    [
        ("fuzzymatching", ("true", "false")),
        ("fuzzymatching", ("true", "true")),
        ("limit", ("10", "20")),
        ("offset", ("0", "5")),
    ],
)
def test_a_setting_given_twice_is_refused(name: str, values: tuple[str, str]) -> None:
    asked = [(name, value) for value in values]
    with pytest.raises(qido.BadSearch, match=f"{name} is given more than once"):
        qido.parse(qido.STUDY, asked, {})
    # Keys and includefield may repeat: their values add up.
    repeated = [("Modality", "CT"), ("Modality", "MR"), ("includefield", "all")]
    search = qido.parse(qido.SERIES, [*repeated, ("includefield", "all")], {})
    assert search.keys == {"Modality": "CT\\MR"}
