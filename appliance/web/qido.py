"""QIDO-RS searches (PS3.18 10.6) as C-FIND queries.

The query parameters become a C-FIND identifier, which the DICOM node's
own code turns into a catalog query: the matching rules (wildcards, date
ranges, person names, UID lists) are those of C-FIND, not a second
implementation of them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from appliance.catalog.query import Row, find
from appliance.catalog.records import (
    COMPUTED_KEYWORDS,
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
)
from appliance.catalog.store import Catalog
from appliance.dicom.find import STUDY_ROOT_FIND, query_from_identifier
from appliance.web.dicom_json import row_object, tag_of, vr_of

logger = logging.getLogger(__name__)

STUDY, SERIES, IMAGE = "STUDY", "SERIES", "IMAGE"

# What each level answers when includefield does not ask for more
# (PS3.18 10.6.3.3, tables 10.6.3-3 to 10.6.3-5), among what the catalog keeps.
_STUDY_RETURN = [
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
_SERIES_RETURN = [
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
]
_INSTANCE_RETURN = [
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "AvailableTransferSyntaxUID",
]
# Every keyword the catalog answers at each level: includefield=all.
_ALL = {
    STUDY: [
        *PATIENT_KEYWORDS,
        *STUDY_KEYWORDS,
        *COMPUTED_KEYWORDS["STUDY"],
    ],
    SERIES: [*SERIES_KEYWORDS, *COMPUTED_KEYWORDS["SERIES"]],
    IMAGE: [*INSTANCE_KEYWORDS, *COMPUTED_KEYWORDS["IMAGE"]],
}
# Keys the catalog can match at each level (a row of a level joins its
# parents): a key outside these would be ignored by the search, so it is
# left out of it and named in a Warning header instead (PS3.18 8.3.4).
_MATCHED = {
    STUDY: {
        *PATIENT_KEYWORDS,
        *COMPUTED_KEYWORDS["PATIENT"],
        *STUDY_KEYWORDS,
        *COMPUTED_KEYWORDS["STUDY"],
    },
}
_MATCHED[SERIES] = {*_MATCHED[STUDY], *SERIES_KEYWORDS, *COMPUTED_KEYWORDS["SERIES"]}
_MATCHED[IMAGE] = {*_MATCHED[SERIES], *INSTANCE_KEYWORDS, *COMPUTED_KEYWORDS["IMAGE"]}
_LEVEL_WORDS = {STUDY: "study", SERIES: "series", IMAGE: "instance"}
# Matching options of PS3.18 8.3.4 this server does not offer, and what it
# does instead when one is asked for.
_OPTIONS = {
    "fuzzymatching": "person names were matched literally",
    "emptyvaluematching": "an empty value matched anything, as in C-FIND",
    "multiplevaluematching": "each key was matched as C-FIND matches it",
}
# Parameters that take one value: given twice, the search is refused.
_SINGLE = {"limit", "offset", *_OPTIONS}
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_NUMERIC_VRS = {"US", "UL", "SS", "SL", "SV", "UV"}
_FLOAT_VRS = {"FL", "FD"}
_TEXT_NUMBER_VRS = {"IS", "DS"}
# Numbers as DICOM writes them (PS3.5 6.2, IS and DS), in ASCII: Python's
# int() and float() also read '0_4', '٤' (Arabic-Indic four), 'nan' and
# 'inf', which would match as numbers no DICOM value is written as.
_INTEGER = re.compile(r" *[+-]?[0-9]+ *")
_DECIMAL = re.compile(r" *[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)? *")


class BadSearch(ValueError):
    """The search's parameters cannot be understood (answered 400)."""


@dataclass
class Search:
    """One QIDO-RS request: its level, keys, return keys and paging."""

    level: str
    keys: dict[str, str] = field(default_factory=dict)
    returned: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    # Matching options asked for but not offered, and keys left out of the
    # search (as the caller named them): each is named in a Warning header.
    options: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    # Set by run when more matched than the server answers at once.
    cut_at: int | None = None


def parse(
    level: str,
    params: Iterable[tuple[str, str]],
    within: dict[str, str],
) -> Search:
    """The search the query parameters ask for; ``within`` holds the UIDs
    of the path (/studies/{study}/series: the study). Raises BadSearch."""
    search = Search(level)
    includes: list[str] = []
    seen: set[str] = set()
    for name, value in params:
        if name in _SINGLE and name in seen:
            # Two values of a setting: which one was meant cannot be told.
            raise BadSearch(f"{name} is given more than once")
        seen.add(name)
        if name == "includefield":
            includes += [item.strip() for item in value.split(",") if item.strip()]
        elif name == "limit":
            search.limit = _count(name, value)
        elif name == "offset":
            search.offset = _count(name, value)
        elif name in _OPTIONS:
            if _flag(name, value):
                search.options.append(name)
        else:
            keyword = _keyword(name)
            if value and keyword not in _MATCHED[level]:
                search.ignored.append(name)
            elif keyword in search.keys:
                search.keys[keyword] += "\\" + value
            else:
                search.keys[keyword] = value
    search.keys.update(within)
    search.returned = _returned(level, bool(within), includes, search.keys)
    return search


