"""Catalog text read straight from element bytes equals pydicom's reading."""

from __future__ import annotations

import warnings

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from appliance.catalog import rawtext
from appliance.catalog.records import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    text_of,
)
from tests.conftest import TEST_FILES

KEYWORDS = PATIENT_KEYWORDS + STUDY_KEYWORDS + SERIES_KEYWORDS + INSTANCE_KEYWORDS

# One element of each VR the catalog copies, by tag.
TAGS_BY_VR = {
    "AS": 0x00101010,
    "CS": 0x00080008,
    "DA": 0x00080020,
    "DS": 0x00281050,
    "IS": 0x00200013,
    "LO": 0x00100020,
    "PN": 0x00100010,
    "SH": 0x00080050,
    "TM": 0x00080030,
    "UI": 0x00080018,
    "US": 0x00280010,
}
CHARSETS = [None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6", "ISO_IR 144"]


def pydicom_text(dataset: Dataset, keyword: str | int) -> str | None:
    """The catalog's text of an element as pydicom's values give it."""
    element = dataset.get(keyword)
    if element is None or element.value is None or element.value == "":
        return None
    value = element.value
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(item) for item in value)
    elif isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    else:
        text = str(value)
    return text.rstrip(" \x00") or None


def raw_dataset(tag: int, vr: str, value: bytes, charset: str | None) -> Dataset:
    dataset = Dataset()
    if charset is not None:
        dataset.SpecificCharacterSet = charset
    dataset[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return dataset


def sample_files() -> list[str]:
    """pydicom's sample files, as shipped (none is downloaded)."""
    return sorted(str(path) for path in TEST_FILES.rglob("*.dcm"))


@pytest.mark.parametrize("path", sample_files())
def test_sample_files_read_the_same(path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fast = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            slow = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            pytest.skip("pydicom cannot read this sample file")
        for keyword in KEYWORDS:
            try:
                expected = pydicom_text(slow, keyword)
            except Exception:
                continue  # a damaged element: the catalog records it empty
            assert text_of(fast, keyword) == expected, keyword


@pytest.mark.parametrize(
    ("vr", "value"),
    [
        ("IS", b"0001"),
        ("IS", b" 12 "),
        ("DS", b" 1.5\\2.0 "),
        ("DS", b"70e1"),
        ("CS", b"ORIGINAL\\PRIMARY "),
        ("CS", b" A \\ B "),
        ("CS", b"A\\\\B"),
        ("PN", b"DOE^JOHN^^^ "),
        ("PN", b"DOE^JOHN=YAMADA^TARO"),
        ("PN", b"DOE^JOHN="),
        ("LO", b" ID1 "),
        ("LO", b"ID1\x00"),
        ("UI", b" 1.2.3 "),
        ("UI", b"1.2.3\x00"),
        ("TM", b"101010.123 "),
        ("US", b"\x00\x02\x00\x01"),
        ("US", b""),
        ("SH", b"  "),
    ],
)
@pytest.mark.parametrize("charset", CHARSETS)
def test_awkward_values_read_the_same(
    vr: str, value: bytes, charset: str | None
) -> None:
    tag = TAGS_BY_VR[vr]
    fast = raw_dataset(tag, vr, value, charset)
    slow = raw_dataset(tag, vr, value, charset)

    assert text_of(fast, tag) == pydicom_text(slow, tag)


def test_unusual_values_are_left_to_pydicom() -> None:
    cases = [
        ("LO", b"M\xfcller", "ISO_IR 100"),
        ("PN", b"DOE^JOHN", "ISO_IR 144"),
        ("CS", b" A \\ B ", None),
        ("US", b"\x00", None),
    ]
    for vr, value, charset in cases:
        dataset = raw_dataset(TAGS_BY_VR[vr], vr, value, charset)
        element = dataset.get_item(TAGS_BY_VR[vr])
        assert rawtext.text(dataset, element) is rawtext.UNDECIDED, (vr, value)


@settings(max_examples=300, deadline=None)
@given(
    vr=st.sampled_from(sorted(TAGS_BY_VR)),
    value=st.binary(max_size=24)
    | st.text(alphabet=" \\^=.-+0123456789AZaz\x00", max_size=24).map(
        lambda text: text.encode("ascii")
    ),
    charset=st.sampled_from(CHARSETS),
)
def test_any_bytes_read_the_same(vr: str, value: bytes, charset: str | None) -> None:
    tag = TAGS_BY_VR[vr]
    fast = raw_dataset(tag, vr, value, charset)
    slow = raw_dataset(tag, vr, value, charset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = pydicom_text(slow, tag)
        except Exception:
            return  # pydicom cannot read it; the catalog records it empty
        assert text_of(fast, tag) == expected
