"""C-FIND latency on a catalog of 100,000 studies.

Fills a catalog directly (``Catalog.record``, no network, one instance per
study, about 2.5 studies per patient), starts ``appliance serve`` on it and,
over one association from a pynetdicom client, runs STUDY-level Study Root
C-FIND queries of three kinds, in shuffled order (then all of them again over
a second association whose client socket has TCP_NODELAY):

* ``patient_id``: PatientID of a stored patient (about 2.5 matches);
* ``name_prefix``: a stored surname followed by ``*``, like ``SMITH*``
  (surnames are three made-up syllables, about 12 matches);
* ``date_range``: a StudyDate range of ``--date-span`` days (3 by default,
  about 33 matches).

Each round trip runs from sending the request to the final response. The
number of matches of every query is checked against what was filled.

Two clients send the same queries. DCMTK's ``findscu`` (with
``TCP_NODELAY=1``) sends them all over one association, one query file
each; its log, with microsecond timestamps, gives each round trip. The
pynetdicom client runs them twice, with Nagle's algorithm on and off. The
pynetdicom client spends about 0.6 ms of its own CPU decoding each response
(measured against a server that answers from prepared data sets), so with
30 matches its round trip cannot get under 20 ms whatever the server does;
``findscu`` shows what the appliance itself takes.

Usage: ``.venv/bin/python bench/query.py [--studies 100000] [--queries 200]``
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    LOOPBACK,
    Servers,
    dcmtk_env,
    exit_on_sigterm,
    free_port,
    percentile,
    print_table,
    start_appliance,
)
from dataset import made_up_given_name, made_up_surname, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from appliance.catalog.records import Copy, InstanceRecord, NewInstance, patient_key
from appliance.catalog.store import Catalog

SEED = 7
TARGET_MEDIAN_MS = 20.0
FIRST_DAY = datetime.date(2000, 1, 1)
DAYS = 25 * 365
BATCH = 2000
WARM_UP = 20
RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)


@dataclass
class Truth:
    """What was filled, to pick query values and check the answers."""

    studies_by_patient: Counter[str] = field(default_factory=Counter)
    studies_by_surname: Counter[str] = field(default_factory=Counter)
    studies_by_date: Counter[str] = field(default_factory=Counter)


@dataclass
class Patient:
    """A made-up patient: ID, name, birth date and sex."""

    patient_id: str
    name: str
    birth_date: str
    sex: str


# -- filling the catalog -------------------------------------------------------


def make_patients(rng: random.Random, count: int) -> list[Patient]:
    """``count`` made-up patients with three-syllable surnames."""
    patients = []
    for index in range(count):
        name = f"{made_up_surname(rng, 3)}^{made_up_given_name(rng)}"
        birth = FIRST_DAY - datetime.timedelta(days=rng.randrange(80 * 365))
        patients.append(
            Patient(f"QP{index:07d}", name, birth.strftime("%Y%m%d"), rng.choice("MF"))
        )
    return patients


def new_instance(rng: random.Random, patient: Patient, index: int) -> NewInstance:
    """The one instance of study number ``index``, ready for Catalog.record."""
    study_uid = uid("query", SEED, "study", index)
    sop_uid = uid(study_uid, "instance")
    day = FIRST_DAY + datetime.timedelta(days=rng.randrange(DAYS))
    digest = hashlib.sha256(sop_uid.encode()).hexdigest()
    record = InstanceRecord(
        sop_instance_uid=sop_uid,
        series_uid=uid(study_uid, "series"),
        study_uid=study_uid,
        patient=patient_key(patient.patient_id, ""),
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10_000,
        sha256=digest,
        content_sha256=digest,
        received=time.time(),
        attributes={
            "SOPInstanceUID": sop_uid,
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
            "InstanceNumber": "1",
        },
        copies=[Copy("online", digest[:32])],
    )
    return NewInstance(
        record=record,
        patient={
            "PatientName": patient.name,
            "PatientID": patient.patient_id,
            "PatientBirthDate": patient.birth_date,
            "PatientSex": patient.sex,
        },
        study={
            "StudyInstanceUID": study_uid,
            "StudyDate": day.strftime("%Y%m%d"),
            "StudyTime": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}00",
            "AccessionNumber": f"QA{index:08d}",
            "StudyID": str(index % 10_000),
            "StudyDescription": "BENCH QUERY STUDY",
        },
        series={
            "SeriesInstanceUID": uid(study_uid, "series"),
            "Modality": rng.choice(("CT", "MR", "CR", "US", "OT")),
            "SeriesNumber": "1",
        },
    )


def made_up_studies(studies: int) -> Iterator[NewInstance]:
    """The ``studies`` one-instance studies that :func:`fill` records, in order:
    the same seed always gives the same studies."""
    rng = random.Random(SEED)
    patients = make_patients(rng, max(1, studies * 2 // 5))
    for index in range(studies):
        yield new_instance(rng, rng.choice(patients), index)


def fill(catalog_path: Path, studies: int) -> Truth:
    """Record ``studies`` one-instance studies, in batches of one transaction."""
    truth = Truth()
    catalog = Catalog(catalog_path)
    try:
        batch: list[NewInstance] = []
        for item in made_up_studies(studies):
            remember(truth, item)
            batch.append(item)
            if len(batch) == BATCH:
                _record(catalog, batch)
                batch = []
        if batch:
            _record(catalog, batch)
    finally:
        catalog.close()
    return truth


def remember(truth: Truth, item: NewInstance) -> None:
    """Count ``item``'s study under its patient, surname and date."""
    truth.studies_by_patient[item.patient["PatientID"]] += 1
    truth.studies_by_surname[item.patient["PatientName"].split("^")[0]] += 1
    truth.studies_by_date[item.study["StudyDate"]] += 1


