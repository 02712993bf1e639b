"""Checks of the host itself: memory, CPU cores and the open-files limit."""

from __future__ import annotations

import logging

from appliance.hardware.findings import Finding, fail, ok, warn
from appliance.hardware.probe import HostFacts
from appliance.hardware.profile import Profile
from appliance.hardware.units import GIB, format_gib

logger = logging.getLogger(__name__)

# MemTotal is the installed memory less what firmware and kernel keep for
# themselves, a few percent: 16 GiB installed shows about 15.6 GiB.
MEMORY_ALLOWANCE = 0.95


def check_host(profile: Profile, facts: HostFacts) -> list[Finding]:
    """Memory, cores and open files against the profile's minimums."""
    return [
        _memory(profile.min_memory_gib, facts.memory_bytes),
        _cores(profile.min_cpu_cores, facts.cpu_cores),
        _open_files(profile.min_open_files, facts.open_files),
    ]


def _memory(minimum: float | None, found: int | None) -> Finding:
    if found is None:
        return warn(
            "memory",
            "MemTotal not found in /proc/meminfo",
            "check that /proc is mounted; compare the memory with free -g",
        )
    wanted = f"the profile asks for {minimum:g} GiB" if minimum else "no minimum"
    if minimum is None or found >= minimum * GIB * MEMORY_ALLOWANCE:
        return ok("memory", f"{format_gib(found)} ({wanted})")
    return fail(
        "memory",
        f"{format_gib(found)}, {wanted}",
        "add memory: the catalog's pages, the workers and the page cache of "
        "the online tier all live in it",
    )


def _cores(minimum: int | None, found: int | None) -> Finding:
    if found is None:
        return warn(
            "cpu",
            "cannot count the CPUs from /proc/self/status or /proc/cpuinfo",
            "check that /proc is mounted; compare with nproc",
        )
    wanted = f"the profile asks for {minimum}" if minimum else "no minimum"
    if minimum is None or found >= minimum:
        return ok("cpu", f"{found} core(s) usable ({wanted})")
    return fail(
        "cpu",
        f"{found} core(s) usable, {wanted}",
        "use a larger server, or lift the CPU affinity or quota that "
        "limits this process (taskset, cgroup cpuset)",
    )


def _open_files(
    minimum: int | None, found: tuple[int | None, int | None] | None
) -> Finding:
    if found is None:
        return warn(
            "open-files",
            "no 'Max open files' in /proc/self/limits",
            "check that /proc is mounted; compare with ulimit -n",
        )
    soft, hard = found
    shown = f"soft {_limit(soft)}, hard {_limit(hard)}"
    if minimum is None or soft is None or soft >= minimum:
        wanted = f"the profile asks for {minimum}" if minimum else "no minimum"
        return ok("open-files", f"limit {shown} ({wanted})")
    return fail(
        "open-files",
        f"limit {shown}, the profile asks for {minimum}",
        f"set LimitNOFILE={minimum} in the appliance's systemd unit (the "
        "service has the unit's limit, not this shell's), or raise nofile "
        "in /etc/security/limits.conf for the appliance's user",
    )


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)
