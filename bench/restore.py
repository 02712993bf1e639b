"""Restore from an SFTP mirror: throughput, and the time to the first C-FIND.

Throughput: imports whole ``ct`` studies of ``dataset.py`` (20 studies of
200, ~2.1 GB at full size; ``--scale`` shrinks the number of studies) into
a fresh archive (not timed), replicates them to a loopback OpenSSH sshd as
``replicate.py`` does and sends a catalog snapshot (not timed). Then, in
every round (``--rounds``), it times:

- the appliance: ``appliance restore --from mirror`` as a subprocess, with
  an sftp ``[mirror]`` config, a new data directory and the master keys
  imported from the escrow copy (not timed): catalog phase and data phase,
  every instance extracted, decrypted, checked and written durably;
- OpenSSH's ``sftp -b`` getting the mirror's ``packs/`` folder
  (``get -r``) into a temp dir, over one connection, with the cipher the
  appliance's connection uses.

Both move the same bytes: the packs on the mirror. MB/s are of those
bytes; the target is the appliance at 0.8x of sftp or better.

Time to the first C-FIND: a mirror of ``--studies`` one-instance studies
(100,000; tiny Secondary Capture instances, made from a fixed seed, stored
through ``Ingest.store_received`` and replicated by the ``Replicator``
into a folder, with a catalog snapshot), cached in ``bench/out/`` so that
the next run skips building it, served by the loopback sshd. It times
``appliance restore --from mirror --background``, then ``appliance
serve`` on the restored data directory until it listens, then a
STUDY-level C-FIND by PatientID from pynetdicom until it returns the
patient's every study; target: under 10 s in all. The restored catalog's
study count is checked afterwards.

``--profile`` runs the throughput restore under cProfile (its main thread)
and prints the functions that take the most time.

Usage: ``.venv/bin/python bench/restore.py [--scale 0.1] [--rounds 2]
[--studies 100000] [--only throughput|find] [--profile]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import (
    APPLIANCE,
    BENCH_DIR,
    Servers,
    exit_on_sigterm,
    free_port,
    print_table,
    start_appliance,
)
from dataset import KINDS, generate, made_up_name, total_bytes, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from replicate import (
    APPLIANCE_CIPHER,
    SSHD,
    Archive,
    Mirror,
    import_all,
    loopback_sshd,
    open_archive,
    replicate_all,
    run_tool,
)

from appliance.catalog.store import Catalog
from appliance.config import toml_value
from appliance.ingest import Ingest
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports.directory import DirectoryTransport
from appliance.replication.transports.settings import SftpSettings
from appliance.restore.data import EXTRACT_THREADS
from appliance.storage.durable import fsync_directory, fsync_file

STUDIES = 20
FIND_STUDIES = 100_000
TARGET_RATIO = 0.8
TARGET_FIND_SECONDS = 10.0
SEED = 11
# Bump when the cached C-FIND mirror is built differently.
FIND_MIRROR_VERSION = 1
STORE_THREADS = 8

# The modules listed by cumulative time (the command line's wrappers are not).
_OWN_MODULES = r"appliance/(restore|storage|catalog|replication|hsm)/"

APPLIANCE_ROW = "appliance restore"
SFTP_ROW = "sftp get -r"
DISK_ROW = "the instances written with a flush each"


# -- shared -----------------------------------------------------------------------


def write_config(path: Path, data_dir: Path, mirror: Mirror, remote: Path) -> Path:
    """A config for the new appliance: its data directory, the sftp mirror."""
    settings = mirror.settings(remote, SftpSettings.client)
    sections = {
        "storage": {"data_dir": str(data_dir), "reserved_bytes": 0},
        # A port of its own: another appliance may have the default.
        "web": {"port": free_port()},
        "mirror": {
            "kind": "sftp",
            "host": settings.host,
            "port": settings.port,
            "user": settings.user,
            "key_file": str(settings.key_file),
            "known_hosts": str(settings.known_hosts),
            "remote_path": str(remote),
        },
    }
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def appliance_command(*args: str, config: Path) -> list[str]:
    return [str(APPLIANCE), *args, "--config", str(config)]


def new_appliance(
    work: Path, name: str, mirror: Mirror, remote: Path, escrow: Path
) -> Path:
    """A config and an empty data directory with the escrowed keys; the
    config's path."""
    config = write_config(work / f"{name}.toml", work / name, mirror, remote)
    run_tool(appliance_command("keys", "import", str(escrow), config=config))
    return config


