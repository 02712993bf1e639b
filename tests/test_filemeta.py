"""The file meta written for a received instance equals pydicom's."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta

from appliance.dicom import filemeta


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.826.0.1.3680043.8.498.1",
            ImplicitVRLittleEndian,
        ),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.44", ExplicitVRLittleEndian),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5.6.7.8.9.10.11.12.13", JPEG2000),
    ],
)
def test_file_meta_bytes_equal_pydicom(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax=syntax,
        ),
    )

    ours = BytesIO()
    filemeta._write(ours, filemeta.FileMeta(sop_class, sop_instance, syntax))

    assert ours.getvalue() == expected.getvalue()


def test_uids_that_are_not_ascii_are_written_by_pydicom() -> None:
    meta = filemeta.FileMeta("1.2.3", "1.2.\u00e94", ImplicitVRLittleEndian)
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid="1.2.3",
            sop_instance_uid="1.2.\u00e94",
            transfer_syntax=ImplicitVRLittleEndian,
        ),
    )

    ours = BytesIO()
    filemeta._write(ours, meta)

    assert ours.getvalue() == expected.getvalue()
