"""Replication to an SFTP mirror: the replicator against OpenSSH's ``sftp``.

Imports 10 CT studies of 200 instances (``dataset.py``'s ``ct`` set of
2,000, ~1.05 GB; ``--scale`` shrinks the number of studies) into a fresh
catalog and online tier with ``Ingest.import_file`` (not timed), which
queues every instance for the mirror. The mirror is OpenSSH's sshd, started
by the script as the current user on a free loopback port, with keys made
for the run in a temp dir and ``internal-sftp`` serving the files.

In every round (``--rounds``, 2), on the same instances, it times:

- the appliance: a ``Replicator`` over the SFTP transport that
  ``mirror.client`` picks (``--client``; the shipped default unless given),
  no throttle, batches of 64 MB, the next pack written while one uploads
  (``--prepare-ahead``, the default 1; 0 writes no pack ahead), zstd at
  ``--level`` (``replication.compression_level``, the default 3),
  calling ``ready()`` and ``send()`` until nothing is left, once with
  ``verify_after_upload`` off and once on (every pack read back over a
  second SFTP connection and checked, as the replication process does).
  Each run starts from its own copy of the imported archive, so that
  every run sends the same queue and journal;
- OpenSSH's ``sftp -b BATCHFILE`` putting the same instance files, as one
  tar per 64 MB of files in queue order (made once, not timed), over one
  connection: once with the cipher the appliance's connection uses
  (AES-128-GCM) and once with OpenSSH's default.

Odd rounds run the methods in the reverse order of even ones, so that load
from other work falls on each alike. It prints MB/s of instance bytes for
each method and the appliance's speed over sftp's (target: 0.7 or more),
the CPU seconds of the client side (this process and its ssh or sftp
children) and of the sshd sessions, the wall time the appliance spent in
pack writing (read, SHA-256, zstd, AES-GCM, into the spool), upload and
read-back (pack writing runs beside the other two unless
``--prepare-ahead 0``, so these overlap), and CPU seconds per GB for writing
the same packs with and without encryption, without uploading.

Usage: ``.venv/bin/python bench/replicate.py [--scale 0.5] [--rounds 2]
[--client openssh|paramiko] [--prepare-ahead 1] [--level 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from common import (
    BENCH_DIR,
    LOOPBACK,
    Server,
    Servers,
    exit_on_sigterm,
    free_port,
    print_table,
    wait_for_port,
)
from dataset import KINDS, folder_for, generate, total_bytes

from appliance.catalog import replication
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.hsm.packing import LevelAttributes, instance_meta
from appliance.hsm.tiers import ONLINE, Tiers
from appliance.ingest import Ingest
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports import (
    ByteCallback,
    LocalBytes,
    OpensshTransport,
    SftpSettings,
    SftpTransport,
    Transport,
)
from appliance.replication.transports.settings import CLIENTS
from appliance.storage.durable import fsync_directory, fsync_file
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackWriter

STUDIES = 10
TARGET_RATIO = 0.7
BATCH_BYTES = Settings().batch_bytes
SSHD = Path("/usr/sbin/sshd")
# The appliance's SSH connection asks for AES-GCM first (transports/ssh.py,
# transports/sshprocess.py); the first sftp reference is given the cipher it
# ends up with.
APPLIANCE_CIPHER = "aes128-gcm@openssh.com"

VERIFY_OFF = "appliance, verify off"
VERIFY_ON = "appliance, verify on"
SFTP = "sftp, aes128-gcm"
SFTP_DEFAULT = "sftp, default cipher"
METHODS = (VERIFY_OFF, VERIFY_ON, SFTP, SFTP_DEFAULT)
DISK_ROW = "the packs written with a flush each"
PACKING = "  pack writing"
UPLOAD = "  upload"
READ_BACK = "  read-back"

T = TypeVar("T")


# -- measuring --------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock and CPU seconds."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: Timing) -> Timing:
        return Timing(self.wall - other.wall, self.cpu - other.cpu)


class Clock:
    """Seconds since it was made. CPU seconds count every thread of this
    process and the children it waited for (tar, sftp and its ssh)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = _cpu_seconds()

    def timing(self) -> Timing:
        return Timing(time.perf_counter() - self.wall, _cpu_seconds() - self.cpu)


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Run:
    """One method's push of the whole set: its time, the bytes it sent by
    kind (packs, journal, tars), the appliance's steps (wall seconds), the
    cipher used."""

    total: Timing
    sent: dict[str, int]
    steps: dict[str, float] = field(default_factory=dict)
    cipher: str = ""
    server_cpu: float = 0.0  # the sshd session's
    # Seconds to flush what sftp put on the mirror, after ``total``.
    flushed: float = 0.0

    def __add__(self, other: Run) -> Run:
        sent = {k: self.sent.get(k, 0) + other.sent.get(k, 0) for k in other.sent}
        steps = {k: self.steps.get(k, 0.0) + other.steps[k] for k in other.steps}
        total, server_cpu = self.total + other.total, self.server_cpu + other.server_cpu
        flushed = self.flushed + other.flushed
        return Run(total, sent, steps, other.cipher, server_cpu, flushed)