@dataclass
class Timed:
    """A subprocess's wall and CPU seconds (its own and its children's)
    and what it printed."""

    wall: float
    cpu: float
    output: str
    # Seconds to flush what it wrote, after ``wall`` (sftp flushes nothing).
    flushed: float = 0.0


def timed_run(command: list[str]) -> Timed:
    """Run ``command`` to its end; it must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        raise SystemExit(
            f"{' '.join(command[:3])} failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return Timed(wall, cpu, done.stdout + done.stderr)


def under_cprofile(command: list[str], output: Path) -> list[str]:
    """The same appliance command, run by this Python under cProfile."""
    profiler = [sys.executable, "-m", "cProfile", "-o", str(output)]
    return [*profiler, "-m", "appliance", *command[1:]]


def print_profile(output: Path) -> None:
    """The 15 functions with the most time of their own, and the 20 of the
    appliance's own modules with the most cumulative time."""
    for order, selection in (("tottime", []), ("cumulative", [_OWN_MODULES])):
        print(f"by {order}, the main thread only:")
        stream = io.StringIO()
        stats = pstats.Stats(str(output), stream=stream)
        stats.sort_stats(order).print_stats(*selection, 15 if not selection else 20)
        print(stream.getvalue().split("\n", 6)[-1].rstrip())


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# -- throughput -------------------------------------------------------------------


def throughput_set(scale: float) -> list[Path]:
    """Whole ``ct`` studies of 200 instances: 20 of them at full scale."""
    kind = KINDS["ct"]
    per_study = kind.per_series * kind.series_per_study
    return generate("ct", max(1, round(STUDIES * scale)) * per_study)


def build_mirror(paths: list[Path], work: Path, mirror: Mirror) -> Path:
    """Import ``paths``, replicate them to the sshd (verify off: it is not
    what is measured) with a catalog snapshot; the mirror's folder."""
    remote = work / "mirror" / "files"
    remote.mkdir(parents=True)
    settings = mirror.settings(remote, SftpSettings.client)
    chosen = Settings(batch_seconds=0.0, verify_after_upload=False)
    with open_archive(work / "origin") as archive:
        started = time.perf_counter()
        import_all(archive, paths)
        imported = time.perf_counter() - started
        replicate_all(archive, settings, chosen, len(paths), work / "spool")
        send_snapshot(archive, DirectoryTransport(remote), work / "spool")
        (remote.parent / "escrow.txt").write_text(archive.keys.export_escrow())
    remove_tree(work / "origin")
    print(
        f"  imported in {imported:.1f} s, replicated in "
        f"{time.perf_counter() - started - imported:.1f} s (not timed)"
    )
    return remote


def send_snapshot(archive: Archive, transport: DirectoryTransport, spool: Path) -> None:
    """A catalog snapshot on the mirror, as the service sends it daily."""
    replicator = Replicator(
        archive.catalog, archive.tiers(), transport, spool, Settings()
    )
    try:
        replicator.send_snapshot()
    finally:
        replicator.close()


def pack_bytes(remote: Path) -> int:
    return sum(path.stat().st_size for path in (remote / "packs").rglob("*.pack"))


def appliance_restore(
    work: Path, mirror: Mirror, remote: Path, count: int, profile: Path | None
) -> Timed:
    """``appliance restore --from mirror`` into a new data directory."""
    escrow = remote.parent / "escrow.txt"
    config = new_appliance(work, "restored", mirror, remote, escrow)
    command = appliance_command("restore", "--from", "mirror", config=config)
    if profile is not None:
        command = under_cprofile(command, profile)
    try:
        result = timed_run(command)
    finally:
        remove_tree(work / "restored")
    found = re.search(r"restored and verified: ([\d,]+) instance", result.output)
    restored = int(found.group(1).replace(",", "")) if found else -1
    if restored != count:
        raise SystemExit(f"restored {restored} of {count}:\n{result.output}")
    return result


