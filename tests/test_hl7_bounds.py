"""Values too long for the DICOM attribute they become, and malformed ones,
sent over MLLP by python-hl7's own client to the listener with the real
intake and catalog: each message is answered AE with an ERR naming the
field, leaves one warning line and changes nothing, and the listener goes
on answering. All patients, names and IDs are made up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest

from appliance.catalog.query import Query, find
from appliance.hl7.listener import ListenerSettings
from appliance.prefetch import appointments
from tests.hl7_samples import orm, siu
from tests.hl7_site import Hl7Site, running

ALMA = "PAT-A1"
REFUSALS = "appliance.prefetch.intake"


def adt(event: str, control_id: str, pid3: str, name: str = "") -> str:
    return (
        "MSH|^~\\&|ADT|CITYHOSP|PACS|CITYHOSP|20261205031500||"
        f"ADT^{event}^ADT_A01|{control_id}|P|2.5\r"
        f"EVN|{event}|20261205031500\r"
        f"PID|1||{pid3}||{name}||19700101|F\r"
    )


class Site(Hl7Site):
    def names(self, patient_id: str) -> list[str]:
        query = Query("STUDY", {"PatientID": patient_id})
        return [str(r["PatientName"]) for r in find(self.catalog, query, _never)]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = ListenerSettings(max_message_bytes=8192, idle_timeout=5.0)
    with running(tmp_path, settings, Site) as found:
        yield found


def answer(ack: hl7.Message) -> tuple[str, str, str]:
    """MSA-1, ERR-2 (the location) and ERR-3.1 (the table 0357 code)."""
    err = ack.segment("ERR") if "ERR" in str(ack) else None
    if err is None:
        return str(ack["MSA.F1"]), "", ""
    return str(ack["MSA.F1"]), str(err(2)), str(ack["ERR.F3.R1.C1"])


def test_an_oversize_patient_name_is_refused_and_the_listener_goes_on(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.store("alma", ALMA, "Testperson^Alma")
    longest = "F" * 30 + "^" + "G" * 33  # 64 characters: the most PN takes
    oversize = "F" * 40 + "^" + "G" * 30  # 71

    with caplog.at_level(logging.WARNING, logger=REFUSALS):
        refused = site.send(adt("A08", "L1", ALMA, oversize))
    refusals = [r for r in caplog.records if r.name == REFUSALS]
    names_after_refusal = site.names(ALMA)
    taken = site.send(adt("A08", "L2", ALMA, longest))

    assert answer(refused) == ("AE", "PID^1^5", "102")
    assert "PID-5 is 71 characters long; at most 64" in str(refused["MSA.F3"])
    assert "FFFF" not in str(refused)  # the value itself is not quoted
    assert len(refusals) == 1 and "PID-5" in refusals[0].getMessage()
    assert names_after_refusal == ["Testperson^Alma"]
    assert answer(taken) == ("AA", "", "")
    assert site.names(ALMA) == [longest]


def test_oversize_and_malformed_fields_of_every_kind_change_nothing(
    site: Site,
) -> None:
    site.store("alma", ALMA, "Testperson^Alma")
    cases = {
        "PID^1^3": adt("A08", "M1", "P" * 65, "New^Name"),
        "PID^1^5": adt("A31", "M2", ALMA, "New\\X07\\^Name"),
        "OBR^1^18": orm(control_id="M3", accession="A" * 17),
        "OBR^1^24": orm(control_id="M4", modality="M" * 17),
        "ORC^1^2": orm(control_id="M5", order="O" * 65),
        "SCH^1^1": siu(control_id="M6", appointment="S" * 65),
        "MSH^1^10": siu(control_id="C" * 200),
        "MSH^1^3": siu(control_id="M8").replace("|RIS|", "|" + "R" * 228 + "|"),
    }

    answers = {where: answer(site.send(text)) for where, text in cases.items()}

    assert answers == {where: ("AE", where, "102") for where in cases}
    assert site.names(ALMA) == ["Testperson^Alma"]
    assert appointments.appointments(site.catalog) == []
    assert answer(site.send(orm(control_id="M7")))[0] == "AA"
    assert len(appointments.appointments(site.catalog)) == 1


def test_a_message_over_the_size_cap_is_refused_before_it_is_read(
    site: Site,
) -> None:
    huge = adt("A08", "H1", ALMA, "N" * 10000)

    refused = site.send(huge)

    assert str(refused["MSA.F1"]) == "AR"
    assert "longer than 8192 bytes" in str(refused["MSA.F3"])
    assert answer(site.send(adt("A08", "H2", ALMA, "Short^Name")))[0] == "AA"


def _never() -> bool:
    return False