def run_tool(command: list[str]) -> str:
    """Run ``command``, stopping it by its PID if the benchmark stops first;
    its standard error."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, errors = process.communicate()
    finally:
        if process.poll() is None:
            process.terminate()  # sftp passes it on to its ssh
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    text = errors.decode(errors="replace")
    if process.returncode:
        raise SystemExit(f"{command[0]} failed ({process.returncode}):\n{text}")
    return text


def in_batches(items: list[T], size: Callable[[T], int]) -> list[list[T]]:
    """``items`` in order, cut where a batch reaches 64 MB: as
    ``Replicator.ready`` cuts the queue."""
    batches: list[list[T]] = [[]]
    total = 0
    for item in items:
        batches[-1].append(item)
        total += size(item)
        if total >= BATCH_BYTES:
            batches.append([])
            total = 0
    return [batch for batch in batches if batch]


# -- the mirror: sshd on loopback --------------------------------------------------


@dataclass
class Mirror:
    """The loopback sshd standing in for the mirror, and how to log in."""

    port: int
    user: str
    user_key: Path
    known_hosts: Path
    pid: int

    def server_cpu(self) -> float:
        """CPU seconds of every sshd session so far, once the ones still
        open have ended (sshd, their parent, adds them up as it reaps them)."""
        listener = psutil.Process(self.pid)
        deadline = time.monotonic() + 10
        while listener.children() and time.monotonic() < deadline:
            time.sleep(0.02)
        times = listener.cpu_times()
        return times.children_user + times.children_system

    def settings(self, remote: Path, client: str) -> SftpSettings:
        """The appliance's ``[mirror]`` settings, uploading into ``remote``."""
        return SftpSettings(
            host=LOOPBACK,
            user=self.user,
            key_file=self.user_key,
            known_hosts=self.known_hosts,
            port=self.port,
            client=client,
            remote_path=str(remote),
        )

    def sftp_command(self, batch_file: Path, cipher: str | None) -> list[str]:
        """OpenSSH's sftp running ``batch_file``; -v so that the cipher it
        negotiated shows in its log, -F /dev/null to ignore any ssh_config."""
        command = ["sftp", "-v", "-F", "/dev/null", "-b", str(batch_file)]
        command += ["-i", str(self.user_key), "-o", "IdentitiesOnly=yes"]
        command += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        command += ["-o", "GlobalKnownHostsFile=/dev/null"]
        command += ["-o", "StrictHostKeyChecking=yes"]
        if cipher is not None:
            command += ["-o", f"Ciphers={cipher}"]
        return [*command, "-P", str(self.port), f"{self.user}@{LOOPBACK}"]


def make_key(path: Path) -> None:
    """An ed25519 key pair without passphrase: ``path`` and ``path.pub``."""
    command = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench"]
    subprocess.run([*command, "-f", str(path)], check=True, timeout=30)


def public_half(key: Path) -> str:
    return key.with_suffix(".pub").read_text().strip()


def sshd_config(folder: Path, port: int, user: str) -> str:
    """Key login for ``user`` only, on loopback, SFTP in the sshd process."""
    settings = [
        ("ListenAddress", f"{LOOPBACK}:{port}"),
        ("HostKey", folder / "host_ed25519"),
        ("PidFile", folder / "sshd.pid"),
        ("AuthorizedKeysFile", folder / "authorized_keys"),
        ("AllowUsers", user),
        ("PermitRootLogin", "prohibit-password"),
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("UsePAM", "no"),
        ("StrictModes", "no"),  # the temp dir is not a home folder
        ("AllowTcpForwarding", "no"),
        ("X11Forwarding", "no"),
        ("Subsystem", "sftp internal-sftp"),
    ]
    return "".join(f"{key} {value}\n" for key, value in settings)