def sftp_get(work: Path, mirror: Mirror, remote: Path, expected: int) -> Timed:
    """OpenSSH's sftp getting every pack, with the appliance's cipher; then,
    timed apart, every file it wrote flushed to the disk."""
    target = work / "downloaded"
    batch_file = work / "sftp-batch"
    batch_file.write_text(f'get -r "{remote / "packs"}" "{target}"\n')
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        log = run_tool(mirror.sftp_command(batch_file, APPLIANCE_CIPHER))
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        got = sum(p.stat().st_size for p in target.rglob("*.pack"))
        flushed = flush_tree(target)
    finally:
        remove_tree(target)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if got != expected:
        raise SystemExit(f"sftp got {got} bytes of packs, the mirror holds {expected}")
    cipher = re.search(r"kex: client->server cipher: (\S+)", log)
    return Timed(wall, cpu, cipher.group(1) if cipher else "?", flushed)


def flush_tree(folder: Path) -> float:
    """Seconds to flush every file under ``folder``, and the folders."""
    started = time.perf_counter()
    for path in sorted(folder.rglob("*"), key=lambda p: p.is_dir()):
        if path.is_dir():
            fsync_directory(path)
        else:
            fsync_file(path)
    fsync_directory(folder)
    return time.perf_counter() - started


def disk_alone(work: Path, paths: list[Path]) -> float:
    """Seconds to copy the instances into a new folder with a flush of each
    file and of the folder, on as many threads as the appliance extracts
    with: the least a restore that counts only flushed instances needs."""
    target = work / "disk-alone"
    target.mkdir()

    def copy(number: int) -> None:
        with open(target / f"{number}.dcm", "wb") as out:
            out.write(paths[number].read_bytes())
            out.flush()
            os.fsync(out.fileno())

    for path in paths:
        path.read_bytes()  # into the page cache, as the packs are: not timed
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(EXTRACT_THREADS) as pool:
            list(pool.map(copy, range(len(paths))))
        fsync_directory(target)
        return time.perf_counter() - started
    finally:
        remove_tree(target)


def throughput(args: argparse.Namespace, work: Path, mirror: Mirror) -> None:
    paths = throughput_set(args.scale)
    data = total_bytes(paths)
    print(f"throughput: {len(paths)} ct instances, {data / 1e6:.0f} MB")
    remote = build_mirror(paths, work, mirror)
    packs = pack_bytes(remote)
    print(f"  the mirror holds {packs / 1e6:.0f} MB of packs")

    rows: dict[str, list[tuple[Timed, float]]] = {APPLIANCE_ROW: [], SFTP_ROW: []}
    disk: list[float] = []
    for number in range(args.rounds):
        order = [APPLIANCE_ROW, SFTP_ROW]
        for method in order if number % 2 == 0 else order[::-1]:
            before = mirror.server_cpu()
            if method == APPLIANCE_ROW:
                run = appliance_restore(work, mirror, remote, len(paths), None)
            else:
                run = sftp_get(work, mirror, remote, packs)
            sshd = mirror.server_cpu() - before
            rows[method].append((run, sshd))
            print(
                f"  round {number + 1}: {method}: {run.wall:.2f} s, "
                f"{packs / 1e6 / run.wall:.1f} MB/s, CPU {run.cpu:.1f} s, "
                f"sshd CPU {sshd:.1f} s",
                flush=True,
            )
        disk.append(disk_alone(work, paths))
        print(f"  round {number + 1}: {DISK_ROW}: {disk[-1]:.2f} s", flush=True)
    report_throughput(rows, packs)
    report_disk(rows, disk, data)
    if args.profile:
        profile(work, mirror, remote, len(paths))


