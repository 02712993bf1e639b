"""DICOMweb: QIDO-RS study search latency and WADO-RS study retrieve rate.

Runs the appliance's HTTP server and Orthanc with its DICOMweb plugin
(Debian's ``orthanc-dicomweb``) side by side, on the same data:

* the ``--studies`` (100,000) one-instance studies that ``query.py`` fills,
  recorded straight into the appliance's catalog with ``Catalog.record``,
  and the same studies as small Part 10 files (the same patient, study,
  series and instance attributes, no pixels) uploaded to Orthanc through its
  REST API. Both are built once and cached in ``bench/out/web-N-vV/``; each
  run works on a copy, so that the cache stays as built;
* one 200-instance ``ct`` study (105 MB) from ``dataset.py``, stored into
  both with ``storescu`` (not timed).

One ``requests`` session, with the same settings for both servers (HTTP
Basic with the same account, keep-alive, no compression), then times:

* QIDO-RS ``GET {root}studies`` with the same ``includefield`` list, four
  kinds of search, ``--queries`` of each (shuffled): by PatientID, by
  PatientName prefix (``SURNAME*``), by a StudyDate range of
  ``--date-span`` days, and by a 30-day range with ``limit=25``. Each search
  goes to both servers in turn, the first alternating; the first
  ``WARM_UP`` searches are not counted. A round trip runs from sending the
  request until the whole answer is received. Every answer must give the
  expected number of studies, and both servers the same studies with the
  same values of the included attributes.
* WADO-RS ``GET {root}studies/{uid}`` of the 200-instance study as
  ``multipart/related; type="application/dicom"; transfer-syntax=*``,
  ``--rounds`` times for each server (the first alternating), until the
  last byte is received. MB/s count the parts (the DICOM files) received.
  Every round must give all 200 instances with the data set bytes that
  were sent (after the File Meta Information, which each server may
  write its own way).

Usage: ``.venv/bin/python bench/web.py [--studies 100000] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import email.message
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from common import (
    APPLIANCE,
    BENCH_DIR,
    LOOPBACK,
    Servers,
    exit_on_sigterm,
    free_port,
    keep_log,
    orthanc_binary,
    orthanc_dicomweb_plugin,
    orthanc_instance_count,
    percentile,
    print_table,
    start_appliance,
    start_orthanc,
    wait_for_port,
)
from dataset import generate, total_bytes
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from query import (
    WARM_UP,
    Query,
    Truth,
    date_query,
    fill,
    made_up_studies,
    make_queries,
    remember,
)
from retrieve import Target, store, study_uid_of

from appliance.catalog.records import NewInstance

CACHE_VERSION = 2
WADO_INSTANCES = 200
LIMIT = 25
LIMIT_SPAN_DAYS = 30
UPLOAD_THREADS = 4
ACCOUNT = ("bench", "made-up-bench-password")
# The appliance serves DICOMweb at the root of its HTTP server; Orthanc's
# plugin at the root it is given.
APPLIANCE_ROOT = "/"
ORTHANC_ROOT = "/dicom-web/"
# What a worklist of studies shows; the same list is asked of both servers.
INCLUDE_FIELDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
STUDY_UID_TAG = "0020000D"
_ACCESS_LINE = re.compile(
    r"appliance\.web\.access\S*: GET /studies \d{3} \S+ ([0-9.]+) s$", re.MULTILINE
)
INCLUDE_TAGS = [f"{tag_for_keyword(keyword):08X}" for keyword in INCLUDE_FIELDS]
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Web:
    """A running server with DICOMweb: where to reach it."""

    name: str
    base: str  # the DICOMweb root URL, ending in "/"
    dicom: Target


@dataclass
class Answer:
    """One QIDO-RS answer: status, studies (by Study Instance UID), time."""

    status: int
    studies: dict[str, dict[str, Any]]
    seconds: float


@dataclass
class Search:
    """The round trips and problems of one server's searches of one kind."""

    times: list[float] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # The server's own time per search, from its access log (the appliance).
    own: list[float] = field(default_factory=list)


