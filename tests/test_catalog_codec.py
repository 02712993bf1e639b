"""The catalog's value codec: orjson where it can, the standard library
where it cannot, the same values either way."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.catalog import codec

# What catalog records are made of: string keys; strings, integers within
# 64 bits, finite floats, booleans, None, lists and dicts of them.
_scalars = (
    st.text()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=12,
)


def _standard(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@given(_values)
def test_values_read_back_as_written_and_as_the_standard_library_reads_them(value):
    raw = codec.dumps(value)
    assert codec.loads(raw) == json.loads(raw) == value
    # What the standard library wrote before reads back the same.
    assert codec.loads(_standard(value)) == value


def test_the_compact_form_is_the_standard_librarys():
    value = {"PatientName": "Müller^Jürgen", "size": 12, "copies": [], "ok": True}
    assert codec.dumps(value) == _standard(value)


def test_integers_beyond_64_bits_and_non_string_keys_are_written_as_before():
    value = {"big": 2**70, "negative": -(2**64)}
    assert codec.dumps(value) == _standard(value)
    assert codec.loads(codec.dumps(value)) == value
    assert codec.dumps({1: "a"}) == b'{"1":"a"}'


def test_a_lone_surrogate_is_refused_as_the_standard_library_refuses_it():
    with pytest.raises(UnicodeEncodeError):
        codec.dumps({"PatientName": "bad\udcff"})


def test_a_value_with_an_encoded_surrogate_still_reads():
    # Never written by the catalog, but read as leniently as it always was.
    raw = '{"PatientName":"bad\ud800"}'.encode("utf-8", "surrogatepass")
    assert codec.loads(raw) == {"PatientName": "bad\ud800"}


def test_memoryviews_read_like_bytes():
    assert codec.loads(memoryview(b'{"a":[1,2.5]}')) == {"a": [1, 2.5]}