def report_throughput(rows: dict[str, list[tuple[Timed, float]]], packs: int) -> None:
    headers = ["method", "MB packs", "seconds", "MB/s", "CPU s", "sshd CPU s"]
    table = []
    for method, runs in rows.items():
        wall = sum(run.wall for run, _ in runs)
        cpu = sum(run.cpu for run, _ in runs)
        sshd = sum(server for _, server in runs)
        megabytes = packs * len(runs) / 1e6
        table.append(
            [
                method,
                f"{megabytes:.0f}",
                f"{wall:.2f}",
                f"{megabytes / wall:.1f}",
                f"{cpu:.1f}",
                f"{sshd:.1f}",
            ]
        )
    print(f"\nsums over {len(rows[SFTP_ROW])} round(s); MB/s of the mirror's packs")
    print_table(headers, table)
    print("CPU s: the appliance's with its ssh; sftp's with its ssh")
    print(f"sftp cipher: {rows[SFTP_ROW][0][0].output}")
    mine = sum(run.wall for run, _ in rows[APPLIANCE_ROW])
    theirs = sum(run.wall for run, _ in rows[SFTP_ROW])
    ratio = theirs / mine
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    by_round = ", ".join(
        f"{b.wall / a.wall:.2f}x"
        for (a, _), (b, _) in zip(rows[APPLIANCE_ROW], rows[SFTP_ROW], strict=True)
    )
    print(f"appliance / sftp: {ratio:.2f}x ({verdict}, target {TARGET_RATIO})")
    print(f"  round by round: {by_round}")


def report_disk(
    rows: dict[str, list[tuple[Timed, float]]], disk: list[float], data: int
) -> None:
    """What the disk allows: the appliance must write every instance and
    flush it before it counts; sftp writes the packs and flushes nothing."""
    sftp = sum(run.wall for run, _ in rows[SFTP_ROW])
    flushed = sum(run.flushed for run, _ in rows[SFTP_ROW])
    mine = sum(run.wall for run, _ in rows[APPLIANCE_ROW])
    floor = sum(disk)
    print(
        f"\n{DISK_ROW} ({EXTRACT_THREADS} threads, no network, no decoding): "
        f"{floor:.2f} s, {data * len(disk) / 1e6 / floor:.1f} MB/s"
    )
    print(
        f"  sftp's time over it: {sftp / floor:.2f}x, the most the appliance "
        "can reach on this disk"
    )
    print(
        f"sftp get -r, then every file flushed: {sftp:.2f} + {flushed:.2f} s; "
        f"the appliance over that: {(sftp + flushed) / mine:.2f}x"
    )


def profile(work: Path, mirror: Mirror, remote: Path, count: int) -> None:
    """One more restore under cProfile; the functions that take the most."""
    output = work / "restore.prof"
    run = appliance_restore(work, mirror, remote, count, output)
    print(f"\nprofiled restore: {run.wall:.2f} s (cProfile slows it)")
    print_profile(output)


# -- time to the first C-FIND -----------------------------------------------------


@dataclass
class Truth:
    """What the cached mirror holds: studies, and one patient's."""

    studies: int
    patient_id: str
    patient_studies: int


def find_mirror_folder(studies: int) -> Path:
    return BENCH_DIR / "out" / f"restore-find-{studies}-v{FIND_MIRROR_VERSION}"


