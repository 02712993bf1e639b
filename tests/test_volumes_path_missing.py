"""A library folder that ``volumes.path`` names and that does not exist (a
mistyped path, a USB or NFS disk not mounted) is never made: an empty
library there would take packs onto the system disk. Commands say so in one
line naming the key; the default folder, in the data directory, is still
made on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import VolumeError
from appliance.storage.volumes import open_library
from tests.conftest import new_archive


def appliance(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", *args]
    command += ["--config", str(tmp_path / "appliance.toml")]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def unmounted(tmp_path: Path) -> Path:
    """An archive whose configuration names a library folder on a disk
    that is not mounted."""
    new_archive(tmp_path / "data")
    folder = tmp_path / "mnt" / "usb" / "volumes"
    (tmp_path / "appliance.toml").write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[volumes]\npath = "{folder}"\n'
    )
    return folder


def refusal(folder: Path) -> str:
    return (
        f"volumes.path: {folder} does not exist: mount the disk that holds the "
        "volumes there, or create the folder (a folder the configuration "
        "names is never made)"
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ("volumes", "label", "VOL001", "--capacity", "1G"),
            "cannot open the volume library",
        ),
        (("volumes", "list"), "cannot open the volume library"),
        (("migrate", "--now"), "cannot open the tiers"),
    ],
    ids=["label", "list", "migrate"],
)
def test_a_named_library_folder_that_is_missing_is_not_made(
    unmounted: Path, tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    done = appliance(tmp_path, *args)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"{said}: {refusal(unmounted)}"]
    assert not (tmp_path / "mnt").exists()


def test_the_folder_mounted_or_made_is_used(unmounted: Path, tmp_path: Path) -> None:
    assert appliance(tmp_path, "volumes", "list").returncode == 1

    unmounted.mkdir(parents=True)
    labelled = appliance(tmp_path, "volumes", "label", "VOL001", "--capacity", "1G")

    assert labelled.returncode == 0, labelled.stderr
    assert (unmounted / "VOL001" / "VOLUME").is_file()


@pytest.mark.parametrize("kind", ["directory", "optical"])
def test_the_library_is_not_opened_on_a_missing_folder(
    tmp_path: Path, kind: str
) -> None:
    folder = tmp_path / "not-mounted"

    with pytest.raises(VolumeError, match=r"volumes\.path: .* does not exist"):
        open_library(kind, {"path": str(folder)}, make_folder=False)

    assert not folder.exists()
    open_library(kind, {"path": str(folder)})
    assert folder.is_dir()
