"""The audit records of the archive's own work: scrub repairs and lost
copies, releases and recalls, imports, and HL7 senders refused again and
again."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from appliance.audit.log import AuditLog, Record
from appliance.audit.messages import summarize
from appliance.audit.trail import Trail
from appliance.catalog.store import Catalog
from appliance.hsm.migrator import Migrator
from appliance.hsm.recall import Recaller
from appliance.prefetch.intake import Intake
from tests import test_drills, test_scrub
from tests.conftest import config_text
from tests.datasets import study_files, uid
from tests.hl7_samples import siu
from tests.test_scrub import PACKED, Site, flip_byte

# The scrub tests' archive: two studies online, one packed on nearline,
# both on a directory mirror.
site = test_scrub.site
# Three studies on a directory mirror, a fourth not replicated yet.
origin = test_drills.origin


def audit_records(data_dir: Path, event: str | None = None) -> list[Record]:
    found = AuditLog(data_dir / "audit").records()
    return [r for r in found if event is None or r.event == event]


def test_a_repair_says_what_was_repaired_from_where(site: Site) -> None:
    record = site.records(PACKED)[1]
    flip_byte(site.online_file(record))

    assert site.scrubber().run_tier("online").repaired == 1

    (repaired,) = audit_records(site.config.data_dir, "copy-repaired")
    summary = summarize(repaired.message)
    assert summary.studies == [PACKED]
    assert summary.patients == ["TEST-0001"]
    assert record.sop_instance_uid in summary.description
    assert "repaired from nearline pack" in summary.description
    assert (summary.action, summary.outcome) == ("U", 0)


def test_an_instance_with_no_good_copy_is_a_serious_failure(site: Site) -> None:
    record = site.records(PACKED)[2]
    flip_byte(site.online_file(record))
    pack = site.nearline_pack(PACKED)
    flip_byte(pack, offset=pack.stat().st_size // 2)
    for mirrored in (site.folder / "mirror").rglob("*.pack"):
        with open(mirrored, "r+b") as cut:
            cut.truncate(4096)

    scrubber = site.scrubber()
    scrubber.run_tier("online")
    scrubber.run_tier("nearline")
    scrubber.run_tier("online")  # still lost: not recorded twice

    lost = audit_records(site.config.data_dir, "copies-lost")
    assert len(lost) == 1
    summary = summarize(lost[0].message)
    assert summary.outcome == 8 and summary.studies == [PACKED]
    assert record.sop_instance_uid in summary.description
    assert audit_records(site.config.data_dir, "copy-not-repaired")


def test_release_and_recall_are_recorded(site: Site) -> None:
    assert Migrator(site.catalog, site.tiers, 1).release(PACKED, "online").ok
    assert Recaller(site.catalog, site.tiers).recall(PACKED).ok

    released = audit_records(site.config.data_dir, "study-released")
    recalled = audit_records(site.config.data_dir, "study-recalled")
    assert len(released) == len(recalled) == 1
    for record, action in ((released[0], "D"), (recalled[0], "C")):
        summary = summarize(record.message)
        assert (summary.action, summary.studies) == (action, [PACKED])
    root = ET.fromstring(recalled[0].message)
    sop_class = root.find("ParticipantObjectIdentification/SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == "4"


def test_import_is_recorded_per_study(tmp_path: Path) -> None:
    files = study_files(tmp_path / "cd", "imported", 2, patient_id="IMP-1")
    files += study_files(tmp_path / "cd", "imported-2", 1, patient_id="IMP-2")
    config = tmp_path / "appliance.toml"
    data = tmp_path / "data"
    config.write_text(
        config_text({"storage": {"data_dir": str(data), "reserved_bytes": 0}}, [])
    )
    subprocess.run(
        [
            *(sys.executable, "-m", "appliance", "import", str(tmp_path / "cd")),
            *("--config", str(config)),
        ],
        check=True,
        capture_output=True,
    )
    imported = [summarize(r.message) for r in audit_records(data, "imported")]
    assert sorted(s.patients[0] for s in imported) == ["IMP-1", "IMP-2"]
    assert {s.studies[0] for s in imported} == {
        uid("study", "imported"),
        uid("study", "imported-2"),
    }


def test_an_hl7_sender_refused_again_and_again_is_an_alert(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog", 2**24)
    trail = Trail(tmp_path / "audit", "APPLIANCE")
    intake = Intake(catalog, trail)
    try:
        for n in range(12):
            intake(b"MSH|not really HL7 " + str(n).encode(), "192.0.2.9:4000")
        intake(siu().encode(), "192.0.2.10:4001")  # another host, a good one
    finally:
        catalog.close()
    alerts = [r for r in trail.log.records() if r.event == "security-alert"]
    assert len(alerts) == 1
    summary = summarize(alerts[0].message)
    assert "5 HL7 messages in a row refused from 192.0.2.9" in summary.description
    assert summary.outcome == 4


def test_a_drill_names_its_sample(origin: test_drills.Origin) -> None:
    done = test_drills._drill(origin.config_path, "--studies", "10")
    assert done.returncode == 0, done.stderr

    (drill,) = audit_records(origin.config.data_dir, "drill")
    summary = summarize(drill.message)
    assert sorted(summary.studies) == sorted(
        uid("study", label) for label in ("ct", "mr", "us")
    )
    assert "P2" in summary.patients
    assert summary.outcome == 0 and summary.action == "R"
    assert "7 instance(s) of 3 studies" in summary.description