def tiny_instance(index: int, patient: tuple[str, str]) -> bytes:
    """The one instance of study number ``index``: 4 x 4 pixels."""
    rng = random.Random(f"{SEED}-{index}")
    study_uid = uid("restore", SEED, "study", index)
    ds = Dataset()
    ds.PatientID, ds.PatientName = patient
    ds.PatientBirthDate = f"{rng.randrange(1930, 2015)}0{rng.randrange(1, 10)}15"
    ds.PatientSex = rng.choice("MF")
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = f"20{rng.randrange(0, 25):02d}{rng.randrange(1, 13):02d}15"
    ds.StudyTime = f"{rng.randrange(7, 19):02d}3000"
    ds.AccessionNumber = f"RA{index:08d}"
    ds.StudyID = str(index % 10_000)
    ds.SeriesInstanceUID = uid(study_uid, "series")
    ds.SOPInstanceUID = uid(study_uid, "instance")
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = rng.choice(("CT", "MR", "CR", "US", "OT"))
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = rng.randbytes(32)
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def study_patients(studies: int) -> list[tuple[str, str]]:
    """The patient (ID, name) of every study: about 2.5 studies each."""
    rng = random.Random(SEED)
    count = max(1, studies * 2 // 5)
    patients = [(f"RP{n:07d}", made_up_name(rng)) for n in range(count)]
    return [rng.choice(patients) for _ in range(studies)]


def store_all(archive: Archive, studies: int) -> None:
    """Every study through ``Ingest.store_received`` (the C-STORE path),
    from several threads so that their catalog commits are shared."""
    patients = study_patients(studies)
    ingest = Ingest(archive.catalog, archive.online, "refuse")
    incoming = archive.online.incoming_for(0)
    counter = iter(range(studies))
    lock = threading.Lock()

    def store_some() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            received = incoming / f"{index}.dcm"
            received.write_bytes(tiny_instance(index, patients[index]))
            result = ingest.store_received(received, "bench")
            if not result.ok:
                raise SystemExit(f"study {index} not stored: {result.reason}")

    try:
        with ThreadPoolExecutor(STORE_THREADS) as pool:
            for done in [pool.submit(store_some) for _ in range(STORE_THREADS)]:
                done.result()
    finally:
        ingest.close()


def replicate_to_folder(archive: Archive, remote: Path, spool: Path) -> None:
    """Every queued instance in packs, the journal, then a catalog snapshot."""
    transport = DirectoryTransport(remote)
    chosen = Settings(batch_seconds=0.0, verify_after_upload=False)
    replicator = Replicator(archive.catalog, archive.tiers(), transport, spool, chosen)
    try:
        while (batch := replicator.ready()) or replicator.waiting():
            replicator.send(batch)
        replicator.send_snapshot()
    finally:
        replicator.close()


def cached_find_mirror(studies: int) -> tuple[Path, Truth]:
    """The mirror of ``studies`` one-instance studies, built once."""
    folder = find_mirror_folder(studies)
    truth_file = folder / "truth.json"
    if truth_file.exists():
        print(f"  the {studies}-study mirror is cached in {folder}: not built")
        return folder / "files", Truth(**json.loads(truth_file.read_text()))

    remove_tree(folder)
    (folder / "files").mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    try:
        started = time.perf_counter()
        with open_archive(work / "origin") as archive:
            store_all(archive, studies)
            stored = time.perf_counter() - started
            replicate_to_folder(archive, folder / "files", work / "spool")
            (folder / "escrow.txt").write_text(archive.keys.export_escrow())
        print(
            f"  built the {studies}-study mirror: stored in {stored:.0f} s, "
            f"replicated in {time.perf_counter() - started - stored:.0f} s; "
            f"cached in {folder}"
        )
    finally:
        remove_tree(work)
    patients = study_patients(studies)
    chosen = patients[0][0]
    truth = Truth(studies, chosen, sum(1 for p in patients if p[0] == chosen))
    truth_file.write_text(json.dumps(truth.__dict__))
    return folder / "files", truth


def find_patient(port: int, patient_id: str) -> tuple[int, int]:
    """A STUDY-level C-FIND by PatientID; (matches, final status)."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    if not assoc.is_established:
        raise SystemExit("the appliance refused the association")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = patient_id
    identifier.StudyInstanceUID = ""
    identifier.StudyDate = ""
    matches, final = 0, -1
    try:
        for status, _found in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.Status) if "Status" in status else -1
            if code in (0xFF00, 0xFF01):
                matches += 1
            else:
                final = code
    finally:
        assoc.release()
    return matches, final


def catalog_studies(data_dir: Path) -> int:
    catalog = Catalog(data_dir / "catalog")
    try:
        with catalog.read() as txn:
            return sum(1 for _ in catalog.all_records(txn, "studies"))
    finally:
        catalog.close()


def first_find(args: argparse.Namespace, work: Path, mirror: Mirror) -> None:
    print(f"\ntime to the first C-FIND: {args.studies} one-instance studies")
    cached, truth = cached_find_mirror(args.studies)
    # The service replicates to the mirror (a first catalog snapshot at
    # once): it gets a copy, hard-linked, so that the cache stays as built.
    remote = work / "served-mirror"
    shutil.copytree(cached, remote, copy_function=os.link)
    escrow = cached.parent / "escrow.txt"
    config = new_appliance(work, "served", mirror, remote, escrow)
    data_dir = work / "served"

    command = appliance_command(
        "restore", "--from", "mirror", "--background", config=config
    )
    catalog = timed_run(command)
    with Servers() as servers:
        port = free_port()
        started = time.perf_counter()
        # Not until its children settle: the background restore it starts
        # goes on through the query, as it would.
        start_appliance(servers, data_dir, port, config, settle=False)
        listening = time.perf_counter() - started
        matches, final = find_patient(port, truth.patient_id)
        answered = time.perf_counter() - started
    held = catalog_studies(data_dir)
    remove_tree(data_dir)
    remove_tree(remote)

    if (matches, final) != (truth.patient_studies, 0) or held != truth.studies:
        raise SystemExit(
            f"C-FIND gave {matches} studies (status {final:#06x}) of "
            f"{truth.patient_studies}; the catalog holds {held} of {truth.studies}"
        )
    total = catalog.wall + answered
    verdict = "ok" if total < TARGET_FIND_SECONDS else "ABOVE TARGET"
    print_table(
        ["step", "seconds"],
        [
            ["restore --background (catalog phase)", f"{catalog.wall:.2f}"],
            ["serve: start until it listens", f"{listening:.2f}"],
            ["C-FIND by PatientID answered", f"{answered - listening:.2f}"],
            ["total", f"{total:.2f}"],
        ],
    )
    print(
        f"C-FIND: {matches} studies of patient {truth.patient_id}, as stored; "
        f"the restored catalog holds all {held} studies"
    )
    print(f"catalog phase CPU: {catalog.cpu:.1f} s")
    print(f"time to the first C-FIND: {total:.2f} s ({verdict}, target < 10 s)")
    if args.profile:
        profile_catalog_phase(work, mirror, cached, escrow)


def profile_catalog_phase(
    work: Path, mirror: Mirror, remote: Path, escrow: Path
) -> None:
    """The catalog phase once more, under cProfile (the restore command
    reads the mirror only)."""
    config = new_appliance(work, "profiled", mirror, remote, escrow)
    output = work / "catalog.prof"
    command = appliance_command(
        "restore", "--from", "mirror", "--background", config=config
    )
    try:
        run = timed_run(under_cprofile(command, output))
    finally:
        remove_tree(work / "profiled")
    print(f"\nprofiled catalog phase: {run.wall:.2f} s (cProfile slows it)")
    print_profile(output)


# -- the run ----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the set")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--studies", type=int, default=FIND_STUDIES)
    parser.add_argument("--only", choices=("throughput", "find"))
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or args.studies < 1:
        parser.error("--rounds and --studies must be 1 or more")
    exit_on_sigterm()
    for tool in ("sftp", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y openssh-client")
    if not SSHD.exists():
        raise SystemExit(f"{SSHD} is missing: apt-get install -y openssh-server")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        raise SystemExit("sshd run as root needs /run/sshd: mkdir -m 755 /run/sshd")

    (BENCH_DIR / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=BENCH_DIR / "out"))
    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    try:
        with loopback_sshd(work / "sshd") as mirror:
            if args.only != "find":
                throughput(args, work, mirror)
            if args.only != "throughput":
                first_find(args, work, mirror)
    finally:
        remove_tree(work)
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