@contextmanager
def loopback_sshd(folder: Path) -> Iterator[Mirror]:
    """sshd on a free loopback port with keys made in ``folder``; it and the
    sessions it forked are stopped by PID when the block ends."""
    folder.mkdir()
    make_key(folder / "host_ed25519")
    make_key(folder / "user_ed25519")
    (folder / "authorized_keys").write_text(public_half(folder / "user_ed25519"))
    port, user = free_port(), getpass.getuser()
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(
        f"[{LOOPBACK}]:{port} {public_half(folder / 'host_ed25519')}"
    )
    config = folder / "sshd_config"
    config.write_text(sshd_config(folder, port, user))

    command = [str(SSHD), "-D", "-e", "-f", str(config)]
    with Servers() as servers:
        server = servers.start("sshd", command, folder / "sshd.log")
        try:
            wait_for_port(server, port)
            user_key = folder / "user_ed25519"
            yield Mirror(port, user, user_key, known_hosts, server.process.pid)
        finally:
            stop_sessions(server)


def stop_sessions(server: Server) -> None:
    """SIGTERM, by PID, the processes sshd forked for connections (they
    outlive the listener), and SIGKILL any still there after 10 s."""
    try:
        sessions = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for session in sessions:
        with contextlib.suppress(psutil.NoSuchProcess):
            session.terminate()
    _, alive = psutil.wait_procs(sessions, timeout=10)
    for session in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            session.kill()


# -- the archive ------------------------------------------------------------------


@dataclass
class Archive:
    """A catalog, an online tier and a key store; no pack tier."""

    catalog: Catalog
    online: OnlineTier
    keys: KeyStore

    def tiers(self) -> Tiers:
        return Tiers(self.online, {}, self.keys)

    def online_file(self, record: InstanceRecord) -> Path:
        online = record.copy_on(ONLINE)
        assert online is not None, f"{record.sop_instance_uid} is not online"
        return self.online.path_of(online.location)


@contextmanager
def open_archive(root: Path) -> Iterator[Archive]:
    """The archive under ``root`` (made if new), closed when the block ends."""
    catalog = Catalog(root / "catalog", map_size=2**32)
    try:
        online = OnlineTier(root / "online")
        online.open()
        keys = KeyStore.create_if_missing(key_store_path(root))
        yield Archive(catalog, online, keys)
    finally:
        catalog.close()


def import_all(archive: Archive, paths: list[Path]) -> None:
    """Store every file on the online tier, as ``appliance import`` does;
    this queues each for the mirror."""
    ingest = Ingest(archive.catalog, archive.online, "refuse")
    try:
        for path in paths:
            result = ingest.import_file(path, "bench")
            if not result.ok:
                raise SystemExit(f"import of {path} failed: {result.reason}")
    finally:
        ingest.close()


def clone_archive(master: Path, copy: Path) -> None:
    """A copy of the closed archive ``master`` for one run: its own catalog
    and key store, the online files hard-linked (replication reads them)."""
    copy.mkdir()
    shutil.copytree(master / "catalog", copy / "catalog")
    shutil.copytree(master / "keys", copy / "keys")
    shutil.copytree(master / "online", copy / "online", copy_function=os.link)


def queued_records(archive: Archive) -> list[InstanceRecord]:
    """The catalog records of the queue, oldest first."""
    found = []
    with archive.catalog.read() as txn:
        for entry in replication.queued(archive.catalog):
            record = archive.catalog.instance(txn, entry.sop_instance_uid)
            assert record is not None, f"{entry.sop_instance_uid} is not recorded"
            found.append(record)
    return found


# -- the appliance ----------------------------------------------------------------


