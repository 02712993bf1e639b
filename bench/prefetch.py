"""Prefetch: a day of appointments against a catalog of 100,000 studies.

Fills a catalog directly (``query.py``'s ``fill``: one instance per study,
about 2.5 studies per patient, modalities CT, MR, CR, US, OT), then:

1. **HL7 intake.** 2,000 SIU^S12 bookings for tomorrow, for patients that
   have studies, sent over ``--connections`` (4) MLLP connections with
   python-hl7's asyncio client, each message waiting for its ACK. Once to
   the appliance's listener (each appointment committed to the catalog
   before the ACK) and once to python-hl7's own asyncio MLLP server
   answering AA at once without recording anything, the reference. Prints
   messages per second for both and the ratio.
2. **Planning.** One ``Planner.plan()`` over those appointments: choosing
   up to 3 priors each among the patient's studies (of any modality and
   age, so that the model below has a full queue) and pinning them.
   Prints the time and the priors chosen.
3. **Recall order when recall throughput is the limit.** A model, not a
   measurement: every prior chosen is taken to be offline, on one of
   ``--volumes`` tape volumes (by a hash of its UID), of a size typical
   for its modality (CT 300 MB, MR 150 MB, US 50 MB, CR 20 MB, OT 10 MB),
   recalled at ``--rate`` MB/s with ``--mount`` seconds for each change of
   volume, starting at 18:00 the day before. It prints the share of
   priors online before their deadline (appointment minus 2 h) in the
   planner's order (earliest deadline first, then the same volume) and in
   the order the bookings arrived, the reference, and the ratio.

Usage: ``.venv/bin/python bench/prefetch.py [--studies 100000]
[--appointments 2000]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import hl7
from common import LOOPBACK, exit_on_sigterm, print_table
from hl7.mllp import open_hl7_connection, start_hl7_server
from query import SEED, fill

from appliance import config as configuration
from appliance.catalog.store import Catalog
from appliance.hl7.listener import Listener, ListenerSettings, bind
from appliance.hsm.recall import Recaller
from appliance.prefetch.intake import Intake
from appliance.prefetch.planner import Plan, Planner, _grouped

SIZES_MB = {"CT": 300, "MR": 150, "US": 50, "CR": 20, "OT": 10}
DAY = 86400.0


def bookings(catalog: Catalog, count: int, tomorrow: float) -> list[bytes]:
    """SIU^S12 messages for ``count`` patients that have studies, between
    07:00 and 19:00 tomorrow, in a shuffled order of arrival."""
    rng = random.Random(SEED)
    with catalog.read() as txn:
        patients = sorted(
            {
                bytes(key).decode().partition("\x00")[0]
                for key, _value in txn.cursor(db=catalog.db["idx.study.patient"])
            }
        )
    chosen = rng.sample(patients, min(count, len(patients)))
    messages = []
    for number, patient in enumerate(chosen):
        start = tomorrow + 7 * 3600 + rng.randrange(12 * 60) * 60
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(start))
        modality = rng.choice(tuple(SIZES_MB))
        messages.append(
            "\r".join(
                (
                    "MSH|^~\\&|RIS|BENCH|PACS|BENCH|20270101000000||SIU^S12"
                    f"|B{number:06d}|P|2.5",
                    f"SCH|A{number:06d}||||||||30|min|^^30^{stamp}",
                    f"PID|1||{patient}^^^||Bench^Patient",
                    f"AIS|1||{modality}EXAM^{modality} exam",
                )
            ).encode()
        )
    return messages


async def send_all(
    address: tuple[str, int], messages: list[bytes], lanes: int
) -> float:
    """Send the messages over ``lanes`` connections, each message waiting
    for its ACK; the seconds it took. Every ACK must be AA."""

    async def lane(share: list[bytes]) -> None:
        reader, writer = await open_hl7_connection(*address)
        for raw in share:
            writer.writemessage(hl7.parse(raw.decode()))
            await writer.drain()
            ack = await reader.readmessage()
            if str(ack["MSA.F1"]) != "AA":
                raise RuntimeError(f"refused: {ack}")
        writer.close()
        await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(lane(messages[i::lanes]) for i in range(lanes)))
    return time.perf_counter() - started


def reference_rate(messages: list[bytes], lanes: int) -> float:
    """python-hl7's own MLLP server answering AA at once, nothing recorded."""

    async def answer(reader, writer):  # type: ignore[no-untyped-def]
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def run() -> float:
        server = await start_hl7_server(answer, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await send_all((LOOPBACK, port), messages, lanes)

    return len(messages) / asyncio.run(run())


def appliance_rate(catalog: Catalog, messages: list[bytes], lanes: int) -> float:
    listener = Listener(bind(LOOPBACK, 0), Intake(catalog), ListenerSettings())
    listener.start()
    try:
        return len(messages) / asyncio.run(send_all(listener.address, messages, lanes))
    finally:
        listener.stop()


def plan_time(catalog: Catalog, now: float) -> tuple[float, list[Plan]]:
    # Any modality and any age (the filled studies span 25 years): every
    # patient's latest studies, so that the model below has a full queue.
    overrides = {"prefetch.match": "any", "prefetch.max_prior_years": 30.0}
    config = configuration.load(None, overrides)
    # plan() chooses and pins; it never recalls, so no tiers are needed.
    no_recaller = cast(Recaller, None)
    planner = Planner(catalog, no_recaller, config=config, clock=lambda: now)
    started = time.perf_counter()
    plans = planner.plan()
    return time.perf_counter() - started, plans


def modelled_share(
    catalog: Catalog,
    plans: list[Plan],
    order: Callable[[list[tuple[Plan, object]]], list[tuple[Plan, object]]],
    start: float,
    rate_mb: float,
    mount_seconds: float,
) -> float:
    """Share of priors online by their deadline if recalled in ``order``."""
    modality = _modalities(catalog, plans)
    waiting = [(plan, prior) for plan in plans for prior in plan.priors]
    clock, mounted, on_time, done = start, None, 0, set()
    for plan, prior in order(waiting):  # type: ignore[arg-type]
        study = prior.study_uid  # type: ignore[attr-defined]
        if study in done:
            on_time += clock <= plan.deadline
            continue
        volume = volume_of(study)
        if volume != mounted:
            clock += mount_seconds
            mounted = volume
        clock += SIZES_MB.get(modality.get(study, "OT"), 10) / rate_mb
        done.add(study)
        on_time += clock <= plan.deadline
    return on_time / max(1, len(waiting))


def _modalities(catalog: Catalog, plans: list[Plan]) -> dict[str, str]:
    found = {}
    with catalog.read() as txn:
        for plan in plans:
            for prior in plan.priors:
                study = catalog.get(txn, "studies", prior.study_uid) or {}
                found[prior.study_uid] = (study.get("modalities") or ["OT"])[0]
    return found


def volume_of(study_uid: str) -> int:
    """The modelled tape volume of a prior."""
    return int(hashlib.sha256(study_uid.encode()).hexdigest(), 16) % ARGS.volumes


def planner_order(waiting: list) -> list:  # type: ignore[type-arg]
    """The planner's own order: earliest deadline, then the same volume."""
    waiting = sorted(waiting, key=lambda item: (item[0].deadline, item[1].study_uid))
    sources = {
        prior.study_uid: f"offline {volume_of(prior.study_uid)}"
        for _p, prior in waiting
    }
    return _grouped(waiting, sources)


def arrival_order(waiting: list) -> list:  # type: ignore[type-arg]
    """The order the bookings arrived in (their IDs count up)."""
    return sorted(waiting, key=lambda item: item[0].appointment_id)


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--appointments", type=int, default=2_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rate", type=float, default=80.0, help="recall MB/s")
    parser.add_argument("--mount", type=float, default=120.0, help="s per volume")
    parser.add_argument("--volumes", type=int, default=200)
    global ARGS
    ARGS = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prefetch-"))
    try:
        started = time.perf_counter()
        fill(work / "catalog", ARGS.studies)
        filled = time.perf_counter() - started
        print(f"catalog of {ARGS.studies} studies filled in {filled:.0f} s")
        catalog = Catalog(work / "catalog")
        try:
            run(catalog)
        finally:
            catalog.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(catalog: Catalog) -> None:
    midnight = time.mktime((*time.localtime()[:3], 0, 0, 0, 0, 0, -1))
    tomorrow = midnight + DAY
    messages = bookings(catalog, ARGS.appointments, tomorrow)

    reference = reference_rate(messages, ARGS.connections)
    ours = appliance_rate(catalog, messages, ARGS.connections)
    print_table(
        ["HL7 intake", "messages/s", "vs reference"],
        [
            ["python-hl7 server, AA at once (reference)", f"{reference:.0f}", "1.00"],
            [
                "appliance (recorded before the ACK)",
                f"{ours:.0f}",
                f"{ours / reference:.2f}",
            ],
        ],
    )

    seconds, plans = plan_time(catalog, midnight + 18 * 3600)
    priors = sum(len(plan.priors) for plan in plans)
    print(
        f"planning: {len(plans)} appointments, {priors} priors chosen and pinned "
        f"in {seconds:.2f} s"
    )

    start = midnight + 18 * 3600
    args = (start, ARGS.rate, ARGS.mount)
    fifo = modelled_share(catalog, plans, arrival_order, *args)
    edf = modelled_share(catalog, plans, planner_order, *args)
    print_table(
        ["recall order (model)", "priors online before deadline", "vs reference"],
        [
            ["as the bookings arrived (reference)", f"{fifo:.1%}", "1.00"],
            [
                "planner: deadline, then same volume",
                f"{edf:.1%}",
                f"{edf / max(fifo, 1e-9):.2f}",
            ],
        ],
    )


ARGS = argparse.Namespace()

if __name__ == "__main__":
    main()