@dataclass
class Retrieval:
    """One server's WADO-RS rounds: seconds, bytes received, problems."""

    seconds: list[float] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# -- the cached catalog ---------------------------------------------------------


def cache_folder(studies: int) -> Path:
    return BENCH_DIR / "out" / f"web-{studies}-v{CACHE_VERSION}"


def instance_file(item: NewInstance) -> bytes:
    """The Part 10 file of a filled study's one instance: every attribute the
    catalog holds for it, and no pixels (QIDO-RS never reads them)."""
    ds = Dataset()
    levels = (item.patient, item.study, item.series, item.record.attributes)
    for attributes in levels:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def cached_catalog(studies: int, orthanc: bool) -> Path:
    """The cache folder of ``studies`` studies: the appliance's catalog, and
    Orthanc's storage if ``orthanc``, each built first if not complete."""
    folder = cache_folder(studies)
    if (folder / "catalog.json").exists():
        print(f"appliance catalog of {studies} studies: cached in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        fill(folder / "catalog", studies)
        _built(folder / "catalog.json", studies, time.perf_counter() - started)

    if not orthanc:
        return folder
    if (folder / "orthanc.json").exists():
        print(f"Orthanc's {studies} studies: cached in {folder}")
    else:
        shutil.rmtree(folder / "orthanc", ignore_errors=True)
        started = time.perf_counter()
        upload_to_orthanc(folder, studies)
        _built(folder / "orthanc.json", studies, time.perf_counter() - started)
    return folder


def _built(marker: Path, studies: int, seconds: float) -> None:
    print(f"{marker.stem}: {studies} studies recorded in {seconds:.0f} s, cached")
    marker.write_text(json.dumps({"studies": studies, "seconds": seconds}))


def upload_to_orthanc(folder: Path, studies: int) -> None:
    """Every study into an Orthanc whose storage and index live in ``folder``.

    POST /instances on a few connections at once is the quickest way in
    (storescu over four associations is slower). Orthanc does not fsync its
    files while the cache is built: nothing is timed, and a lost cache is
    built again.
    """
    settings = {
        "StorageDirectory": str(folder / "orthanc" / "storage"),
        "IndexDirectory": str(folder / "orthanc" / "index"),
        "SyncStorageArea": False,
    }
    with Servers() as servers:
        server, http_port = start_orthanc(
            servers, folder / "orthanc-build", free_port(), settings=settings
        )
        url = f"http://{LOOPBACK}:{http_port}/instances"
        _post_all(url, made_up_studies(studies))
        held = orthanc_instance_count(http_port)
        servers.stop(server)
    shutil.rmtree(folder / "orthanc-build", ignore_errors=True)
    if held != studies:
        raise SystemExit(f"Orthanc holds {held} of {studies} instances")


def _post_all(url: str, items: Iterator[NewInstance]) -> None:
    lock = threading.Lock()
    # Set when the main thread gives up (an error, Ctrl-C, SIGTERM), so that
    # the pool's threads stop instead of uploading the rest first.
    stop = threading.Event()

    def post_some() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                answer = session.post(url, data=instance_file(item), timeout=60)
                answer.raise_for_status()

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        running = [pool.submit(post_some) for _ in range(UPLOAD_THREADS)]
        try:
            for done in running:
                done.result()
        finally:
            stop.set()


def truth_of(studies: int) -> Truth:
    """What the filled studies hold, counted again from the same seed."""
    truth = Truth()
    for item in made_up_studies(studies):
        remember(truth, item)
    return truth


# -- the servers ----------------------------------------------------------------


def hashed_password(password: str) -> str:
    """The password_hash line, from ``appliance web hash-password``."""
    done = subprocess.run(
        [str(APPLIANCE), "web", "hash-password"],
        input=password + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    line = done.stdout.strip().splitlines()[-1]
    if not line.startswith("password_hash = "):
        raise RuntimeError(f"unexpected hash-password output: {done.stdout!r}")
    return line


def start_web_appliance(servers: Servers, cache: Path, work: Path) -> Web:
    """``appliance serve`` on a copy of the cached catalog, its HTTP server on
    a free port with one viewer account."""
    data_dir = work / "appliance-data"
    shutil.copytree(cache / "catalog", data_dir / "catalog")
    http_port = free_port()
    config = work / "appliance.toml"
    lines = ["[web]", f"port = {http_port}", ""]
    lines += ["[[web.accounts]]", f'name = "{ACCOUNT[0]}"', 'role = "viewer"']
    lines += [hashed_password(ACCOUNT[1]), ""]
    config.write_text("\n".join(lines))
    dicom = Target("appliance", "APPLIANCE", free_port())
    server = start_appliance(servers, data_dir, dicom.port, config)
    wait_for_port(server, http_port)
    return Web("appliance", f"http://{LOOPBACK}:{http_port}{APPLIANCE_ROOT}", dicom)


def start_web_orthanc(servers: Servers, cache: Path, work: Path) -> Web:
    """Orthanc with the DICOMweb plugin and the same account, on a copy of
    the cached storage (files hard-linked, index copied)."""
    folder = work / "orthanc"
    shutil.copytree(
        cache / "orthanc" / "storage", folder / "storage", copy_function=os.link
    )
    shutil.copytree(cache / "orthanc" / "index", folder / "index")
    settings = {
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": [str(orthanc_dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": ORTHANC_ROOT},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {ACCOUNT[0]: ACCOUNT[1]},
    }
    dicom = Target("orthanc", "ORTHANC", free_port())
    _server, http_port = start_orthanc(servers, folder, dicom.port, settings=settings)
    return Web("orthanc", f"http://{LOOPBACK}:{http_port}{ORTHANC_ROOT}", dicom)


def new_session() -> requests.Session:
    """The one client setup for both servers: Basic auth, no compression."""
    session = requests.Session()
    session.auth = ACCOUNT
    # Orthanc gzips answers when asked to; the appliance may not. Asking
    # neither keeps the comparison about searching and sending.
    session.headers["Accept-Encoding"] = "identity"
    return session


# -- QIDO-RS --------------------------------------------------------------------


def make_searches(
    truth: Truth, per_kind: int, span_days: int, rng: random.Random
) -> list[Query]:
    """query.py's three kinds of search, plus a month of studies with a limit."""
    searches = make_queries(truth, per_kind, span_days, rng)
    for _ in range(per_kind):
        month = date_query(truth, LIMIT_SPAN_DAYS, rng)
        keys = {**month.keys, "limit": str(LIMIT)}
        searches.append(Query("date_limit", keys, min(LIMIT, month.expected)))
    rng.shuffle(searches)
    return searches


def qido(session: requests.Session, web: Web, search: Query) -> Answer:
    """One QIDO-RS study search; the studies it gave, by Study Instance UID."""
    params: list[tuple[str, str]] = list(search.keys.items())
    params += [("includefield", keyword) for keyword in INCLUDE_FIELDS]
    # "*" is sent as it is (RFC 3986 allows it in a query): Orthanc 1.10's
    # plugin matches "%2A" literally, and a wildcard search then finds nothing.
    query = urllib.parse.urlencode(params, safe="*", quote_via=urllib.parse.quote)
    headers = {"Accept": "application/dicom+json"}
    started = time.perf_counter()
    answer = session.get(f"{web.base}studies?{query}", headers=headers)
    seconds = time.perf_counter() - started
    studies: dict[str, dict[str, Any]] = {}
    if answer.status_code == 200:
        for study in answer.json():
            studies[study[STUDY_UID_TAG]["Value"][0]] = study
    return Answer(answer.status_code, studies, seconds)


def run_searches(
    session: requests.Session, webs: list[Web], searches: list[Query]
) -> dict[str, dict[str, Search]]:
    """Every search against every server in turn; results by server and kind."""
    results: dict[str, dict[str, Search]] = {w.name: defaultdict(Search) for w in webs}
    differences: list[str] = []
    for position, search in enumerate(searches):
        order = webs if position % 2 == 0 else webs[::-1]
        answers = {web.name: qido(session, web, search) for web in order}
        for name, answer in answers.items():
            result = results[name][search.kind]
            _check_answer(search, answer, result)
            if position >= WARM_UP:
                result.times.append(answer.seconds * 1000)
                result.matches.append(len(answer.studies))
        if "limit" not in search.keys:
            differences += _compare(search, answers)
    wrong = sum(len(r.problems) for kinds in results.values() for r in kinds.values())
    print(
        f"QIDO-RS: {len(searches)} searches against {len(webs)} server(s): "
        f"{wrong} answer(s) with a wrong status or count, "
        f"{len(differences)} difference(s) between the servers"
    )
    for line in differences[:5]:
        print(f"  ! {line}")
    if len(differences) > 5:
        print(f"  ! ... {len(differences)} differences in all")
    return results


def _check_answer(search: Query, answer: Answer, result: Search) -> None:
    found = len(answer.studies)
    if answer.status not in (200, 204) or found != search.expected:
        result.problems.append(
            f"{search.keys}: HTTP {answer.status}, {found} studies, "
            f"{search.expected} expected"
        )


def _compare(search: Query, answers: dict[str, Answer]) -> list[str]:
    """Where two servers' answers to one search differ: studies or values."""
    if len(answers) < 2:
        return []
    (first, one), (second, other) = list(answers.items())[:2]
    if one.studies.keys() != other.studies.keys():
        return [f"{search.keys}: {first} and {second} gave different studies"]
    differences = []
    for study_uid, study in one.studies.items():
        for tag in INCLUDE_TAGS:
            mine, theirs = study.get(tag), other.studies[study_uid].get(tag)
            if _value(mine) != _value(theirs):
                differences.append(
                    f"{search.kind} {tag}: {first} {mine}, {second} {theirs}"
                )
    return differences


def _value(element: dict[str, Any] | None) -> list[str] | None:
    """An attribute's value, with an empty one and a missing one alike, and
    a number and its string alike (PS3.18 F.2.3 allows either for IS)."""
    values = (element or {}).get("Value") or []
    return [str(value) for value in values] or None


def add_own_times(log: str, searches: list[Query], kinds: dict[str, Search]) -> None:
    """The appliance's own time for each search, from its access log: from
    the request's arrival until the answer is handed to the socket. The
    searches are the only requests logged as ``GET /studies``, in order."""
    seconds = [float(value) for value in _ACCESS_LINE.findall(log)]
    if len(seconds) != len(searches):
        print(
            f"appliance access log: {len(seconds)} searches logged, "
            f"{len(searches)} sent; its own times are left out"
        )
        return
    for position, (search, value) in enumerate(zip(searches, seconds, strict=True)):
        if position >= WARM_UP:
            kinds[search.kind].own.append(value * 1000)


# -- WADO-RS --------------------------------------------------------------------


def wado(session: requests.Session, web: Web, study_uid: str) -> tuple[float, Any]:
    """Retrieve the whole study; (seconds until the last byte, response)."""
    headers = {"Accept": WADO_ACCEPT}
    started = time.perf_counter()
    answer = session.get(f"{web.base}studies/{study_uid}", headers=headers, stream=True)
    body = b"".join(answer.iter_content(chunk_size=1 << 20))
    seconds = time.perf_counter() - started
    return seconds, (answer, body)


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The payloads of a multipart body (RFC 2046 5.1), headers dropped."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"\r\n--" + boundary.encode()
    pieces = (b"\r\n" + body).split(delimiter)
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        _headers, _, payload = piece.partition(b"\r\n\r\n")
        parts.append(payload)
    return parts


def data_set_bytes(part10: bytes) -> bytes:
    """What follows the File Meta Information of a Part 10 file (PS3.10
    7.1): the preamble, "DICM", then (0002,0000) in explicit VR little
    endian, whose 4-byte value is the length of the rest of group 2."""
    if part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file starting with (0002,0000)")
    length = int.from_bytes(part10[140:144], "little")
    return part10[144 + length :]


def sent_instances(files: list[Path]) -> dict[str, bytes]:
    """The stored files, by SOP Instance UID."""
    sent = {}
    for path in files:
        data = path.read_bytes()
        meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sent[str(meta.SOPInstanceUID)] = data
    return sent


def run_retrievals(
    session: requests.Session,
    webs: list[Web],
    files: list[Path],
    rounds: int,
) -> dict[str, Retrieval]:
    """``rounds`` retrievals of the study from each server, checked."""
    study_uid = study_uid_of(files)
    sent = sent_instances(files)
    results = {web.name: Retrieval() for web in webs}
    for round_ in range(rounds):
        order = webs if round_ % 2 == 0 else webs[::-1]
        for web in order:
            seconds, (answer, body) = wado(session, web, study_uid)
            result = results[web.name]
            result.seconds.append(seconds)
            _check_retrieval(answer, body, sent, result, round_ + 1)
    wrong = sum(len(result.problems) for result in results.values())
    print(f"WADO-RS: {rounds} round(s) per server, {wrong} with a problem")
    return results


def _check_retrieval(
    answer: requests.Response,
    body: bytes,
    sent: dict[str, bytes],
    result: Retrieval,
    round_: int,
) -> None:
    if answer.status_code != 200:
        result.received.append(len(body))
        result.problems.append(f"round {round_}: HTTP {answer.status_code}")
        return
    parts = multipart_parts(answer.headers.get("Content-Type", ""), body)
    result.received.append(sum(len(part) for part in parts))
    same = 0
    for part in parts:
        meta = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        original = sent.get(str(meta.SOPInstanceUID), b"")
        if original and data_set_bytes(part) == data_set_bytes(original):
            same += 1
    if len(parts) != len(sent) or same != len(sent):
        result.problems.append(
            f"round {round_}: {len(parts)} parts, {same} of {len(sent)} "
            "instances with the data set bytes sent"
        )


# -- report ---------------------------------------------------------------------


def print_searches(results: dict[str, dict[str, Search]]) -> None:
    """Median, p95 and max round trip per kind and server, and the ratio."""
    medians = {
        (name, kind): statistics.median(search.times)
        for name, kinds in results.items()
        for kind, search in kinds.items()
    }
    headers = ["search", "server", "n", "matches (mean)", "median ms", "p95 ms"]
    headers += ["max ms", "own ms", "appl/orthanc"]
    rows = []
    for kind in sorted({kind for kinds in results.values() for kind in kinds}):
        for name, kinds in results.items():
            search = kinds[kind]
            ratio = ""
            theirs = medians.get(("orthanc", kind))
            if name == "appliance" and theirs:
                ratio = f"{medians[(name, kind)] / theirs:.2f}"
            rows.append(
                [
                    kind,
                    name,
                    str(len(search.times)),
                    f"{statistics.mean(search.matches):.1f}",
                    f"{medians[(name, kind)]:.1f}",
                    f"{percentile(search.times, 0.95):.1f}",
                    f"{max(search.times):.1f}",
                    f"{statistics.median(search.own):.1f}" if search.own else "",
                    ratio,
                ]
            )
    print()
    print_table(headers, rows)
    print("own ms: the median of the server's own times, from its access log")
    print("appl/orthanc: the appliance's median over Orthanc's (below 1: faster)")
    for name, kinds in results.items():
        for kind, search in sorted(kinds.items()):
            for problem in search.problems[:5]:
                print(f"! {name} {kind}: {problem}")


def print_retrievals(results: dict[str, Retrieval], size: int) -> None:
    """Median seconds and MB/s per server, and the appliance/orthanc ratio."""
    rates = {
        name: statistics.median(
            received / seconds / 1e6
            for received, seconds in zip(r.received, r.seconds, strict=True)
        )
        for name, r in results.items()
    }
    headers = ["server", "rounds", "median s", "MB/s", "MB received", "MB sent"]
    headers.append("appl/orthanc")
    rows = []
    for name, result in results.items():
        ratio = ""
        if name == "appliance" and rates.get("orthanc"):
            ratio = f"{rates[name] / rates['orthanc']:.2f}"
        rows.append(
            [
                name,
                str(len(result.seconds)),
                f"{statistics.median(result.seconds):.2f}",
                f"{rates[name]:.1f}",
                f"{statistics.median(result.received) / 1e6:.1f}",
                f"{size / 1e6:.1f}",
                ratio,
            ]
        )
    print()
    print_table(headers, rows)
    print("MB/s: the median round's; appl/orthanc: the appliance's over Orthanc's")
    for name, result in results.items():
        for problem in result.problems:
            print(f"! {name}: {problem}")


# -- main -----------------------------------------------------------------------


def choose_targets(wanted: list[str]) -> list[str]:
    """The servers to run; Orthanc is dropped, with a reason, if missing."""
    if "orthanc" in wanted and orthanc_binary() is None:
        print("orthanc: skipped, the Orthanc executable is not installed")
        print("         (apt-get install -y orthanc orthanc-dicomweb)")
        wanted = [target for target in wanted if target != "orthanc"]
    elif "orthanc" in wanted and orthanc_dicomweb_plugin() is None:
        print("orthanc: skipped, its DICOMweb plugin is not installed")
        print("         (apt-get install -y orthanc-dicomweb)")
        wanted = [target for target in wanted if target != "orthanc"]
    return wanted


STARTERS = {"appliance": start_web_appliance, "orthanc": start_web_orthanc}


def run(args: argparse.Namespace, targets: list[str], root: Path) -> None:
    """Start the servers, store the study, search, retrieve, report."""
    cache = cached_catalog(args.studies, "orthanc" in targets)
    truth = truth_of(args.studies)
    files = generate("ct", WADO_INSTANCES)
    size = total_bytes(files)
    print(f"WADO-RS study: {len(files)} instances, {size / 1e6:.1f} MB")
    searches = make_searches(truth, args.queries, args.date_span, random.Random(1))

    with Servers() as servers, new_session() as session:
        webs = [STARTERS[name](servers, cache, root) for name in targets]
        for web in webs:
            store(files, web.dicom, root / f"store-{web.name}.log")
        searched = run_searches(session, webs, searches)
        retrieved = run_retrievals(session, webs, files, args.rounds)
        appliance = [s for s in servers.running if s.name == "appliance"]
        for server in appliance:
            servers.stop(server)
            add_own_times(server.log_text(), searches, searched["appliance"])
    print_searches(searched)
    print_retrievals(retrieved, size)
    troubled = any(r.problems for r in retrieved.values()) or any(
        s.problems for kinds in searched.values() for s in kinds.values()
    )
    if appliance and troubled:
        print(f"appliance log kept in {keep_log(appliance[0], 'appliance-web')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100, help="per kind")
    parser.add_argument("--date-span", type=int, default=3, help="days")
    parser.add_argument("--rounds", type=int, default=5, help="WADO-RS rounds")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=sorted(STARTERS),
        default=list(STARTERS),
    )
    args = parser.parse_args()
    exit_on_sigterm()

    targets = choose_targets(args.targets)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    root = Path(tempfile.mkdtemp(prefix="bench-web-"))
    try:
        run(args, targets, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
