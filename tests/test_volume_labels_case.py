"""Volume labels that differ only by case name one volume: labels are
written by hand on cartridges and discs, and folders, images and registry
files may sit on file systems that ignore case. So a label that differs
only by case from a known volume is never made (labelling, a folder or
image placed in the library, a tape scanned), and a command or API call
given a label in another case acts on the volume as it was labelled."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from appliance.errors import VolumeError
from appliance.storage.volumes.directory import DirectoryLibrary
from appliance.storage.volumes.optical import OpticalLibrary
from appliance.storage.volumes.tape import TapeLibrary
from appliance.storage.volumes.tapefake import FakeChanger, FakeTapeDrive
from tests.admin_site import AdminSite, start_admin_site
from tests.conftest import config_text, new_archive
from tests.test_volumes import BACKENDS, Backend, labelled
from tests.tier_rules import run
from tests.web_site import OPERATOR

MiB = 1 << 20
TWIN = r"vol001 differs only by case from volume VOL001"
TWIN_WORDS = "differs only by case"

needs_xorriso = pytest.mark.skipif(
    shutil.which("xorriso") is None,
    reason="xorriso is not installed (apt-get install xorriso)",
)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "optical" and shutil.which("xorriso") is None:
        pytest.skip("xorriso is not installed (apt-get install xorriso)")
    return BACKENDS[request.param](tmp_path)


# -- labels are made ---------------------------------------------------------------


def test_labelling_a_case_twin_is_refused_and_makes_nothing(backend, tmp_path):
    library = backend.open()
    labelled(backend, library, "VOL001", 64 * MiB)
    backend.add_blank(library, "vol001")
    before = sorted(str(p) for p in tmp_path.rglob("*") if "simulated" not in p.parts)

    with pytest.raises(VolumeError, match=TWIN):
        library.label("vol001", 64 * MiB)

    after = sorted(str(p) for p in tmp_path.rglob("*") if "simulated" not in p.parts)
    assert after == before
    assert [v.label for v in backend.open().list_volumes()] == ["VOL001"]
    # A label that is not a twin is still made.
    labelled(backend, library, "VOL002", 64 * MiB)


def test_a_case_twin_folder_put_in_a_directory_library_is_not_adopted(tmp_path, caplog):
    DirectoryLibrary(tmp_path / "elsewhere").label("vol001", 4 * MiB)
    library = DirectoryLibrary(tmp_path / "library")
    library.label("VOL001", 4 * MiB)
    shutil.move(tmp_path / "elsewhere" / "vol001", tmp_path / "library" / "vol001")

    with caplog.at_level(logging.WARNING):
        listed = library.list_volumes()

    assert [v.label for v in listed] == ["VOL001"]
    assert TWIN_WORDS in caplog.text
    with pytest.raises(VolumeError, match=TWIN):
        library.write_pack("vol001", "p-000001", [b"x"])


def test_a_volume_folder_renamed_by_hand_says_what_name_it_needs(tmp_path, caplog):
    library = DirectoryLibrary(tmp_path / "library")
    library.label("VOL001", 4 * MiB)
    (tmp_path / "library" / "VOL001").rename(tmp_path / "library" / "vol001")

    with caplog.at_level(logging.WARNING):
        listed = library.list_volumes()

    assert [(v.label, v.reachable) for v in listed] == [("VOL001", False)]
    assert "holds volume VOL001, not vol001: rename the folder to VOL001" in caplog.text


@pytest.mark.parametrize("capacity", ["", ', "capacity": "big"', ', "capacity": -7'])
def test_a_folder_whose_label_names_no_capacity_is_not_adopted(
    tmp_path, caplog, capacity: str
) -> None:
    library = DirectoryLibrary(tmp_path / "library")
    library.label("VOL001", 4 * MiB)
    (tmp_path / "library" / "VOL002" / "packs").mkdir(parents=True)
    (tmp_path / "library" / "VOL002" / "VOLUME").write_text(
        '{"format": "pacs-appliance volume 1", "label": "VOL002"' + capacity + "}"
    )

    with caplog.at_level(logging.WARNING):
        listed = library.list_volumes()

    assert [v.label for v in listed] == ["VOL001"]
    assert "VOL002/VOLUME: volume capacity" in caplog.text
    assert "must be a positive integer; folder ignored" in caplog.text


@pytest.mark.parametrize(
    "text", ["[]", '{"label": "VOL001", "capacity": 4194304}', '"VOL001"']
)
def test_a_label_file_edited_into_no_label_is_not_the_volume(tmp_path, text: str):
    library = DirectoryLibrary(tmp_path / "library")
    library.label("VOL001", 4 * MiB)
    (tmp_path / "library" / "VOL001" / "VOLUME").write_text(text)

    assert [(v.label, v.reachable) for v in library.list_volumes()] == [
        ("VOL001", False)
    ]
    with pytest.raises(VolumeError, match="VOLUME is not a volume label file"):
        library.write_pack("VOL001", "p-000001", [b"x"])


@needs_xorriso
def test_a_case_twin_image_put_in_an_optical_library_is_not_adopted(tmp_path, caplog):
    OpticalLibrary(tmp_path / "elsewhere").label("vol001", 4 * MiB)
    library = OpticalLibrary(tmp_path / "discs")
    library.label("VOL001", 4 * MiB)
    shutil.move(tmp_path / "elsewhere" / "vol001.iso", tmp_path / "discs")

    with caplog.at_level(logging.WARNING):
        listed = library.list_volumes()

    assert [v.label for v in listed] == ["VOL001"]
    assert TWIN_WORDS in caplog.text
    with pytest.raises(VolumeError, match=TWIN):
        library.write_pack("vol001", "p-000001", [b"x"])


def test_scanning_a_case_twin_tape_is_refused(tmp_path):
    drive = FakeTapeDrive()
    changer = FakeChanger(tmp_path / "sim", [drive])
    changer.insert_cartridge("VOL001", 8 * MiB)
    changer.insert_cartridge("vol001", 8 * MiB)
    other = TapeLibrary(drive, changer, tmp_path / "other", record_size=65536)
    other.label("vol001", 8 * MiB)
    library = TapeLibrary(drive, changer, tmp_path / "state", record_size=65536)
    library.label("VOL001", 8 * MiB)

    with pytest.raises(VolumeError, match=TWIN):
        library.scan("vol001")

    assert [v.label for v in library.list_volumes()] == ["VOL001"]


# -- labels are looked up ----------------------------------------------------------


def test_tape_commands_take_a_label_in_any_case(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    volumes = {
        "kind": "tape",
        "simulated_path": str(tmp_path / "simulated"),
        "state_path": str(tmp_path / "state"),
        "record_size": 65536,
    }
    storage = {"data_dir": str(tmp_path / "data")}
    config.write_text(config_text({"storage": storage, "volumes": volumes}, []))
    changer = FakeChanger(tmp_path / "simulated", [FakeTapeDrive()])
    changer.insert_cartridge("VOL001", 64 * MiB)
    changer.insert_cartridge("vol001", 64 * MiB)
    new_archive(tmp_path / "data")

    made = run(config, "volumes", "label", "VOL001", "--capacity", "64M")
    twin = run(config, "volumes", "label", "vol001", "--capacity", "64M")
    scanned = run(config, "volumes", "scan", "vol001")
    unloaded = run(config, "volumes", "unloaded", "Vol001")
    exported = run(config, "volumes", "export", "vol001")
    listed = run(config, "volumes", "list").stdout

    assert made.returncode == 0, made.stderr
    assert twin.returncode == 1 and TWIN_WORDS in twin.stderr
    # Scanning registers the tape under the barcode given: a twin too.
    assert scanned.returncode == 1 and TWIN_WORDS in scanned.stderr
    assert unloaded.returncode == 0, unloaded.stderr
    assert "volume VOL001:" in unloaded.stdout
    assert exported.returncode == 0, exported.stderr
    assert "volume VOL001 is ready to leave" in exported.stdout
    assert "VOL001" in listed and "vol001" not in listed


@pytest.fixture
def site(tmp_path: Path):
    (tmp_path / "site").mkdir()
    yield from start_admin_site(tmp_path / "site")


def test_loaded_in_another_case_serves_the_studies_waiting(site: AdminSite) -> None:
    study, shelf = site.shelved_study("VOL001")
    asked = site.cli("recall", study)
    assert asked.returncode == 1 and "waiting for volume VOL001" in asked.stderr
    (shelf / "VOL001").rename(site.volumes / "VOL001")

    twin = site.cli("volumes", "label", "vol001", "--capacity", "1G")
    loaded = site.cli("volumes", "loaded", "vol001")
    verified = site.cli("volumes", "verify", "Vol001")

    assert twin.returncode == 1 and TWIN_WORDS in twin.stderr
    assert not (site.volumes / "vol001").exists()
    assert loaded.returncode == 0, loaded.stderr
    assert "volume VOL001 loaded; 1 waiting study(ies) recalled" in loaded.stdout
    assert "no open requests" in site.cli("volumes", "requests").stdout
    assert verified.returncode == 0, verified.stderr
    assert "volume VOL001: 1 pack(s) read, 0 bad, 0 missing" in verified.stdout


def test_the_admin_api_takes_a_label_in_any_case(site: AdminSite) -> None:
    study, shelf = site.shelved_study("VOL002")
    with site.client(OPERATOR) as client:
        waiting = client.post("/api/recall", json={"study_uid": study})
        (shelf / "VOL002").rename(site.volumes / "VOL002")
        loaded = client.post("/api/volumes/vol002/loaded", json={})
        after = client.get("/api/volumes").json()
        unloaded = client.post("/api/volumes/Vol002/unloaded", json={})

    assert waiting.json()["waiting_for"] == ["VOL002"]
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["volume"] == "VOL002"
    assert [r["ok"] for r in loaded.json()["recalls"]] == [True]
    assert after["requests"] == []
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["volume"] == "VOL002"