def _record(catalog: Catalog, batch: list[NewInstance]) -> None:
    results = catalog.record(batch, "refuse")
    refused = [r for r in results if r.outcome.value != "stored"]
    if refused:
        raise RuntimeError(f"{len(refused)} record(s) not stored: {refused[0]}")


# -- queries -----------------------------------------------------------------------


@dataclass
class Query:
    """One C-FIND to send and the number of matches it must give."""

    kind: str
    keys: dict[str, str]
    expected: int


def make_queries(
    truth: Truth, per_kind: int, span_days: int, rng: random.Random
) -> list[Query]:
    """``per_kind`` queries of each kind, with values that exist, shuffled."""
    patient_ids = sorted(truth.studies_by_patient)
    surnames = sorted(truth.studies_by_surname)
    queries = []
    for _ in range(per_kind):
        patient_id = rng.choice(patient_ids)
        expected = truth.studies_by_patient[patient_id]
        queries.append(Query("patient_id", {"PatientID": patient_id}, expected))

        surname = rng.choice(surnames)
        expected = truth.studies_by_surname[surname]
        queries.append(Query("name_prefix", {"PatientName": f"{surname}*"}, expected))

        queries.append(date_query(truth, span_days, rng))
    rng.shuffle(queries)
    return queries


def date_query(truth: Truth, span_days: int, rng: random.Random) -> Query:
    """A StudyDate range of ``span_days`` days, starting on a random day."""
    first = FIRST_DAY + datetime.timedelta(days=rng.randrange(DAYS - span_days))
    days = [first + datetime.timedelta(days=n) for n in range(span_days)]
    dates = [day.strftime("%Y%m%d") for day in days]
    expected = sum(truth.studies_by_date[date] for date in dates)
    return Query("date_range", {"StudyDate": f"{dates[0]}-{dates[-1]}"}, expected)


def identifier(query: Query) -> Dataset:
    """The C-FIND identifier: the query's keys plus empty return keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", *RETURN_KEYS):
        setattr(ds, keyword, "")
    for keyword, value in query.keys.items():
        setattr(ds, keyword, value)
    return ds


def round_trip(assoc: Association, query: Query) -> tuple[float, int, int]:
    """Send one C-FIND; (seconds, matches, final status)."""
    matches, final = 0, -1
    started = time.perf_counter()
    responses = assoc.send_c_find(
        identifier(query), StudyRootQueryRetrieveInformationModelFind
    )
    for status, _identifier in responses:
        code = int(status.Status) if "Status" in status else -1
        if code in (0xFF00, 0xFF01):
            matches += 1
        else:
            final = code
    return time.perf_counter() - started, matches, final


def run_queries(
    port: int, queries: list[Query], nodelay: bool
) -> dict[str, list[float]]:
    """Every query over one association; round trips (ms) per kind.

    pynetdicom leaves Nagle's algorithm on; with ``nodelay`` the client's
    socket gets TCP_NODELAY, as DCMTK tools do when TCP_NODELAY=1 is set.
    """
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(LOOPBACK, port, ae_title="APPLIANCE")
    if not assoc.is_established:
        raise RuntimeError("the appliance did not accept the association")
    if nodelay:
        client_socket = assoc.dul.socket.socket
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    times: dict[str, list[float]] = defaultdict(list)
    problems = 0
    try:
        for position, query in enumerate(queries):
            seconds, matches, final = round_trip(assoc, query)
            if final != 0 or matches != query.expected:
                problems += 1
                if problems <= 5:
                    print(
                        f"  ! {query.kind} {query.keys}: status 0x{final:04X}, "
                        f"{matches} matches, {query.expected} expected"
                    )
            if position >= WARM_UP:
                times[query.kind].append(seconds * 1000)
    finally:
        assoc.release()
    flag = "with" if nodelay else "without"
    print(
        f"client {flag} TCP_NODELAY: {len(queries)} queries, "
        f"{problems} with a wrong answer or status"
    )
    return times


# DCMTK's log with microsecond timestamps, one line per message, no data sets.
FINDSCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %m%n
log4cplus.logger.dcmtk.dcmnet.responses = WARN
"""


