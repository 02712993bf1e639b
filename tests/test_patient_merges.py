"""ADT^A40 with several PID/MRG pairs (message structure ADT_A39): every
merge is made, in order, in one transaction; one pair refused and none is.
Sent over MLLP by python-hl7's client to the listener with the real intake
and catalog. All patients, names and IDs are made up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest

from appliance.catalog import replication
from appliance.catalog.query import Query, find
from appliance.catalog.records import patient_key
from appliance.catalog.store import merged_into
from appliance.hl7.adt import MAX_MERGE_PAIRS
from appliance.hl7.listener import ListenerSettings
from tests.hl7_site import Hl7Site, running


def a40(control_id: str, *pairs: tuple[str, str]) -> str:
    """An A40 merging, for each (survivor, retired) pair, the second into
    the first."""
    segments = [
        "MSH|^~\\&|ADT|CITYHOSP|PACS|CITYHOSP|20261205031500||"
        f"ADT^A40^ADT_A39|{control_id}|P|2.5",
        "EVN|A40|20261205031500",
    ]
    for survivor, retired in pairs:
        segments += [f"PID|1||{survivor}^^^^MR||", f"MRG|{retired}^^^^MR"]
    return "\r".join(segments) + "\r"


class Site(Hl7Site):
    def studies(self) -> dict[str, str]:
        """StudyInstanceUID -> the PatientID it is filed under."""
        rows = find(self.catalog, Query("STUDY", {"PatientID": "*"}), _never)
        return {str(r["StudyInstanceUID"]): str(r["PatientID"]) for r in rows}

    def pointer(self, patient_id: str) -> str | None:
        with self.catalog.read() as txn:
            return merged_into(self.catalog, txn, patient_key(patient_id, ""))

    def journal(self) -> list[tuple[str, str]]:
        entries = replication.journal_after(self.catalog, 0)
        return [(e["merged"], e["into"]) for e in entries if e["op"] == "patient-merge"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = ListenerSettings(idle_timeout=5.0)
    with running(tmp_path, settings, Site) as found:
        yield found


def key(patient_id: str) -> str:
    return patient_key(patient_id, "")


def test_two_pairs_are_both_merged(site: Site) -> None:
    a, b, c, d = (site.store(p) for p in ("PAT-A", "PAT-B", "PAT-C", "PAT-D"))

    ack = site.send(a40("T1", ("PAT-A", "PAT-B"), ("PAT-C", "PAT-D")))

    assert str(ack["MSA.F1"]) == "AA"
    assert site.studies() == {a: "PAT-A", b: "PAT-A", c: "PAT-C", d: "PAT-C"}
    assert site.pointer("PAT-B") == key("PAT-A")
    assert site.pointer("PAT-D") == key("PAT-C")


def test_three_pairs_are_merged_in_order(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c, d = (site.store(p) for p in ("PAT-A", "PAT-B", "PAT-C", "PAT-D"))
    # In order: C goes into B, then B (holding C's study) into A, then D
    # into A. Taken in another order, the second pair would find B retired.
    pairs = (("PAT-B", "PAT-C"), ("PAT-A", "PAT-B"), ("PAT-A", "PAT-D"))

    with caplog.at_level(logging.INFO, logger="appliance.patients.intake"):
        ack = site.send(a40("T2", *pairs))

    assert str(ack["MSA.F1"]) == "AA"
    assert site.studies() == {a: "PAT-A", b: "PAT-A", c: "PAT-A", d: "PAT-A"}
    assert site.journal() == [
        (key("PAT-C"), key("PAT-B")),
        (key("PAT-B"), key("PAT-A")),
        (key("PAT-D"), key("PAT-A")),
    ]
    lines = [r for r in caplog.records if r.name == "appliance.patients.intake"]
    assert len(lines) == 1 and lines[0].getMessage().count(" merged") == 3


def test_an_invalid_second_pair_refuses_the_whole_message(site: Site) -> None:
    a, b, c = (site.store(p) for p in ("PAT-A", "PAT-B", "PAT-C"))
    before = site.studies()
    journal = site.journal()

    same = site.send(a40("T3", ("PAT-A", "PAT-B"), ("PAT-C", "PAT-C")))
    empty = site.send(a40("T4", ("PAT-A", "PAT-B"), ("PAT-C", "")))
    retired = site.send(
        a40("T5", ("PAT-A", "PAT-B"), ("PAT-C", "PAT-B"), ("PAT-C", "PAT-A"))
    )
    unpaired = site.send(
        a40("T6", ("PAT-A", "PAT-B")).replace("MRG|", "PID|1||PAT-C\rMRG|")
    )

    assert [str(m["MSA.F1"]) for m in (same, empty, retired, unpaired)] == ["AE"] * 4
    assert location(same) == "MRG^2^1" and "pair 2" in str(same["MSA.F3"])
    assert str(same["ERR.F3.R1.C1"]) == "205"
    assert location(empty) == "MRG^2^1" and "MRG-1" in str(empty["MSA.F3"])
    # Every refusal of a pair after the first says which pair it is.
    assert str(empty["MSA.F3"]).startswith("pair 2: ")
    assert location(retired) == "MRG^2^1"
    assert str(retired["ERR.F3.R1.C1"]) == "204"
    assert location(unpaired) == "PID^1"
    assert site.studies() == before == {a: "PAT-A", b: "PAT-B", c: "PAT-C"}
    assert site.journal() == journal
    assert site.pointer("PAT-B") is None
    # Nothing was remembered either: the corrected message sent again with
    # the same control ID is applied.
    fixed = site.send(a40("T3", ("PAT-A", "PAT-B"), ("PAT-C", "PAT-D")))
    assert str(fixed["MSA.F1"]) == "AA"
    assert site.studies() == {a: "PAT-A", b: "PAT-A", c: "PAT-C"}


def location(ack: hl7.Message) -> str:
    """ERR-2, whole (python-hl7's accessor gives its first component)."""
    return str(ack.segment("ERR")(2))


def _never() -> bool:
    return False


def test_an_a40_with_too_many_pairs_is_refused_at_once(site: Site) -> None:
    a = site.store("PAT-A")
    pairs = [(f"PAT-N{n}", f"PAT-O{n}") for n in range(1500)]
    pairs[0] = ("PAT-Z", "PAT-A")

    started = time.monotonic()
    too_many = site.send(a40("T7", *pairs))
    took = time.monotonic() - started
    allowed = site.send(a40("T8", *pairs[:MAX_MERGE_PAIRS]))

    # Reading 1,500 pairs took about a minute of a core (3,000: four).
    assert took < 5
    assert str(too_many["MSA.F1"]) == "AE" and str(too_many["ERR.F3.R1.C1"]) == "100"
    assert location(too_many) == f"PID^{MAX_MERGE_PAIRS + 1}"
    assert "1500 PID/MRG pairs" in str(too_many["MSA.F3"])
    assert str(allowed["MSA.F1"]) == "AA"
    assert site.studies() == {a: "PAT-Z"}