def warnings(search: Search) -> list[str]:
    """What the search did not do of what it was asked: one text for each
    matching option not offered, one for the keys it left out."""
    texts = [
        f"{name}=true is not supported: {_OPTIONS[name]}" for name in search.options
    ]
    if search.ignored:
        names = ", ".join(dict.fromkeys(search.ignored))
        texts.append(
            f"not matched at the {_LEVEL_WORDS[search.level]} level, so ignored: "
            + names
        )
    if search.cut_at is not None:
        texts.append(
            f"more results matched than the {search.cut_at} answered at once "
            f"(web.qido_max_results); ask for the rest with "
            f"offset={search.offset + search.cut_at}"
        )
    return texts


def run(catalog: Catalog, search: Search, most: int) -> list[dict[str, Any]]:
    """The page of results the search asks for, as DICOM JSON objects; at
    most ``most`` of them (``search.cut_at`` is set when more matched)."""
    identifier = identifier_of(search)
    try:
        query = query_from_identifier(identifier, STUDY_ROOT_FIND)
    except ValueError as exc:
        raise BadSearch(str(exc)) from exc

    # Every result is held in memory until the answer is sent: a search
    # without a limit on a large archive would take the web child's memory.
    capped = search.limit is None or search.limit > most
    wanted = most if capped else cast(int, search.limit)
    # One result more than answered tells whether the page was cut.
    stop = search.offset + wanted + int(capped)

    # Closed here, in this thread: the search holds a read transaction.
    found = cast(Generator[Row, None, None], find(catalog, query, lambda: False))
    with contextlib.closing(found) as rows:
        page = list(itertools.islice(rows, search.offset, stop))
    if len(page) > wanted:
        search.cut_at = wanted
    return [row_object(search.returned, row) for row in page[:wanted]]


def identifier_of(search: Search) -> Dataset:
    """The C-FIND identifier of the search: every return key empty, every
    matching key with its value (PS3.4 C.4.1.1.3.1)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = search.level
    for keyword in search.returned:
        identifier.add_new(tag_of(keyword), vr_of(keyword), None)
    for keyword, text in search.keys.items():
        vr = vr_of(keyword)
        identifier.add_new(tag_of(keyword), vr, _value(keyword, vr, text))
    return identifier


def _value(keyword: str, vr: str, text: str) -> Any:
    if vr == "SQ":
        raise BadSearch(
            f"{keyword} is a sequence: searching in sequences is not supported"
        )
    if vr not in _NUMERIC_VRS | _FLOAT_VRS | _TEXT_NUMBER_VRS or not text:
        return text
    decimal = vr in _FLOAT_VRS | {"DS"}
    kind, written = (float, _DECIMAL) if decimal else (int, _INTEGER)
    parts = text.split("\\")
    try:
        if not all(written.fullmatch(part) for part in parts):
            raise ValueError(text)
        # int() refuses more than 4300 digits with a ValueError too.
        values = [kind(part) for part in parts]
    except ValueError:
        raise BadSearch(f"{keyword} takes numbers, not {text!r}") from None
    if vr in _TEXT_NUMBER_VRS:
        # Numbers written as text: matched as the text, once known to be one.
        return text
    return values if len(values) > 1 else values[0]


def _returned(
    level: str, nested: bool, includes: list[str], keys: dict[str, str]
) -> list[str]:
    if level == STUDY:
        base = list(_STUDY_RETURN)
    elif level == SERIES:
        base = [*_SERIES_RETURN, "StudyInstanceUID"]
        if not nested:
            base += _STUDY_RETURN
    else:
        base = [*_INSTANCE_RETURN, "StudyInstanceUID", "SeriesInstanceUID"]
        if not nested:
            base += _STUDY_RETURN + _SERIES_RETURN
    for item in includes:
        if item.lower() == "all":
            base += _ALL[level]
        else:
            base.append(_keyword(item))
    base += list(keys)
    return list(dict.fromkeys(base))


def _keyword(name: str) -> str:
    """The keyword a parameter names, by keyword or by tag (PS3.18 8.3.4.1)."""
    if "." in name:
        raise BadSearch(f"{name!r}: keys inside sequences are not supported")
    keyword = keyword_for_tag(int(name, 16)) if _TAG.match(name) else name
    if not keyword:
        # A private or unknown tag: no keyword, nothing the catalog holds.
        raise BadSearch(f"{name!r} is not a DICOM attribute keyword or tag")
    try:
        tag_of(keyword)
    except ValueError:
        raise BadSearch(f"{name!r} is not a DICOM attribute keyword or tag") from None
    if vr_of(keyword) == "SQ":
        raise BadSearch(f"{keyword} is a sequence: not a search key")
    return keyword


def _flag(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise BadSearch(f"{name} must be true or false, not {value!r}")
    return text == "true"


def _count(name: str, value: str) -> int:
    # ASCII digits only (str.isdigit also takes '²'), and few enough for a
    # slice of the results to start or stop at (and for int() to read).
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadSearch(f"{name} must be a whole number, not {value!r}")
    return int(value)
