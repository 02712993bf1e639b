"""C-FIND responses written straight to bytes must equal what pydicom and
pynetdicom would write, and must fit the peer's maximum PDU length."""

from __future__ import annotations

import string
import warnings
from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_FIND_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import encode

from appliance.dicom import responses
from appliance.dicom.responses import Element, command_set, encode_identifier

STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]

DIGITS = string.digits
UPPER = string.ascii_uppercase + string.digits + " _"
PRINTABLE = "".join(c for c in string.printable if c not in "\\\r\n\t\x0b\x0c")
ACCENTED = "äöüßéèçñÅØ"
JAPANESE = "山田太郎やまだ"


def _text(alphabet: str, low: int, high: int) -> st.SearchStrategy[str]:
    return st.text(alphabet, min_size=low, max_size=high)


def person_names() -> st.SearchStrategy[str]:
    """Names of one or two component groups, without trailing delimiters
    (which pydicom drops and the appliance sends as stored)."""
    letters = string.ascii_letters + ACCENTED
    group = st.lists(_text(letters, 1, 10), min_size=1, max_size=3).map("^".join)
    return st.lists(group, min_size=1, max_size=2).map("=".join)


# (tag, VR, value strategy) for keys a C-FIND asks for; values are valid for
# their VR, as the catalog holds them.
KEYS = [
    (0x00080020, "DA", _text(DIGITS, 8, 8)),
    (0x00080030, "TM", _text(DIGITS, 2, 6)),
    (0x00080050, "SH", _text(PRINTABLE, 0, 16)),
    (0x00080061, "CS", st.lists(_text(UPPER, 1, 4), max_size=3).map("\\".join)),
    (0x00081030, "LO", _text(PRINTABLE + ACCENTED, 0, 64)),
    (0x00100010, "PN", st.one_of(st.just(""), person_names())),
    (0x00100020, "LO", _text(PRINTABLE, 0, 64)),
    (0x00100030, "DA", _text(DIGITS, 0, 8)),
    (0x00101010, "AS", st.sampled_from(["", "045Y", "003M"])),
    (0x00101020, "DS", st.sampled_from(["", "1.75", "180", "0.5\\1.25"])),
    (0x00104000, "LT", _text(PRINTABLE + ACCENTED, 0, 200)),
    (0x0020000D, "UI", _text(DIGITS + ".", 1, 64)),
    (0x00200010, "SH", _text(PRINTABLE, 0, 16)),
    (0x00201208, "IS", st.integers(0, 10**6).map(str)),
    (0x00081111, "SQ", st.none()),
]


@st.composite
def identifiers(draw: st.DrawFn) -> tuple[list[Element], str | None]:
    """A response's elements, some empty, and the character set they use."""
    chosen = draw(st.lists(st.sampled_from(KEYS), unique_by=lambda k: k[0]))
    elements = []
    for tag, vr, values in chosen:
        value = draw(st.one_of(st.none(), values))
        elements.append(Element(tag, vr, value))
    elements.append(Element(0x00080052, "CS", draw(st.sampled_from(["STUDY"]))))
    elements.append(Element(0x00080054, "AE", "APPLIANCE"))

    texts = [e.value for e in elements if e.value]
    charset = None
    if not all(text.isascii() for text in texts):
        charset = "ISO_IR 192"
        if all(
            text.encode("latin_1", "ignore").decode("latin_1") == text for text in texts
        ):
            charset = draw(st.sampled_from(["ISO_IR 192", "ISO_IR 100"]))
    if charset or draw(st.booleans()):
        charset = charset or "ISO_IR 100"
        elements.append(Element(0x00080005, "CS", charset))
    return elements, charset


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
@settings(max_examples=300, deadline=None)
@given(case=identifiers())
def test_identifier_bytes_equal_pydicom(
    syntax: UID, case: tuple[list[Element], str | None]
) -> None:
    elements, charset = case

    direct = responses._encode_directly(elements, charset, syntax.is_implicit_VR)

    with warnings.catch_warnings():
        # pydicom warns about values it finds invalid (a DA of 00000000),
        # then writes them as they are, as this module does.
        warnings.simplefilter("ignore")
        expected = responses._encode_with_pydicom(elements, syntax)
    assert direct is not None
    assert direct == expected