class CountingTransport:
    """The SFTP transport ``client`` names, adding up what ``put`` sends and
    how long it takes (wall-clock: packing runs beside it)."""

    def __init__(self, settings: SftpSettings) -> None:
        kinds = {"openssh": OpensshTransport, "paramiko": SftpTransport}
        self.inner: Transport = kinds[settings.client](settings)
        self.upload = 0.0
        self.sent: dict[str, int] = {}  # by the first part of the remote name
        self.cipher = ""

    def put(
        self,
        name: str,
        source: LocalBytes,
        size: int,
        sha256: str,
        progress: ByteCallback | None = None,
        throttle: ByteCallback | None = None,
    ) -> None:
        started = time.perf_counter()
        self.inner.put(name, source, size, sha256, progress, throttle)
        self.upload += time.perf_counter() - started
        kind = name.split("/")[0]
        self.sent[kind] = self.sent.get(kind, 0) + size
        if not self.cipher:
            self.cipher = self._cipher()

    def get(self, name: str) -> Any:
        return self.inner.get(name)

    def size(self, name: str) -> int | None:
        return self.inner.size(name)

    def connect(self) -> None:
        self.inner.connect()

    def close(self) -> None:
        self.inner.close()

    def _cipher(self) -> str:
        # A look inside the connection, for the report only.
        session = getattr(self.inner, "_session", None)
        if isinstance(self.inner, OpensshTransport) and session is not None:
            return str(session.cipher)
        if session is not None:
            ssh = session.client.get_transport()
            return str(ssh.local_cipher) if ssh is not None else "?"
        return "?"


class TimedReplicator(Replicator):
    """The replicator, adding up the wall time of its pack writing (in
    whichever thread) and read-back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing = 0.0
        self.read_back = 0.0

    def _write_pack(self, *args: Any) -> tuple[Any, set[str], str, Any]:
        started = time.perf_counter()
        try:
            return super()._write_pack(*args)
        finally:
            self.packing += time.perf_counter() - started

    def _verify_remote(self, *args: Any) -> None:
        started = time.perf_counter()
        try:
            super()._verify_remote(*args)
        finally:
            self.read_back += time.perf_counter() - started


@dataclass
class Choices:
    """How the appliance runs: its SFTP client, how far it packs ahead,
    the zstd level of its packs."""

    client: str
    prepare_ahead: int
    level: int


def appliance_run(
    master: Path, work: Path, mirror: Mirror, verify: bool, count: int, how: Choices
) -> Run:
    """Replicate a copy of the archive to an empty folder on the mirror."""
    root, remote = work / "run", work / "mirror-files"
    clone_archive(master, root)
    remote.mkdir()
    try:
        with open_archive(root) as archive:
            settings = mirror.settings(remote, how.client)
            chosen = Settings(
                batch_seconds=0.0,
                verify_after_upload=verify,
                prepare_ahead=how.prepare_ahead,
                compression_level=how.level,
            )
            return replicate_all(archive, settings, chosen, count, root / "spool")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(remote, ignore_errors=True)


def replicate_all(
    archive: Archive, settings: SftpSettings, chosen: Settings, count: int, spool: Path
) -> Run:
    """``ready()`` and ``send()`` until nothing waits, timed."""
    transport = CountingTransport(settings)
    # Read-backs over a second connection, as the replication process does.
    verifier = CountingTransport(settings) if chosen.verify_after_upload else None
    replicator = TimedReplicator(
        archive.catalog, archive.tiers(), transport, spool, chosen, verifier=verifier
    )
    sent = 0
    try:
        clock = Clock()
        while (batch := replicator.ready()) or replicator.waiting():
            done = replicator.send(batch)
            sent += done.instances if done is not None else 0
        replicator.close()
        total = clock.timing()
    finally:
        replicator.close()
        transport.close()
        if verifier is not None:
            verifier.close()

    left = replication.queue_state(archive.catalog).instances
    if sent != count or left:
        raise SystemExit(f"replication sent {sent} of {count}, {left} still queued")
    steps = {PACKING: replicator.packing, UPLOAD: transport.upload}
    if chosen.verify_after_upload:
        steps[READ_BACK] = replicator.read_back
    return Run(total, transport.sent, steps, transport.cipher)


def pack_writing(
    archive: Archive, spool: Path, encrypted: bool, level: int, keep: Path | None = None
) -> Timing:
    """The packs of the queue, cut as the replicator cuts it, written into
    a spool file as ``Replicator._write_pack`` writes them; no upload. The
    packs are moved into ``keep`` if given, else removed."""
    spool.mkdir(exist_ok=True)
    total = Timing()
    batches = in_batches(queued_records(archive), lambda record: record.size)
    for number, records in enumerate(batches, 1):
        path = spool / f"{number}.pack"
        clock = Clock()
        levels = LevelAttributes(archive.catalog)
        items = [(instance_meta(r, levels), archive.online_file(r)) for r in records]
        key = archive.keys.new_data_key() if encrypted else None
        with open(path, "wb") as out:
            writer = PackWriter(out, f"p-{number:09d}", None, key, level=level)
            writer.add_all(items)
            writer.close()
        total += clock.timing()
        if keep is None:
            path.unlink()
        else:
            keep.mkdir(exist_ok=True)
            path.rename(keep / path.name)
    return total


def packs_flushed(packs: Path, folder: Path) -> float:
    """Seconds to copy the packs (in the page cache) into ``folder``, each
    flushed and then the folder: what the mirror must do to keep them, on
    this machine's disk, whoever sends them."""
    folder.mkdir()
    for path in sorted(packs.iterdir()):
        path.read_bytes()  # into the page cache: not timed
    started = time.perf_counter()
    try:
        for path in sorted(packs.iterdir()):
            with open(folder / path.name, "wb") as out:
                out.write(path.read_bytes())
                out.flush()
                os.fsync(out.fileno())
        fsync_directory(folder)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def flush_files(folder: Path) -> float:
    """Seconds to flush every file in ``folder``, then the folder."""
    started = time.perf_counter()
    for path in sorted(folder.iterdir()):
        fsync_file(path)
    fsync_directory(folder)
    return time.perf_counter() - started


