"""Hardware: profiles, host checks on fabricated /proc, /sys and /dev trees,
retention and sizing, and the ``appliance hardware`` commands."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.config import default_rules
from appliance.hardware import procfs
from appliance.hardware.check_devices import check_devices
from appliance.hardware.checks import inspect
from appliance.hardware.findings import Finding, worst
from appliance.hardware.mdstat import parse_mdstat
from appliance.hardware.probe import Probe
from appliance.hardware.profile import (
    REPOSITORY_PROFILES,
    ProfileError,
    available,
    find_profile,
    load_profile,
)
from appliance.hardware.retention import derive, rule_day
from appliance.hardware.site import AreaSite, Site
from appliance.hardware.sizing import Media, Workload, size
from appliance.hardware.units import parse_size
from appliance.hsm.policy import AnyOf, Between, Rule

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
TB = 10**12
GB = 10**9
MiB = 2**20


# --- a fabricated host ---------------------------------------------------------


@dataclass
class Host:
    """A made-up server below a temporary root: which /proc fixtures it has,
    its tape devices, programs, folders and file system sizes."""

    files: dict[str, str | None] = field(
        default_factory=lambda: {
            "proc/mdstat": "mdstat-healthy.txt",
            "proc/self/mounts": "mounts-small-clinic.txt",
            "proc/meminfo": "meminfo.txt",
            "proc/self/limits": "limits.txt",
            "proc/self/status": "status.txt",
        }
    )
    # (target, old text, new text) applied after copying
    edits: tuple[tuple[str, str, str], ...] = ()
    drives: tuple[tuple[int, str, str], ...] = ((0, "IBM", "ULT3580-HH9"),)
    generics: tuple[tuple[str, int, str, str], ...] = (
        ("sg0", 0, "ATA", "Samsung SSD 870"),
        ("sg1", 1, "IBM", "ULT3580-HH9"),
    )
    devices: tuple[str, ...] = ("/dev/nst0",)
    tools: tuple[str, ...] = ("mt",)
    folders: tuple[str, ...] = (
        "/srv/pacs/online/data",
        "/srv/pacs/online/catalog",
        "/srv/pacs/nearline/packs",
    )
    # mount point -> (total bytes, free bytes)
    disks: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {
            "/": (100 * GB, 60 * GB),
            "/srv/pacs/online": (3_840 * GB, 3_000 * GB),
            "/srv/pacs/nearline": (32 * TB, 20 * TB),
        }
    )
    # mount point -> bytes reserved for root (not in free, not in used)
    reserved: dict[str, int] = field(default_factory=dict)

    def build(self, root: Path) -> Path:
        for target, fixture in self.files.items():
            if fixture is not None:
                _write(root / target, (FIXTURES / fixture).read_text())
        for target, old, new in self.edits:
            text = (root / target).read_text()
            assert old in text, (target, old)
            (root / target).write_text(text.replace(old, new))
        for index, vendor, model in self.drives:
            for name in (f"st{index}", f"nst{index}", f"nst{index}a"):
                _device_folder(root / "sys/class/scsi_tape" / name, vendor, model)
        for name, kind, vendor, model in self.generics:
            folder = root / "sys/class/scsi_generic" / name
            _device_folder(folder, vendor, model)
            _write(folder / "device/type", f"{kind}\n")
        for device in self.devices:
            _write(root / device.lstrip("/"), "")
        for tool in self.tools:
            _write(root / "usr/bin" / tool, "#!/bin/sh\n").chmod(0o755)
        for folder in self.folders:
            (root / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
        return root

    def probe(self, root: Path) -> Probe:
        def disk_usage(path: str) -> SimpleNamespace:
            inside = "/" + str(Path(path).relative_to(root)).lstrip(".")
            point = max(
                (p for p in self.disks if inside == p or inside.startswith(p + "/")),
                key=len,
                default="/",
            )
            total, free = self.disks[point]
            used = total - free - self.reserved.get(point, 0)
            return SimpleNamespace(total=total, used=used, free=free)

        return Probe(root, disk_usage)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _device_folder(folder: Path, vendor: str, model: str) -> None:
    _write(folder / "device/vendor", f"{vendor:<8}\n")
    _write(folder / "device/model", f"{model:<16}\n")


CLINIC = Site(
    areas=(
        AreaSite("online", "/srv/pacs/online/data", 0, 85, 75, 64 * MiB),
        AreaSite("nearline", "/srv/pacs/nearline/packs", 0, 90, 80),
        AreaSite("catalog", "/srv/pacs/online/catalog"),
    ),
    volumes_kind="tape",
    tape_device="/dev/nst0",
)


def _check(
    tmp_path: Path, host: Host, site: Site = CLINIC, profile: str = "small-clinic"
) -> list[Finding]:
    root = host.build(tmp_path / "root")
    loaded = load_profile(REPOSITORY_PROFILES / f"{profile}.toml")
    return inspect(loaded, site, host.probe(root))


def _not_ok(findings: list[Finding]) -> list[str]:
    return [finding.line() for finding in findings if finding.status != "OK"]


def _area(site: Site, name: str, **changes: Any) -> Site:
    areas = tuple(
        replace(area, **changes) if area.name == name else area for area in site.areas
    )
    return replace(site, areas=areas)


# --- checks --------------------------------------------------------------------


def test_a_healthy_small_clinic_passes_every_check(tmp_path):
    findings = _check(tmp_path, Host())

    assert _not_ok(findings) == []
    checks = {finding.check for finding in findings}
    assert {"memory", "cpu", "open-files", "raid md0", "raid md1"} <= checks
    assert {"online mount", "nearline capacity", "tape drive", "tool mt"} <= checks
    assert "OK    tape drive: nst0 (IBM ULT3580-HH9) at /dev/nst0" in [
        finding.line() for finding in findings
    ]


def _without_md1(host: Host) -> Host:
    line = (
        "/dev/md1 /srv/pacs/nearline xfs rw,noatime,attr2,inode64,logbufs=8,"
        "logbsize=32k,sunit=1024,swidth=4096,noquota 0 0\n"
    )
    return replace(host, edits=(("proc/self/mounts", line, ""),))


def _mounts(old: str, new: str) -> Host:
    return Host(edits=(("proc/self/mounts", old, new),))


def _fixture(target: str, name: str | None) -> Host:
    host = Host()
    host.files[target] = name
    return host


def _disk(point: str, total: int, free: int) -> Host:
    host = Host()
    host.disks[point] = (total, free)
    return host


# (host, site, check, status, words in the message or action)
FAULTS = [
    pytest.param(
        _fixture("proc/mdstat", "mdstat-raid1-degraded.txt"),
        CLINIC,
        "raid md0",
        "FAIL",
        "raid1 [2/1] [U_]: degraded, 1 of 2 members missing, no rebuild running",
        id="raid1-degraded",
    ),
    pytest.param(
        _fixture("proc/mdstat", "mdstat-failed-member.txt"),
        CLINIC,
        "raid md0",
        "FAIL",
        "failed member(s) sdb1; do: mdadm /dev/md0 --remove /dev/sdb1",
        id="failed-member",
    ),
    pytest.param(
        _fixture("proc/mdstat", "mdstat-raid1-rebuilding.txt"),
        CLINIC,
        "raid md0",
        "FAIL",
        "recovery 48.6%, about 42 min left; no redundancy until it ends",
        id="raid1-rebuilding",
    ),
    pytest.param(
        _fixture("proc/mdstat", "mdstat-inactive.txt"),
        CLINIC,
        "raid md1",
        "FAIL",
        "inactive (members: sdd1, sdc1)",
        id="array-inactive",
    ),
    pytest.param(
        _fixture("proc/mdstat", None),
        CLINIC,
        "online raid",
        "FAIL",
        "there is no /proc/mdstat",
        id="no-software-raid",
    ),
    pytest.param(
        _without_md1(Host()),
        CLINIC,
        "nearline mount",
        "FAIL",
        "is on / (/dev/nvme0n1p2), not on its own file system at "
        "/srv/pacs/nearline: that file system is not mounted",
        id="nearline-not-mounted",
    ),
    pytest.param(
        _mounts(
            "/dev/md0 /srv/pacs/online xfs rw,", "/dev/md0 /srv/pacs/online xfs ro,"
        ),
        CLINIC,
        "online mount",
        "FAIL",
        "/srv/pacs/online (/dev/md0) is mounted read-only",
        id="online-read-only",
    ),
    pytest.param(
        _mounts("/dev/md0 /srv/pacs/online", "/dev/sdz1 /srv/pacs/online"),
        CLINIC,
        "online mount",
        "FAIL",
        "mounted from /dev/sdz1, the profile expects /dev/md0",
        id="online-wrong-device",
    ),
    pytest.param(
        _mounts("/dev/md1 /srv/pacs/nearline xfs", "tmpfs /srv/pacs/nearline tmpfs"),
        CLINIC,
        "nearline mount",
        "FAIL",
        "is on tmpfs at /srv/pacs/nearline: lost at reboot",
        id="nearline-on-tmpfs",
    ),
    pytest.param(
        _fixture("proc/meminfo", "meminfo-8g.txt"),
        CLINIC,
        "memory",
        "FAIL",
        "7.7 GiB, the profile asks for 16 GiB",
        id="too-little-memory",
    ),
    pytest.param(
        Host(edits=(("proc/self/status", "0-7", "0-1"),)),
        CLINIC,
        "cpu",
        "FAIL",
        "2 core(s) usable, the profile asks for 4",
        id="too-few-cores",
    ),
    pytest.param(
        Host(edits=(("proc/self/limits", "65536  ", "1024   "),)),
        CLINIC,
        "open-files",
        "FAIL",
        "soft 1024, hard 524288, the profile asks for 65536; do: set LimitNOFILE=65536",
        id="open-files-limit",
    ),
    pytest.param(
        Host(drives=()),
        CLINIC,
        "tape drive",
        "FAIL",
        "/dev/nst0 is not a drive of /sys/class/scsi_tape (found: none)",
        id="no-tape-drive",
    ),
    pytest.param(
        Host(devices=()),
        CLINIC,
        "tape drive",
        "FAIL",
        "is listed, but /dev/nst0 does not exist",
        id="no-device-file",
    ),
    pytest.param(
        Host(tools=()),
        CLINIC,
        "tool mt",
        "FAIL",
        "mt is not installed; do: apt-get install mt-st",
        id="mt-missing",
    ),
    pytest.param(
        _disk("/srv/pacs/online", 1 * TB, 900 * GB),
        CLINIC,
        "online capacity",
        "FAIL",
        "file system of 1.00 TB, the profile expects 3.84 TB",
        id="online-too-small",
    ),
    pytest.param(
        _disk("/srv/pacs/online", 3_840 * GB, 10 * MiB),
        CLINIC,
        "online space",
        "FAIL",
        "so stores are refused (0xA700)",
        id="online-full",
    ),
    pytest.param(
        Host(),
        replace(CLINIC, tape_device="/dev/st0"),
        "tape drive",
        "FAIL",
        "rewinds at every close",
        id="rewinding-device",
    ),
    pytest.param(
        Host(),
        replace(CLINIC, volumes_kind="directory"),
        "offline",
        "FAIL",
        "the configuration has a directory library, the profile expects tape",
        id="library-kind",
    ),
    pytest.param(
        Host(),
        _area(CLINIC, "online", capacity_bytes=10 * TB),
        "online capacity_bytes",
        "FAIL",
        "online.capacity_bytes is 10.00 TB, more than the file system's 3.84 TB",
        id="capacity-bytes-too-large",
    ),
    pytest.param(
        Host(),
        _area(CLINIC, "online", path="/var/lib/pacs/online"),
        "online mount",
        "FAIL",
        "/var/lib/pacs/online is not under the profile's mount point /srv/pacs/online",
        id="online-outside-mount",
    ),
    pytest.param(
        Host(),
        replace(CLINIC, mirror_kind="sftp"),
        "mirror",
        "FAIL",
        "the configuration has a sftp mirror, the profile expects directory",
        id="mirror-kind",
    ),
]


@pytest.mark.parametrize(("host", "site", "check", "status", "words"), FAULTS)
def test_each_fault_is_reported_with_what_to_do(
    tmp_path, host, site, check, status, words
):
    findings = _check(tmp_path, host, site)

    matching = [f for f in findings if f.check == check and f.status == status]
    assert matching, _not_ok(findings)
    assert any(words in f.line() for f in matching), [f.line() for f in matching]
    assert all(f.action for f in findings if f.status != "OK")
    assert worst(findings) == "FAIL"


WARNINGS = [
    pytest.param(
        _fixture("proc/mdstat", "mdstat-raid6-rebuilding.txt"),
        CLINIC,
        "raid md1",
        "raid6 [6/5] [UUU_UU]: rebuilding, recovery 17.3%, about 9.4 h left; "
        "redundancy is reduced",
        id="raid6-rebuilding",
    ),
    pytest.param(
        _fixture("proc/mdstat", "mdstat-resync.txt"),
        CLINIC,
        "raid md1",
        "resync 2.1%, about 21.9 h left",
        id="resync",
    ),
    pytest.param(
        _disk("/srv/pacs/nearline", 32 * TB, 2 * TB),
        CLINIC,
        "nearline space",
        "2.00 TB free of 32.00 TB: less than the 3.20 TB above the high "
        "watermark (90%)",
        id="nearline-nearly-full",
    ),
    pytest.param(
        Host(drives=((0, "IBM", "ULT3580-HH8"),)),
        CLINIC,
        "tape generation",
        "the drive is LTO-8, the profile expects LTO-9 cartridges",
        id="older-drive",
    ),
    pytest.param(
        Host(
            folders=(
                "/srv/pacs/online/data",
                "/srv/pacs/online/catalog",
                "/srv/pacs/nearline",
            )
        ),
        CLINIC,
        "nearline folder",
        "/srv/pacs/nearline/packs does not exist yet (measured at /srv/pacs/nearline)",
        id="folder-missing",
    ),
    pytest.param(
        Host(),
        replace(CLINIC, simulated_path="/var/lib/pacs/sim"),
        "tape",
        "the drive and changer are simulated in /var/lib/pacs/sim",
        id="simulated-tape",
    ),
]


@pytest.mark.parametrize(("host", "site", "check", "words"), WARNINGS)
def test_conditions_worth_knowing_warn_without_failing(
    tmp_path, host, site, check, words
):
    findings = _check(tmp_path, host, site)

    assert worst(findings) == "WARN", _not_ok(findings)
    warnings = [f for f in findings if f.status == "WARN"]
    assert any(f.check == check and words in f.message for f in warnings), [
        f.line() for f in warnings
    ]
    assert all(f.action for f in warnings)


def test_headroom_is_measured_without_the_root_reserve(tmp_path):
    # 5% of 32 TB reserved for root: the appliance can fill 30.4 TB, and the
    # 90% mark leaves 3.04 TB above it, less than the 3.1 TB free.
    host = _disk("/srv/pacs/nearline", 32 * TB, 3_100 * GB)
    host.reserved["/srv/pacs/nearline"] = 1_600 * GB

    findings = _check(tmp_path, host)

    space = next(f for f in findings if f.check == "nearline space")
    assert space.status == "OK", space.line()


def test_a_scrub_and_an_auto_read_only_array_are_fine(tmp_path):
    findings = _check(tmp_path, _fixture("proc/mdstat", "mdstat-check.txt"))

    assert _not_ok(findings) == []
    lines = [f.line() for f in findings]
    assert "OK    raid md1: raid6 [6/6] [UUUUUU], 1 spare(s): scrub running, " in (
        "\n".join(lines)
    )
    assert any("auto-read-only until its first write" in line for line in lines)


def test_missing_proc_files_warn_instead_of_guessing(tmp_path):
    host = Host()
    for target in ("proc/meminfo", "proc/self/limits", "proc/self/status"):
        host.files[target] = None

    findings = _check(tmp_path, host)

    warned = {f.check for f in findings if f.status == "WARN"}
    assert warned == {"memory", "cpu", "open-files"}


# --- the tape library of the hospital profile ----------------------------------

LIBRARY = Host(
    drives=((0, "IBM", "ULT3580-HH9"), (1, "IBM", "ULT3580-HH9")),
    generics=(
        ("sg3", 1, "IBM", "ULT3580-HH9"),
        ("sg4", 1, "IBM", "ULT3580-HH9"),
        ("sg5", 8, "IBM", "3573-TL"),
    ),
    devices=("/dev/nst0", "/dev/sg5"),
    tools=("mt", "mtx"),
)
HOSPITAL = replace(CLINIC, changer="/dev/sg5", mirror_kind="sftp")


def _devices(tmp_path: Path, host: Host, site: Site) -> dict[str, Finding]:
    root = host.build(tmp_path / "root")
    profile = load_profile(REPOSITORY_PROFILES / "hospital.toml")
    facts = host.probe(root).read(devices=site.devices, tools=("mt", "mtx"))
    return {f.check: f for f in check_devices(profile, site, facts)}


def test_a_library_with_its_changer_passes(tmp_path):
    found = _devices(tmp_path, LIBRARY, HOSPITAL)

    assert [f.line() for f in found.values() if f.status != "OK"] == []
    assert found["tape changer"].message == "sg5 (IBM 3573-TL) at /dev/sg5"


@pytest.mark.parametrize(
    ("host", "site", "check", "words"),
    [
        pytest.param(
            LIBRARY,
            replace(HOSPITAL, changer=""),
            "tape changer",
            "volumes.changer is empty; do: set volumes.changer to the "
            "changer's device (/dev/sg5 (IBM 3573-TL);",
            id="changer-not-configured",
        ),
        pytest.param(
            LIBRARY,
            replace(HOSPITAL, changer="/dev/sg4"),
            "tape changer",
            "/dev/sg4 is not a medium changer of /sys/class/scsi_generic (SCSI type 1)",
            id="changer-is-a-drive",
        ),
        pytest.param(
            replace(LIBRARY, drives=((0, "IBM", "ULT3580-HH9"),)),
            HOSPITAL,
            "tape drives",
            "1 found (nst0 (IBM ULT3580-HH9)), the profile expects 2",
            id="one-drive-missing",
        ),
        pytest.param(
            replace(LIBRARY, tools=("mt",)),
            HOSPITAL,
            "tool mtx",
            "mtx is not installed; do: apt-get install mtx",
            id="mtx-missing",
        ),
    ],
)
def test_library_faults(tmp_path, host, site, check, words):
    found = _devices(tmp_path, host, site)

    assert found[check].status == "FAIL"
    assert words in found[check].line()


def test_the_probe_reads_this_host(tmp_path):
    facts = Probe().read(paths=[str(tmp_path), str(tmp_path / "not-yet")])

    assert facts.memory_bytes and facts.memory_bytes > 0
    assert facts.cpu_cores and facts.cpu_cores >= 1
    assert facts.open_files is not None and facts.mounts
    here, missing = facts.paths[str(tmp_path)], facts.paths[str(tmp_path / "not-yet")]
    assert here.exists and here.space is not None and here.space.total > 0
    assert not missing.exists and missing.measured == here.resolved
    assert procfs.mount_of(here.resolved, list(facts.mounts)) is not None


# --- parsers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "name", "expected"),
    [
        ("mdstat-healthy.txt", "md1", ("raid6", 6, 6, "UUUUUU", (), None, 2)),
        ("mdstat-healthy.txt", "md0", ("raid1", 2, 2, "UU", (), None, 1)),
        ("mdstat-raid1-degraded.txt", "md0", ("raid1", 2, 1, "U_", (), None, 0)),
        ("mdstat-failed-member.txt", "md0", ("raid1", 2, 1, "U_", ("sdb1",), None, 0)),
        (
            "mdstat-raid6-rebuilding.txt",
            "md1",
            ("raid6", 6, 5, "UUU_UU", (), ("recovery", 17.3, 563.2), 1),
        ),
        (
            "mdstat-resync.txt",
            "md1",
            ("raid6", 6, 6, "UUUUUU", (), ("resync", 2.1, 1312.4), 2),
        ),
        (
            "mdstat-resync.txt",
            "md0",
            ("raid1", 2, 2, "UU", (), ("resync", None, None), 1),
        ),
        (
            "mdstat-check.txt",
            "md1",
            ("raid6", 6, 6, "UUUUUU", (), ("check", 66.0, 230.1), 2),
        ),
        ("mdstat-inactive.txt", "md1", (None, None, None, None, (), None, None)),
    ],
)
def test_mdstat_is_parsed(fixture, name, expected):
    arrays = {a.name: a for a in parse_mdstat((FIXTURES / fixture).read_text())}
    array = arrays[name]

    progress = array.progress
    found = (
        array.level,
        array.wanted,
        array.working,
        array.roles,
        tuple(m.name for m in array.failed),
        None
        if progress is None
        else (progress.operation, progress.percent, progress.minutes_left),
        array.redundancy,
    )
    assert found == expected


def test_mdstat_flags_and_states():
    check = {
        a.name: a for a in parse_mdstat((FIXTURES / "mdstat-check.txt").read_text())
    }
    inactive = parse_mdstat((FIXTURES / "mdstat-inactive.txt").read_text())

    assert check["md0"].auto_read_only and not check["md0"].read_only
    assert [m.name for m in check["md1"].members if m.spare] == ["sdk1"]
    assert [(a.name, a.active) for a in inactive] == [("md1", False), ("md0", True)]
    assert parse_mdstat("Personalities : \nunused devices: <none>\n") == []


def test_mounts_are_unescaped_and_the_deepest_mount_wins():
    text = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "/dev/md0 /srv/pacs ext4 rw 0 0\n"
        "/dev/md1 /srv/pacs/near\\040line xfs ro,noatime 0 0\n"
        "/dev/md2 /srv/pacs xfs rw 0 0\n"
    )
    mounts = procfs.parse_mounts(text)

    assert mounts[2].point == "/srv/pacs/near line" and mounts[2].read_only
    assert procfs.mount_of("/srv/pacs/near line/x", mounts).source == "/dev/md1"
    # mounted over: the later mount on the same point hides the earlier one
    assert procfs.mount_of("/srv/pacs/online", mounts).source == "/dev/md2"
    assert procfs.mount_of("/srv/pacsX", mounts).source == "/dev/sda1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Cpus_allowed_list:\t0-3,8\n", 5),
        ("Cpus_allowed_list:\t0\n", 1),
        ("Cpus_allowed_list:\t0-x\n", None),
        ("Name: x\n", None),
    ],
)
def test_cpu_lists(text, expected):
    assert procfs.parse_cpu_list(text) == expected


def test_meminfo_and_limits():
    meminfo = (FIXTURES / "meminfo.txt").read_text()
    limits = (FIXTURES / "limits.txt").read_text()

    assert procfs.parse_meminfo(meminfo) == 32711524 * 1024
    assert procfs.parse_open_files(limits) == (65536, 524288)
    unlimited = limits.replace("524288 ", "unlimited")
    assert procfs.parse_open_files(unlimited) == (65536, None)
    assert procfs.parse_meminfo("") is None


# --- profiles ------------------------------------------------------------------


def test_the_shipped_profiles_load():
    names = {path.stem: load_profile(path) for path in available([REPOSITORY_PROFILES])}

    assert set(names) >= {"evaluation", "small-clinic", "hospital"}
    for stem, profile in names.items():
        assert profile.name == stem
    clinic = names["small-clinic"]
    assert clinic.areas["online"].capacity == 3_840 * GB
    assert clinic.offline is not None and clinic.offline.media_capacity == 18 * TB
    assert names["hospital"].offline.changer is True


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[profile]\nname = 'x'\n", "profile.summary", "is required"),
        ("[profile]\nname='x'\nsummary='y'\n[disks]\n", "disks", "unknown section"),
        (
            "[profile]\nname='x'\nsummary='y'\n[online]\nsize='1T'\n",
            "online.size",
            "unknown key",
        ),
        (
            "[profile]\nname='x'\nsummary='y'\n[online]\ncapacity='lots'\n",
            "online.capacity",
            "must be a size such as",
        ),
        (
            "[profile]\nname='x'\nsummary='y'\n[online]\nmount='srv'\n",
            "online.mount",
            "must be an absolute path",
        ),
        (
            "[profile]\nname='x'\nsummary='y'\n[online]\narray='md0'\n",
            "online.raid",
            "when online.array names a software RAID array",
        ),
        (
            "[profile]\nname='x'\nsummary='y'\n[offline]\nchanger=true\n",
            "offline.changer",
            'applies to kind = "tape" only',
        ),
        (
            "[profile]\nname='x'\nsummary='y'\n[offline]\nkind='tape'\n"
            "generation='LTO-10'\n",
            "offline.generation",
            "must be one of",
        ),
        (
            "[profile]\nname='Big One'\nsummary='y'\n",
            "profile.name",
            "lower-case letters",
        ),
        (
            "[profile]\nname='x'\nsummary='y'\n[host]\nmin_cpu_cores=0\n",
            "host.min_cpu_cores",
            "must be from 1 to 1024 (got 0)",
        ),
        ("[profile\n", "(file)", "is not valid TOML"),
    ],
)
def test_invalid_profiles_name_the_key(tmp_path, text, key, words):
    path = _write(tmp_path / "bad.toml", text)

    with pytest.raises(ProfileError) as raised:
        load_profile(path)

    problems = dict(raised.value.problems)
    assert words in problems[key], problems
    assert str(path) in str(raised.value)


def test_profiles_are_found_by_name_or_file(tmp_path):
    _write(tmp_path / "lab.toml", "[profile]\nname='lab'\nsummary='a lab'\n")

    assert find_profile("lab", [tmp_path]) == tmp_path / "lab.toml"
    assert find_profile("other/lab.toml", [tmp_path]) == Path("other/lab.toml")
    with pytest.raises(ProfileError, match="known profiles: lab"):
        find_profile("nope", [tmp_path])
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("18T", 18 * TB), ("3.84T", 3_840 * GB), ("800G", 800 * GB), ("12 TB", 12 * TB)],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "T", "-1T", "0", "12 XB", "1e3"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


# --- retention -----------------------------------------------------------------


def _rule(name: str, action: str, *conditions: Any, **tiers: str) -> Rule:
    return Rule(
        name,
        action,  # type: ignore[arg-type]
        source=tiers.get("source"),
        target=tiers.get("target"),
        conditions=conditions,
    )


NEARLINE_1 = _rule("n", "copy", Between("days_since_received", 1), target="nearline")
OFFLINE_7 = _rule("o", "copy", Between("days_since_received", 7), target="offline")


@pytest.mark.parametrize(
    ("rules", "min_copies", "mirror", "stays", "note"),
    [
        pytest.param(
            default_rules(),
            2,
            True,
            {"online": (0, 90), "nearline": (1, None), "offline": (7, None)},
            "online: studies leave after 90 day(s) (rule release-online-unused",
            id="defaults",
        ),
        pytest.param(
            (NEARLINE_1, OFFLINE_7, _rule("r", "release", source="online")),
            2,
            True,
            {"online": (0, 1)},
            "online: rule r waits until day 1, when min_copies (2)",
            id="release-waits-for-copies",
        ),
        pytest.param(
            (NEARLINE_1, OFFLINE_7, _rule("r", "release", source="online")),
            2,
            False,
            {"online": (0, 7)},
            "online: rule r waits until day 7",
            id="no-mirror-waits-for-offline",
        ),
        pytest.param(
            (NEARLINE_1, _rule("r", "release", source="online")),
            3,
            False,
            {"online": (0, None)},
            "online: rule r never releases anything",
            id="too-few-copies",
        ),
        pytest.param(
            (
                NEARLINE_1,
                _rule(
                    "mg",
                    "release",
                    Between("days_since_access", 730),
                    AnyOf("modalities", frozenset({"MG"})),
                    source="online",
                ),
                _rule(
                    "other",
                    "release",
                    Between("days_since_access", 90),
                    AnyOf("modalities", frozenset({"MG"}), exclude=True),
                    source="online",
                ),
            ),
            2,
            True,
            {"online": (0, 730)},
            "only rules for some studies release it (mg, other); sized for the "
            "longest stay, 730 day(s)",
            id="conditional-rules-longest",
        ),
        pytest.param(
            (
                _rule(
                    "to-near",
                    "move",
                    Between("study_age_days", 30),
                    Between("days_since_access", 14),
                    source="online",
                    target="nearline",
                ),
            ),
            2,
            True,
            {"online": (0, 30), "nearline": (30, None), "offline": (None, None)},
            "offline: no rule copies or moves studies there",
            id="move-counts-its-copy",
        ),
        pytest.param(
            (NEARLINE_1,),
            2,
            True,
            {"online": (0, None)},
            "online: no rule releases it",
            id="nothing-released",
        ),
    ],
)
def test_retention_follows_the_rules(rules, min_copies, mirror, stays, note):
    retention = derive(rules, min_copies, mirror)

    found = {
        tier: (retention.stays[tier].arrives, retention.stays[tier].leaves)
        for tier in stays
    }
    assert found == stays
    assert any(note in line for line in retention.notes), retention.notes


def test_a_rule_whose_bounds_never_meet_never_acts():
    rule = _rule(
        "never",
        "copy",
        Between("study_age_days", at_least=30),
        Between("days_since_received", at_most=10),
        target="offline",
    )
    assert rule_day(rule) is None
    assert (
        rule_day(
            _rule("half", "copy", Between("days_since_access", 1.5), target="offline")
        )
        == 2
    )


# --- sizing --------------------------------------------------------------------

LOWS = {"online": 75.0, "nearline": 80.0}


@pytest.mark.parametrize(
    ("workload", "rules", "lows", "reserved", "media", "expected"),
    [
        pytest.param(
            Workload(100, 100, 1),
            default_rules(),
            LOWS,
            0,
            Media(18 * TB, 2),
            {
                "online": (90, 900 * GB, 1_200 * GB),
                "nearline": (365, 3_102_500_000_000, 3_878_125_000_000),
                "mirror": (365, 3_102_500_000_000, 3_102_500_000_000),
                "volumes": (3_102_500_000_000, 3.1025 / 18 * 2, 2),
            },
            id="100-studies-1-year",
        ),
        pytest.param(
            Workload(1000, 200, 5),
            default_rules(),
            LOWS,
            64 * MiB,
            Media(12 * TB, 1),
            {
                "online": (90, 18 * TB, 24 * TB + 64 * MiB),
                "nearline": (1825, 310_250 * GB, 387_812_500_000_000),
                "mirror": (1825, 310_250 * GB, 310_250 * GB),
                "volumes": (62_050 * GB, 62.05 / 12, 26),
            },
            id="1000-studies-5-years-lto8",
        ),
        pytest.param(
            Workload(10, 50, 0.1),
            default_rules(),
            {"online": 50.0, "nearline": 50.0},
            0,
            Media(6 * TB, 2),
            {
                "online": (36.5, 18_250_000_000, 36_500_000_000),
                "nearline": (36.5, 15_512_500_000, 31_025_000_000),
                "volumes": (155_125_000_000, 155.125 / 6000 * 2, 2),
            },
            id="shorter-than-the-online-stay",
        ),
        pytest.param(
            Workload(100, 100, 1),
            (NEARLINE_1,),
            {"online": 0.0, "nearline": 80.0},
            0,
            Media(),
            {"online": (365, 3_650 * GB, None), "volumes": None},
            id="no-release-no-offline-low-mark-0",
        ),
    ],
)
def test_sizing_known_answers(workload, rules, lows, reserved, media, expected):
    sizing = size(workload, derive(rules, 2, True), lows, reserved, media)

    needs = {need.tier: need for need in sizing.tiers}
    for tier in ("online", "nearline", "mirror"):
        if tier in expected:
            need = needs[tier]
            assert (need.days, need.held_bytes, need.capacity_bytes) == expected[tier]
    if "volumes" in expected:
        volumes = sizing.volumes
        if expected["volumes"] is None:
            assert volumes is None
        else:
            yearly, per_year, total = expected["volumes"]
            assert volumes is not None
            assert volumes.pack_bytes_per_year == yearly
            assert volumes.per_year == pytest.approx(per_year)
            assert volumes.total == total


def test_sizing_refuses_nonsense():
    with pytest.raises(ValueError, match="studies_per_day must be more than 0"):
        Workload(0, 100, 1)
    with pytest.raises(ValueError, match="copies must be 1 or more"):
        Media(18 * TB, 0)


# --- the command line ------------------------------------------------------------


def _config(tmp_path: Path, **volumes: str) -> Path:
    lines = [
        "[storage]",
        'online_path = "/srv/pacs/online/data"',
        'catalog_path = "/srv/pacs/online/catalog"',
        'nearline_path = "/srv/pacs/nearline/packs"',
        "reserved_bytes = 0",
        f"catalog_max_size = {2**20}",
        "[volumes]",
        'kind = "tape"',
        *(f'{key} = "{value}"' for key, value in volumes.items()),
    ]
    return _write(tmp_path / "appliance.toml", "\n".join(lines) + "\n")


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _cli_check(tmp_path: Path, host: Host, *extra: str) -> Any:
    root = host.build(tmp_path / "root")
    return _cli(
        "hardware",
        "check",
        "--root",
        str(root),
        "--config",
        str(_config(tmp_path)),
        "--profile",
        str(FIXTURES / "clinic-test.toml"),
        *extra,
    )


def test_check_on_a_healthy_host_exits_0(tmp_path):
    result = _cli_check(tmp_path, Host())

    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
    assert "OK    raid md0: raid1 [2/2] [UU]: healthy" in result.output
    assert result.output.startswith("hardware profile: clinic-test (")


def test_check_json_reports_a_failed_member(tmp_path):
    host = _fixture("proc/mdstat", "mdstat-failed-member.txt")

    result = _cli_check(tmp_path, host, "--json")

    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["profile"] == "clinic-test"
    assert report["outcome"] == "FAIL"
    (failed,) = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert failed["check"] == "raid md0"
    assert "failed member(s) sdb1" in failed["message"]
    assert failed["action"].startswith("mdadm /dev/md0 --remove /dev/sdb1")


def test_check_strict_fails_on_a_rebuild(tmp_path):
    host = _fixture("proc/mdstat", "mdstat-raid6-rebuilding.txt")

    relaxed = _cli_check(tmp_path, host)
    strict = _cli_check(tmp_path, host, "--strict")

    assert relaxed.exit_code == 0 and strict.exit_code == 1
    assert "WARN  raid md1: raid6 [6/5] [UUU_UU]: rebuilding" in strict.output


def test_check_text_has_one_line_per_fault(tmp_path):
    host = _without_md1(_fixture("proc/mdstat", "mdstat-raid1-degraded.txt"))

    result = _cli_check(tmp_path, host)

    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("FAIL ")]
    assert [line.split(":")[0] for line in failed] == [
        "FAIL  nearline mount",
        "FAIL  raid md0",
    ]
    assert result.output.splitlines()[-1].startswith("FAIL: 2 failed")


def test_check_with_an_invalid_profile_exits_2(tmp_path):
    bad = _write(tmp_path / "bad.toml", "[profile]\nname = 'x'\n")

    result = _cli("hardware", "check", "--profile", str(bad))

    assert result.exit_code == 2
    assert "profile.summary: is required" in result.output


def test_profiles_lists_the_shipped_ones():
    result = _cli("hardware", "profiles")

    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"evaluation", "hospital", "small-clinic"} <= set(names)


def test_size_json_gives_the_known_answer(tmp_path):
    config = _write(tmp_path / "appliance.toml", "[storage]\nreserved_bytes = 0\n")

    result = _cli(
        "hardware",
        "size",
        "--config",
        str(config),
        "--studies-per-day",
        "100",
        "--mb-per-study",
        "100",
        "--years",
        "1",
        "--json",
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tiers = {tier["tier"]: tier for tier in report["tiers"]}
    assert tiers["online"]["capacity_bytes"] == 1_200 * GB
    assert tiers["nearline"]["capacity_bytes"] == 3_878_125_000_000
    assert report["volumes"]["total"] == 2
    assert report["volumes"]["media"] == {"capacity": 18 * TB, "copies": 2}


def test_size_text_follows_the_configured_rules(tmp_path):
    config = _write(
        tmp_path / "appliance.toml",
        "[online]\nlow_watermark = 50\n"
        "[[rules]]\nname = 'fast'\naction = 'move'\nfrom = 'online'\n"
        "to = 'nearline'\nmin_days_since_received = 14\n",
    )

    result = _cli(
        "hardware",
        "size",
        "--config",
        str(config),
        "--studies-per-day",
        "200",
        "--mb-per-study",
        "150",
        "--years",
        "10",
        "--tape-capacity",
        "12T",
        "--copies-offline",
        "1",
    )

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        "200 studies a day of 150 MB: 30.00 GB a day, 10.95 TB a year; sized "
        "for 10 year(s) under its rules"
    )
    online = next(line for line in lines if line.startswith("online "))
    assert online.split()[1:4] == ["14", "420.00", "GB"]
    assert "offline: no rule copies studies to offline volumes" in lines
    assert "- online: studies leave after 14 day(s) (rule fast: " in result.output


def test_size_refuses_a_bad_tape_capacity():
    result = _cli(
        "hardware",
        "size",
        "--studies-per-day",
        "1",
        "--mb-per-study",
        "1",
        "--years",
        "1",
        "--tape-capacity",
        "big",
    )

    assert result.exit_code == 2
    assert "--tape-capacity" in result.output


def test_size_refuses_a_workload_that_is_not_a_number():
    result = _cli(
        "hardware",
        "size",
        "--studies-per-day",
        "nan",
        "--mb-per-study",
        "1",
        "--years",
        "1",
    )

    assert result.exit_code == 2
    assert "studies_per_day must be a number" in result.output