def test_identifier_reads_back_with_pydicom() -> None:
    elements = [
        Element(0x00100010, "PN", "Müller^Jürgen"),
        Element(0x0020000D, "UI", "1.2.3"),
        Element(0x00081111, "SQ", None),
        Element(0x00080005, "CS", "ISO_IR 100"),
    ]

    encoded = encode_identifier(elements, "ISO_IR 100", ExplicitVRLittleEndian)

    dataset = read_dataset(
        BytesIO(encoded), is_implicit_VR=False, is_little_endian=True
    )
    dataset.decode()
    assert str(dataset.PatientName) == "Müller^Jürgen"
    assert dataset.StudyInstanceUID == "1.2.3"
    assert len(dataset[0x00081111].value) == 0


@pytest.mark.parametrize(
    ("element", "charset"),
    [
        (Element(0x00280010, "US", "512"), None),  # a binary VR
        (Element(0x00100010, "PN", "山田^太郎"), "ISO 2022 IR 87"),
        (Element(0x00080060, "CS", "CTÄ"), "ISO_IR 100"),  # outside the repertoire
        (Element(0x00280106, "US or SS", None), None),  # an ambiguous VR
    ],
    ids=["binary", "iso-2022", "cs-not-ascii", "ambiguous-vr"],
)
def test_other_cases_go_through_pydicom(element: Element, charset: str | None) -> None:
    assert responses._encode_directly([element], charset, implicit=False) is None


def test_binary_value_is_encoded_by_pydicom() -> None:
    encoded = encode_identifier(
        [Element(0x00280010, "US", "512")], None, ExplicitVRLittleEndian
    )

    assert encoded == b"\x28\x00\x10\x00US\x02\x00\x00\x02"


@pytest.mark.parametrize(
    ("status", "has_identifier", "comment"),
    [
        (0xFF00, True, ""),
        (0x0000, False, ""),
        (0xFE00, False, ""),
        (0xA900, False, "QueryRetrieveLevel 'X' is not one of STUDY"),
        (
            0xC000,
            False,
            "a back\\slash, ümlaut and more than sixty-four characters in all",
        ),
    ],
)
def test_command_set_equals_pynetdicom(
    status: int, has_identifier: bool, comment: str
) -> None:
    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = STUDY_FIND
    primitive.Status = status
    if has_identifier:
        primitive.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    if comment:
        text = comment.encode("ascii", "replace").decode().replace("\\", "/")
        primitive.ErrorComment = text[:64]
    message = C_FIND_RSP()
    message.primitive_to_message(primitive)

    ours = command_set(STUDY_FIND, 7, status, has_identifier, comment)

    assert ours == encode(message.command_set, True, True)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "message_id"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1", 1),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.44", 65535),
    ],
)
def test_store_command_set_equals_pynetdicom(
    sop_class: str, sop_instance: str, message_id: int
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)

    ours = responses.store_command_set(sop_class, message_id, 0x0000, sop_instance)

    assert ours == encode(message.command_set, True, True)


def _pdv_items(primitive) -> list[tuple[int, bytes]]:
    return list(primitive.presentation_data_value_list)


@pytest.mark.parametrize("max_pdu", [0, 16384, 200, 64, 20])
@pytest.mark.parametrize("identifier_size", [0, 10, 150, 5000])
def test_p_data_fits_and_reassembles(max_pdu: int, identifier_size: int) -> None:
    command = command_set(STUDY_FIND, 1, 0xFF00, identifier_size > 0)
    identifier = bytes(range(256)) * (identifier_size // 256) + b"x" * (
        identifier_size % 256
    )

    pdus = list(responses.p_data(5, command, identifier or None, max_pdu))

    parts: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}
    last_seen: dict[int, bool] = {0: False, 1: False}
    for pdu in pdus:
        items = _pdv_items(pdu)
        # each PDV item: length (4), context ID (1), then header and fragment
        size = sum(4 + 1 + len(data) for _context, data in items)
        assert max_pdu == 0 or size <= max_pdu
        for context_id, data in items:
            assert context_id == 5
            header, fragment = data[0], data[1:]
            is_command = header & 0x01
            assert not last_seen[is_command]
            parts[is_command] += fragment
            last_seen[is_command] = bool(header & 0x02)
    assert bytes(parts[1]) == command and last_seen[1]
    assert bytes(parts[0]) == identifier
    assert last_seen[0] == (identifier_size > 0)


def test_small_response_is_one_pdu() -> None:
    command = command_set(STUDY_FIND, 1, 0xFF00, True)

    pdus = list(
        responses.p_data(1, command, b"\x08\x00\x52\x00\x00\x00\x00\x00", 16384)
    )

    assert len(pdus) == 1
    assert [data[0] for _cx, data in _pdv_items(pdus[0])] == [0x03, 0x02]