# -- the reference: OpenSSH's sftp ------------------------------------------------


def reference_tars(paths: list[Path], root: Path, folder: Path) -> list[Path]:
    """One tar per 64 MB of instance files (under ``root``), in queue
    order, as the replicator batches them."""
    folder.mkdir()
    tars = []
    for number, batch in enumerate(in_batches(paths, _size_of), 1):
        tar = folder / f"{number:04d}.tar"
        names = [str(path.relative_to(root)) for path in batch]
        run_tool(["tar", "-cf", str(tar), "-C", str(root), *names])
        tars.append(tar)
    return tars


def _size_of(path: Path) -> int:
    return path.stat().st_size


def sftp_run(mirror: Mirror, tars: list[Path], work: Path, cipher: str | None) -> Run:
    """``sftp -b`` putting every tar into an empty folder on the mirror."""
    remote = work / "mirror-files"
    remote.mkdir()
    batch_file = work / "sftp-batch"
    lines = [f'put "{tar}" "{remote / tar.name}"\n' for tar in tars]
    batch_file.write_text("".join(lines))
    try:
        clock = Clock()
        log = run_tool(mirror.sftp_command(batch_file, cipher))
        total = clock.timing()
        for tar in tars:
            if (remote / tar.name).stat().st_size != tar.stat().st_size:
                raise SystemExit(f"sftp: {tar.name} arrived with another size")
        flushed = flush_files(remote)
    finally:
        shutil.rmtree(remote, ignore_errors=True)
    found = re.search(r"kex: client->server cipher: (\S+)", log)
    sent = {"tars": sum(tar.stat().st_size for tar in tars)}
    return Run(total, sent, cipher=found.group(1) if found else "?", flushed=flushed)


# -- the run ----------------------------------------------------------------------


def replication_set(scale: float) -> list[Path]:
    """Whole ``ct`` studies of 200 instances: 10 of them at full scale."""
    kind = KINDS["ct"]
    per_study = kind.per_series * kind.series_per_study
    return generate("ct", max(1, round(STUDIES * scale)) * per_study)


@dataclass
class Setup:
    """What every round uses: the imported archive, the tars, the mirror."""

    master: Path
    tars: list[Path]
    mirror: Mirror
    work: Path
    count: int
    how: Choices
    # The encrypted packs of the set, as pack writing alone wrote them.
    packs: Path


def measure(method: str, setup: Setup) -> Run:
    """One push of the whole set by ``method``."""
    if method in (VERIFY_OFF, VERIFY_ON):
        verify = method == VERIFY_ON
        return appliance_run(
            setup.master, setup.work, setup.mirror, verify, setup.count, setup.how
        )
    cipher = APPLIANCE_CIPHER if method == SFTP else None
    return sftp_run(setup.mirror, setup.tars, setup.work, cipher)


