"""The ACK of a patient change survives a restore from the mirror.

An appliance takes an A08 (before its catalog snapshot), an A40 and
another A08 (after it, in the journal only) and an SIU over the real
listener with python-hl7's MLLP client, replicates, and is lost. The
appliance restored from the mirror answers the RIS's resend of each ADT
message with the very ACK sent before, and applies nothing again; the
SIU's appointment is not restored, so its resend is applied again. All
patients, names and IDs are made up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hl7.client import MLLPClient

from appliance.catalog import replication
from appliance.catalog.answers import ack_of
from appliance.catalog.records import patient_key
from appliance.catalog.store import Catalog, merged_into
from appliance.hl7.listener import Listener, ListenerSettings, bind
from appliance.prefetch.appointments import appointments
from appliance.prefetch.intake import Intake
from appliance.replication.transports.directory import DirectoryTransport
from appliance.restore.replay import replay_journal
from tests.hl7_samples import siu
from tests.restore_site import Origin, Restored, answers, mirror_settings

ALMA = "PAT-A1"
BRUNO = "PAT-B2"


def adt(event: str, control_id: str, pid3: str, name: str = "", mrg: str = "") -> str:
    structure = {"A08": "ADT_A01", "A40": "ADT_A39"}[event]
    segments = [
        "MSH|^~\\&|ADT|CITYHOSP|PACS|CITYHOSP|20261205031500||"
        f"ADT^{event}^{structure}|{control_id}|P|2.5",
        f"EVN|{event}|20261205031500",
        f"PID|1||{pid3}^^^^MR||{name}",
    ]
    if mrg:
        segments.append(f"MRG|{mrg}^^^^MR")
    return "\r".join(segments) + "\r"


@contextmanager
def listening(catalog: Catalog) -> Iterator[Callable[[str], bytes]]:
    """The HL7 listener with its real intake on ``catalog``; a function
    that sends one message with python-hl7's client and returns the ACK."""
    listener = Listener(
        bind("127.0.0.1", 0), Intake(catalog), ListenerSettings(idle_timeout=5.0)
    )
    listener.start()

    def send(text: str) -> bytes:
        with MLLPClient(*listener.address) as client:
            return bytes(client.send_message(text))

    try:
        yield send
    finally:
        listener.stop()


def test_a_resend_after_a_restore_gets_the_ack_sent_before(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    origin = Origin(tmp_path, DirectoryTransport(mirror), mirror_settings(mirror))
    origin.store("alma", 2, patient_id=ALMA, patient_name="Testperson^Alma")
    origin.store("bruno", 1, patient_id=BRUNO, patient_name="Sample^Bruno")
    origin.replicate()
    messages = {
        "before": adt("A08", "R1", ALMA, "Newname^Alma"),
        "merge": adt("A40", "R2", ALMA, mrg=BRUNO),
        "after": adt("A08", "R3", ALMA, "Latest^Alma"),
    }
    sent = {}
    with listening(origin.catalog) as send:
        sent["before"] = send(messages["before"])
        appointment = send(siu(control_id="S1", patient=f"{ALMA}^^^^MR"))
        origin.replicator.send_snapshot()
        sent["merge"] = send(messages["merge"])
        sent["after"] = send(messages["after"])
    for ack in (*sent.values(), appointment):
        assert b"MSA|AA|" in ack, ack
    _replicate_until_idle(origin)
    escrow = origin.escrow()
    _held, found = origin.lose()

    (tmp_path / "new").mkdir()
    restored = Restored(tmp_path / "new", mirror_settings(mirror), escrow)
    done = restored.restore()
    assert done.returncode == 0, done.stderr

    catalog = restored.catalog()
    try:
        assert answers(catalog) == found
        journal = replication.last_journal_number(catalog)
        with listening(catalog) as send:
            again = {name: send(text) for name, text in messages.items()}
            appointment_again = send(siu(control_id="S1", patient=f"{ALMA}^^^^MR"))
        # The same ACK, byte for byte (its own control ID too): answered,
        # not applied again (an A40 applied again would be refused, AE 204).
        assert again == sent
        assert answers(catalog) == found
        assert replication.last_journal_number(catalog) == journal
        assert next(replication.journal_after(catalog, 0), None) is None
        with catalog.read() as txn:
            pointer = merged_into(catalog, txn, patient_key(BRUNO, ""))
        assert pointer == patient_key(ALMA, "")
        # The appointment was the lost appliance's own: its resend is
        # applied again, with a new ACK.
        assert b"MSA|AA|S1" in appointment_again
        assert appointment_again != appointment
        assert [a.source for a in appointments(catalog)] == ["SIU^S12 S1"]
    finally:
        catalog.close()


def _replicate_until_idle(origin: Origin) -> None:
    """Run the replicator's loop until the journal is on the mirror."""
    stop = threading.Event()
    runner = threading.Thread(target=origin.replicator._run, args=(stop, 0.05))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while replication.mirror_mark(
            origin.catalog, "journal_sent"
        ) != replication.last_journal_number(origin.catalog):
            assert time.monotonic() < deadline, "the journal never reached the mirror"
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(30)


def two_pairs(control_id: str) -> str:
    """An A40 merging two patients the catalog does not hold (two pairs)."""
    pairs = "PID|1||PAT-S1^^^^MR||\rMRG|PAT-R1^^^^MR\r"
    pairs += "PID|1||PAT-S2^^^^MR||\rMRG|PAT-R2^^^^MR\r"
    return adt("A40", control_id, "PAT-S1").partition("PID|")[0] + pairs


def test_the_last_journal_entry_of_a_message_carries_its_ack(
    tmp_path: Path,
) -> None:
    catalog = Catalog(tmp_path / "catalog", 2**26)
    fresh = Catalog(tmp_path / "fresh", 2**26)
    try:
        with listening(catalog) as send:
            merged = send(two_pairs("J1"))
            unchanged = send(adt("A08", "J2", "PAT-NOBODY", "Not^Held"))
        entries = list(replication.journal_after(catalog, 0))

        assert b"MSA|AA|J1" in merged and b"MSA|AA|J2" in unchanged
        # One entry per pair; the last carries the message's ACK. The A08
        # changed nothing: no entry, and its ACK is not journaled.
        assert [e["merged"] for e in entries] == [
            patient_key("PAT-R1", ""),
            patient_key("PAT-R2", ""),
        ]
        assert "hl7" not in entries[0]
        carried = entries[1]["hl7"]
        assert carried["key"] == "ADT^CITYHOSP|J1"
        assert carried["type"] == "ADT^A40"
        # Replayed on a catalog without them, the entries bring the ACK
        # back; those of an older journal, without it, bring none.
        older = [{k: v for k, v in e.items() if k != "hl7"} for e in entries]
        replay_journal(fresh, older)
        assert kept(fresh) == {}
        replay_journal(fresh, entries)
        assert kept(fresh) == {"ADT^CITYHOSP|J1": merged}
        with listening(fresh) as send:
            assert send(two_pairs("J1")) == merged
    finally:
        fresh.close()
        catalog.close()


def kept(catalog: Catalog) -> dict[str, bytes]:
    """The ACKs a catalog remembers, by sender and control ID, as sent."""
    with catalog.read() as txn:
        found = catalog.all_records(txn, "hl7")
        return {key: b"\x0b" + ack_of(data) + b"\x1c\r" for key, data in found}