def run_findscu(
    port: int, queries: list[Query], folder: Path
) -> dict[str, list[float]]:
    """Every query over one ``findscu`` association; round trips (ms) per kind."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [_query_file(folder / f"q{n:05d}.dcm", q) for n, q in enumerate(queries)]
    config = folder / "logger.cfg"
    config.write_text(FINDSCU_LOG_CONFIG)
    command = ["findscu", "-lc", str(config), "-S", "-aec", "APPLIANCE"]
    command += [LOOPBACK, str(port), *map(str, files)]
    done = subprocess.run(
        command, env=dcmtk_env(nodelay=True), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"findscu failed: {done.stderr.strip()[-500:]}")

    results = _findscu_round_trips(done.stdout)
    if len(results) != len(queries):
        raise RuntimeError(f"findscu answered {len(results)} of {len(queries)}")
    times: dict[str, list[float]] = defaultdict(list)
    problems = 0
    for position, (query, (ms, matches, final)) in enumerate(
        zip(queries, results, strict=True)
    ):
        if final != "Success" or matches != query.expected:
            problems += 1
        if position >= WARM_UP:
            times[query.kind].append(ms)
    print(f"findscu: {len(queries)} queries, {problems} with a wrong answer or status")
    return times


def _query_file(path: Path, query: Query) -> Path:
    dataset = identifier(query)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=False)
    return path


def _findscu_round_trips(log: str) -> list[tuple[float, int, str]]:
    """(ms, matches, final status) per query, from findscu's log."""
    results = []
    started, matches = 0.0, 0
    for line in log.splitlines():
        stamp, _, message = line.partition(" ")
        if message.startswith("Sending Find Request"):
            started, matches = _seconds(stamp), 0
        elif message.startswith("Received Find Response"):
            matches += 1
        elif message.startswith("Received Final Find Response"):
            elapsed = (_seconds(stamp) - started) % 86400
            final = message.rpartition("(")[2].rstrip(")")
            results.append((elapsed * 1000, matches, final))
    return results


def _seconds(stamp: str) -> float:
    """Seconds since midnight of a ``HH:MM:SS.mmm.uuu`` log timestamp."""
    clock, milli, micro = stamp.split(".")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return hours * 3600 + minutes * 60 + seconds + int(milli) / 1e3 + int(micro) / 1e6


# -- report ------------------------------------------------------------------------


def print_results(
    timings: dict[str, dict[str, list[float]]], queries: list[Query]
) -> None:
    """Median and p95 round trip per kind and client, against the target."""
    headers = ["query", "client", "n", "matches (mean)", "median ms"]
    headers += ["p95 ms", "max ms", f"median < {TARGET_MEDIAN_MS:.0f} ms"]
    rows = []
    for client, times in timings.items():
        rows += _rows(times, queries, client)
    print()
    print_table(headers, rows)


def _rows(
    times: dict[str, list[float]], queries: list[Query], flag: str
) -> list[list[str]]:
    rows = []
    for kind, values in sorted(times.items()):
        expected = [q.expected for q in queries if q.kind == kind]
        median = statistics.median(values)
        rows.append(
            [
                kind,
                flag,
                str(len(values)),
                f"{statistics.mean(expected):.1f}",
                f"{median:.1f}",
                f"{percentile(values, 0.95):.1f}",
                f"{max(values):.1f}",
                "yes" if median < TARGET_MEDIAN_MS else "NO",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="per kind")
    parser.add_argument("--date-span", type=int, default=3, help="days")
    args = parser.parse_args()
    exit_on_sigterm()

    root = Path(tempfile.mkdtemp(prefix="bench-query-"))
    try:
        started = time.perf_counter()
        truth = fill(root / "data" / "catalog", args.studies)
        print(f"filled {args.studies} studies in {time.perf_counter() - started:.0f} s")

        queries = make_queries(truth, args.queries, args.date_span, random.Random(1))
        with Servers() as servers:
            port = free_port()
            server = start_appliance(servers, root / "data", port)
            timings = {
                "findscu (nodelay)": run_findscu(port, queries, root / "findscu"),
                "pynetdicom": run_queries(port, queries, False),
                "pynetdicom (nodelay)": run_queries(port, queries, True),
            }
            servers.stop(server)
        print_results(timings, queries)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