def measure_rounds(
    setup: Setup, rounds: int, megabytes: float
) -> tuple[dict[str, list[Run]], list[float]]:
    """Every method once per round, the order reversed every other round;
    then, in each round, the mirror's disk alone (see :func:`packs_flushed`)."""
    runs: dict[str, list[Run]] = {method: [] for method in METHODS}
    disk: list[float] = []
    for number in range(rounds):
        order = METHODS if number % 2 == 0 else METHODS[::-1]
        for method in order:
            before = setup.mirror.server_cpu()
            run = measure(method, setup)
            run.server_cpu = setup.mirror.server_cpu() - before
            runs[method].append(run)
            rate = megabytes / run.total.wall
            print(
                f"  round {number + 1}: {method}: {run.total.wall:.2f} s, "
                f"{rate:.1f} MB/s, CPU {run.total.cpu:.1f} s, "
                f"sshd CPU {run.server_cpu:.1f} s",
                flush=True,
            )
        disk.append(packs_flushed(setup.packs, setup.work / "disk-alone"))
        print(f"  round {number + 1}: {DISK_ROW}: {disk[-1]:.2f} s", flush=True)
    return runs, disk


def kept_packs(master: Path) -> Path:
    """Where the encrypted packs written without uploading are kept."""
    return master.parent / "packs"


def prepare(paths: list[Path], master: Path, level: int) -> dict[str, Timing]:
    """Import the set into the master archive; time writing its packs
    without uploading, unencrypted and encrypted."""
    with open_archive(master) as archive:
        started = time.perf_counter()
        import_all(archive, paths)
        print(f"  imported in {time.perf_counter() - started:.1f} s (not timed)")
        spool = master.parent / "spool"
        packing = {
            "unencrypted": pack_writing(archive, spool, False, level),
            "encrypted": pack_writing(archive, spool, True, level, kept_packs(master)),
        }
        shutil.rmtree(spool)
    return packing


