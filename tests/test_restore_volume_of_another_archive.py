"""A volume of another archive loaded under the label of one of this
archive's (the wrong cartridge, the wrong disk), its packs numbered as
this archive's: the restore asks whether it is this archive's volume and
exits 1, where it took the packs for copies, left them aside and
reported success without what the right volume held."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests import test_restore_volumes as volume_tests
from tests.test_restore_volumes import MB, Site, _Origin

# The lost appliance of the volume tests and the new one, reused here.
disaster = volume_tests.disaster
site = volume_tests.site


def another_archives_volume(folder: Path, label: str) -> Path:
    """A volume labelled ``label`` written by another appliance, with its
    own master key."""
    folder.mkdir(parents=True)
    other = _Origin(folder)
    for each in ("L1", "L2"):
        other.library.label(each, 50 * MB)
    uids = other.store("other", 2, patient_id="OTHER-1", patient_name="Roe^Other")
    other.copy(other.study_of(uids), label)
    other.ingest.close()
    other.catalog.close()
    return other.volumes / label


def test_a_volume_none_of_whose_packs_open_is_named(
    site: Site,
    tmp_path: Path,
) -> None:
    wrong = another_archives_volume(tmp_path / "other", "L2")
    shutil.rmtree(site.volumes / "L2")
    shutil.copytree(wrong, site.volumes / "L2")

    done = site.restore()

    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if "volume L2" in line]
    assert any("this archive's volume?" in line for line in said), done.stderr
    missing = site.report()["missing"]
    assert any(problem["pack_id"].endswith("on L2") for problem in missing)
