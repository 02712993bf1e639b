"""Made-up HL7 v2 scheduling messages for the tests: no real patient."""

from __future__ import annotations


def siu(
    event: str = "S12",
    control_id: str = "MSG0001",
    appointment: str = "APT1001",
    patient: str = "PAT-0042^^^CITYHOSP^MR",
    sch11: str = "^^30^20270115093000",
    tq1: str | None = None,
    ais: str = "AIS|1||CTHEAD^CT head without contrast^LOCAL|20270115093000",
) -> str:
    segments = [
        f"MSH|^~\\&|RIS|CITYHOSP|PACS|CITYHOSP|20261204101500||SIU^{event}^SIU_S12"
        f"|{control_id}|P|2.5",
        f"SCH|{appointment}^RIS||||||||30|min|{sch11}",
    ]
    if tq1 is not None:
        segments.append(f"TQ1|1||||||{tq1}")
    segments += [
        f"PID|1||{patient}||Testperson^Alma^^^^^L||19700101|F",
        "RGS|1",
        ais,
    ]
    return "\r".join(segments) + "\r"


def orm(
    control: str = "NW",
    control_id: str = "MSG2001",
    order: str = "ORD5001",
    patient: str = "PAT-0042^^^CITYHOSP^MR",
    when: str = "20270116140000",
    modality: str = "MR",
    accession: str = "ACC7001",
) -> str:
    return (
        "\r".join(
            (
                "MSH|^~\\&|RIS|CITYHOSP|PACS|CITYHOSP|20261204101500||ORM^O01"
                f"|{control_id}|P|2.3",
                f"PID|1||{patient}||Testperson^Alma||19700101|F",
                "PV1|1|O",
                f"ORC|{control}|{order}^RIS|||||^^^{when}",
                f"OBR|1|{order}^RIS||MRBRAIN^MR brain^LOCAL||||||||||||||"
                f"{accession}|RP{order}|||||{modality}|||^^^{when}",
            )
        )
        + "\r"
    )


def omi(
    control: str = "NW",
    control_id: str = "MSG3001",
    order: str = "ORD6001",
    when: str = "20270117080000+0100",
) -> str:
    return (
        "\r".join(
            (
                "MSH|^~\\&|RIS|CITYHOSP|PACS|CITYHOSP|20261204101500||OMI^O23^OMI_O23"
                f"|{control_id}|P|2.5",
                "PID|1||PAT-0077^^^CITYHOSP^MR||Sample^Bruno||19650505|M",
                f"ORC|{control}|{order}^RIS",
                f"TQ1|1||||||{when}",
                f"OBR|1|{order}^RIS||XRCHEST^Chest X-ray^LOCAL",
                "IPC|ACC9001|RP9001|1.2.826.0.1.3680043.9.7433.1.1|SPS9001|CR",
            )
        )
        + "\r"
    )