def run(args: argparse.Namespace, work: Path) -> None:
    paths = replication_set(args.scale)
    megabytes = total_bytes(paths) / 1e6
    print(f"replicate: {len(paths)} instances, {megabytes:.0f} MB")
    how = Choices(args.client, args.prepare_ahead, args.level)
    print(
        f"appliance: client {how.client}, prepare_ahead {how.prepare_ahead}, "
        f"zstd level {how.level}"
    )
    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    packing = prepare(paths, work / "master", how.level)
    started = time.perf_counter()
    root = folder_for("ct", len(paths))
    tars = reference_tars(paths, root, work / "tars")
    print(f"  {len(tars)} tars made in {time.perf_counter() - started:.1f} s")

    with loopback_sshd(work / "sshd") as mirror:
        packs = kept_packs(work / "master")
        setup = Setup(work / "master", tars, mirror, work, len(paths), how, packs)
        runs, disk = measure_rounds(setup, args.rounds, megabytes)

    report(runs, megabytes)
    report_disk(runs, disk, packs)
    report_cpu(runs, packing, megabytes)
    print("\nload average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


# -- the report -------------------------------------------------------------------


def summed(runs: list[Run]) -> Run:
    total = runs[0]
    for run in runs[1:]:
        total = total + run
    return total


def report(runs: dict[str, list[Run]], megabytes: float) -> None:
    """The table of methods and steps, then the appliance against sftp."""
    rounds = len(runs[SFTP])
    data = megabytes * rounds
    totals = {method: summed(runs[method]) for method in METHODS}
    headers = ["method", "MB data", "MB sent", "seconds", "MB/s", "CPU s"]
    headers += ["sshd CPU s", "ratio"]
    rows = []
    for method in METHODS:
        run = totals[method]
        ratio = totals[SFTP].total.wall / run.total.wall
        rows.append(
            [
                method,
                f"{data:.0f}",
                f"{sum(run.sent.values()) / 1e6:.0f}",
                f"{run.total.wall:.2f}",
                f"{data / run.total.wall:.1f}",
                f"{run.total.cpu:.1f}",
                f"{run.server_cpu:.1f}",
                f"{ratio:.2f}" if method.startswith("appliance") else "",
            ]
        )
        for step, seconds in run.steps.items():
            rows.append([step, "", "", f"{seconds:.2f}", "", "", "", ""])
    print(f"\nsums over {rounds} round(s); MB/s are of instance data")
    print_table(headers, rows)
    print(f"ratio: the appliance's speed over that of {SFTP}")
    print("steps: wall seconds; pack writing runs beside upload and read-back")
    print()
    _report_sent(totals)
    for appliance in (VERIFY_OFF, VERIFY_ON):
        for reference in (SFTP, SFTP_DEFAULT):
            _report_ratio(runs, appliance, reference)


def _report_sent(totals: dict[str, Run]) -> None:
    for method in METHODS:
        run = totals[method]
        parts = ", ".join(
            f"{kind} {size / 1e6:.1f} MB" for kind, size in run.sent.items()
        )
        print(f"{method}: {run.cipher}; {parts}")
    print()


def _report_ratio(runs: dict[str, list[Run]], appliance: str, reference: str) -> None:
    mine, theirs = summed(runs[appliance]), summed(runs[reference])
    ratio = theirs.total.wall / mine.total.wall
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    by_round = ", ".join(
        f"{b.total.wall / a.total.wall:.2f}x"
        for a, b in zip(runs[appliance], runs[reference], strict=True)
    )
    print(f"{appliance} / {reference}: {ratio:.2f}x ({verdict}, target {TARGET_RATIO})")
    print(f"  round by round: {by_round}")


def report_disk(runs: dict[str, list[Run]], disk: list[float], packs: Path) -> None:
    """What the disk allows: the mirror flushes each pack before the
    appliance counts it; sftp's files are flushed by nobody. The loopback
    mirror shares this machine's disk."""
    size = sum(path.stat().st_size for path in packs.iterdir())
    floor = sum(disk)
    sftp = summed(runs[SFTP])
    print(
        f"\n{DISK_ROW} (no network, no encryption): {floor:.2f} s, "
        f"{size * len(disk) / 1e6 / floor:.1f} MB/s"
    )
    print(
        f"  {SFTP}'s time over it: {sftp.total.wall / floor:.2f}x, the most "
        "the appliance can reach while the mirror shares this disk"
    )
    mine = summed(runs[VERIFY_OFF])
    print(
        f"{SFTP}, then every file flushed: {sftp.total.wall:.2f} + "
        f"{sftp.flushed:.2f} s; {VERIFY_OFF} over that: "
        f"{(sftp.total.wall + sftp.flushed) / mine.total.wall:.2f}x"
    )


def report_cpu(
    runs: dict[str, list[Run]], packing: dict[str, Timing], megabytes: float
) -> None:
    """CPU seconds per GB of instance data, step by step."""
    gigabytes = megabytes / 1000
    rounds = len(runs[SFTP])
    print(f"\nCPU seconds per GB of instance data ({gigabytes:.2f} GB a run):")
    for method in METHODS:
        run = summed(runs[method])
        client = run.total.cpu / rounds / gigabytes
        server = run.server_cpu / rounds / gigabytes
        print(f"  {method}: client {client:.2f} (with ssh), sshd {server:.2f}")
    for kind, timing in packing.items():
        print(
            f"  pack writing alone, {kind}: {timing.cpu / gigabytes:.2f} "
            f"({megabytes / timing.wall:.0f} MB/s, no upload)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the set")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", choices=CLIENTS, default=SftpSettings.client)
    parser.add_argument(
        "--prepare-ahead", type=int, default=Settings.prepare_ahead, metavar="N"
    )
    parser.add_argument(
        "--level", type=int, default=Settings.compression_level, metavar="N"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    if args.prepare_ahead < 0:
        parser.error("--prepare-ahead must be 0 or more")
    exit_on_sigterm()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for tool in ("tar", "sftp", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is missing: apt-get install -y openssh-client tar"
            )
    if not SSHD.exists():
        raise SystemExit(f"{SSHD} is missing: apt-get install -y openssh-server")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        raise SystemExit("sshd run as root needs /run/sshd: mkdir -m 755 /run/sshd")

    (BENCH_DIR / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="replicate-", dir=BENCH_DIR / "out"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
