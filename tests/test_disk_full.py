"""A full online tier: stores are refused with 0xA700 and nothing is lost.

Needs a small file system of its own: a tmpfs mounted by the test (root
only). Elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import datasets
from tests import dicom_client as client
from tests.conftest import incoming_files

INSTANCE_BYTES = 1_000_000


@pytest.fixture
def small_tier(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the online tier needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("reserved", [3_000_000, 0])
def test_full_online_tier_refuses_and_keeps_what_it_has(
    appliance_factory, tmp_path, small_tier, reserved
):
    appliance = appliance_factory(
        settings={
            "storage": {
                "online_path": str(small_tier),
                "reserved_bytes": reserved,
            }
        }
    )
    appliance.start()
    paths = datasets.study_files(
        tmp_path / "big", "full", 16, pixel_bytes=INSTANCE_BYTES
    )

    statuses = client.store_files(appliance.port, paths)
    stored = [path for path, status in statuses.items() if status == 0]
    refused = [path for path, status in statuses.items() if status != 0]
    assert stored and refused
    if reserved:
        # With a reserve, the tier never fills: every refusal is a clean 0xA700.
        assert {statuses[path] for path in refused} == {0xA700}
        assert "no room" in appliance.log() or "reserved" in appliance.log()
    else:
        # Filled to the last byte: the store in flight fails (0xA700 or an
        # aborted association), never a false success.
        assert {statuses[path] for path in refused} <= {0xA700, 0x0110, None}

    # Everything answered with success is there and intact; nothing else is.
    assert appliance.status()["instances"] == len(stored)
    online = small_tier
    assert len(list((online / "objects").rglob("*.dcm"))) == len(stored)
    assert not incoming_files(online)
    uids = [str(client.file_meta(path).MediaStorageSOPInstanceUID) for path in stored]
    identifier = client.study_identifier("IMAGE", SOPInstanceUID="\\".join(uids))
    got, responses = client.get(
        appliance.port,
        identifier,
        [(datasets.CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])],
    )
    assert int(responses[-1].Status) == 0
    for path in stored:
        uid = str(client.file_meta(path).MediaStorageSOPInstanceUID)
        assert got[uid] == client.dataset_bytes(path)

    # The service is still up and answers.
    assert client.echo(appliance.port) == 0
