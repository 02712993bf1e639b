"""The systemd units in systemd/: every key known and valid to systemd, and
the service's sandbox at or below an agreed exposure.

``systemd-analyze verify`` exits 0 even on an unknown key or a value out of
range (it only warns), so a unit passes only with nothing on stderr. It also
checks that every Exec*= program exists: the units are verified unchanged
inside a scratch root (``--root``) holding the system's own units and an
empty executable at each path the units run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.dicom import worker
from appliance.replication import supervisor

UNIT_DIR = Path(__file__).parents[1] / "systemd"
UNITS = sorted(
    path.name for path in UNIT_DIR.iterdir() if path.suffix in (".service", ".timer")
)
# Highest "Overall exposure level" (0 to 10, lower is safer) each service may
# reach in ``systemd-analyze security``: raise it only with a reason.
MAX_EXPOSURE = {
    "pacs-appliance.service": 2.5,
    "pacs-appliance-verify.service": 2.0,
}
# Where distributions keep the units systemd ships (sysinit.target, ...).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
EXEC_LINE = re.compile(r"^Exec[A-Za-z]+=\s*[-@:+!]*(\S+)", re.MULTILINE)
EXPOSURE_LINE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze missing; apt-get install systemd")
    return tool


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file system root with the system's units, ours, and a stand-in for
    every program our units run."""
    systemd_analyze()
    shipped = next(
        (d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None
    )
    if shipped is None:
        pytest.skip("no systemd unit directory with sysinit.target on this host")

    root = tmp_path_factory.mktemp("root")
    shutil.copytree(shipped, root / "usr/lib/systemd/system", symlinks=True)
    ours = root / "etc/systemd/system"
    ours.mkdir(parents=True)
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        (ours / name).write_text(text)
        for program in EXEC_LINE.findall(text):
            stand_in = root / program.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)
    return root


def verify(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    return run("verify", f"--root={root}", "--man=no", name)


def test_the_units_are_there() -> None:
    assert "pacs-appliance.service" in UNITS
    assert "pacs-appliance-verify.timer" in UNITS
    assert set(MAX_EXPOSURE) == {name for name in UNITS if name.endswith(".service")}


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_without_a_warning(root: Path, name: str) -> None:
    result = verify(root, name)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_would_catch_an_unknown_key(root: Path) -> None:
    # The check above is only worth something if a mistake shows on stderr.
    unit = root / "etc/systemd/system/pacs-appliance.service"
    original = unit.read_text()
    try:
        unit.write_text(original.replace("UMask=0027", "UMask=0027\nUMaks=0027"))
        result = verify(root, "pacs-appliance.service")
    finally:
        unit.write_text(original)
    assert result.returncode == 0  # verify exits 0: hence the stderr check
    assert "Unknown key" in result.stderr


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_service_exposure_stays_under_its_limit(name: str) -> None:
    result = run("security", "--offline=true", str(UNIT_DIR / name))
    assert result.returncode == 0, result.stderr
    found = EXPOSURE_LINE.search(result.stdout)
    assert found, result.stdout[-2000:]
    exposure = float(found.group(1))
    print(f"{name}: overall exposure {exposure}")
    assert exposure <= MAX_EXPOSURE[name], result.stdout


def test_the_service_keeps_only_the_low_port_capability() -> None:
    keys = unit_keys(UNIT_DIR / "pacs-appliance.service")
    assert keys["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert keys["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    # Tape drives need /dev: a private /dev has none.
    assert "PrivateDevices" not in keys
    assert keys["DevicePolicy"] == ["closed"]
    assert sorted(keys["DeviceAllow"]) == ["char-sg rw", "char-st rw"]


def test_the_stop_timeout_covers_the_service_own_grace_periods() -> None:
    keys = unit_keys(UNIT_DIR / "pacs-appliance.service")
    stop = seconds(keys["TimeoutStopSec"][-1])
    # The listener stops replication, then gives workers their grace (+5 s).
    needed = supervisor._STOP_GRACE + worker.STOP_GRACE + 5
    assert stop >= needed + 10, f"TimeoutStopSec={stop}s, the service needs {needed}s"
    watchdog = seconds(keys["WatchdogSec"][-1])
    assert watchdog >= 30


def unit_keys(path: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, by key, in order (no sections)."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def seconds(value: str) -> float:
    """A systemd time span of one unit (90s, 5min, 2h) in seconds."""
    match = re.fullmatch(r"(\d+)\s*(s|min|h)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2) or "s"]
