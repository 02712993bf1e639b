"""Checks of software RAID: every array in /proc/mdstat, and the arrays the
profile puts the storage areas on.

An array is FAIL when it is inactive, has a failed member, is degraded with
no rebuild running, or is rebuilding with no redundancy left (RAID 1 with
one disk, RAID 5 missing one): a second failure then loses the array. It is
WARN while it rebuilds with redundancy left, resyncs, or is read-only.
Hardware RAID does not show here; its controller has its own tool.
"""

from __future__ import annotations

import logging

from appliance.hardware.findings import Finding, fail, ok, warn
from appliance.hardware.mdstat import Array, Progress
from appliance.hardware.probe import HostFacts
from appliance.hardware.profile import Profile

logger = logging.getLogger(__name__)


def check_raid(profile: Profile, facts: HostFacts) -> list[Finding]:
    """One finding per array, then one per storage area on an array."""
    expected = {
        name: area for name, area in profile.areas.items() if area.array is not None
    }
    if facts.arrays is None:
        if not expected:
            return [ok("raid", "no /proc/mdstat (no software RAID); none expected")]
        return [
            fail(
                f"{name} raid",
                f"the profile puts {name} on {area.array} ({area.raid}), but "
                "there is no /proc/mdstat: software RAID is not running",
                "install mdadm and assemble the arrays (mdadm --assemble --scan)",
            )
            for name, area in expected.items()
        ]
    findings = [_array(array) for array in facts.arrays]
    if not facts.arrays and not expected:
        findings.append(ok("raid", "no software RAID arrays; none expected"))
    by_name = {array.name: array for array in facts.arrays}
    for name, area in expected.items():
        findings.append(_placement(name, area.array or "", area.raid, by_name))
    return findings


def _placement(
    area: str, wanted: str, level: str | None, arrays: dict[str, Array]
) -> Finding:
    check = f"{area} raid"
    array = arrays.get(wanted)
    if array is None:
        return fail(
            check,
            f"the profile puts {area} on {wanted} ({level}), which /proc/mdstat "
            "does not list",
            "assemble or create the array (mdadm --assemble --scan), or "
            f"correct {area}.array in the profile",
        )
    if array.level != level:
        return fail(
            check,
            f"{wanted} is {array.level or 'of no level (inactive)'}, the profile "
            f"expects {level}",
            f"check that {area} is on the intended array, or correct "
            f"{area}.raid in the profile",
        )
    return ok(check, f"on {wanted} ({level}), as the profile expects")


def _array(array: Array) -> Finding:
    check = f"raid {array.name}"
    shape = _shape(array)
    if not array.active:
        members = ", ".join(m.name for m in array.members) or "none"
        return fail(
            check,
            f"inactive (members: {members})",
            "the array was not assembled, e.g. members missing at boot: "
            f"mdadm --examine them, then mdadm --assemble /dev/{array.name}",
        )
    if array.failed:
        names = ", ".join(member.name for member in array.failed)
        first = array.failed[0].name
        return fail(
            check,
            f"{shape}: failed member(s) {names}",
            f"mdadm /dev/{array.name} --remove /dev/{first} (each failed one), "
            "replace the disk, partition it like the others and mdadm "
            f"/dev/{array.name} --add the new partition; the rebuild starts "
            "by itself",
        )
    if array.missing:
        return _degraded(check, array, shape)
    return _healthy(check, array, shape)


def _degraded(check: str, array: Array, shape: str) -> Finding:
    running = array.progress
    missing = f"{array.missing} of {array.wanted} members missing"
    if running is None or running.operation not in ("recovery", "reshape"):
        return fail(
            check,
            f"{shape}: degraded, {missing}, no rebuild running",
            f"add a replacement disk (mdadm /dev/{array.name} --add "
            "/dev/sdX1); the rebuild starts by itself",
        )
    rebuilding = f"{shape}: rebuilding, {_progress(running)}"
    if array.redundancy == 0:
        return fail(
            check,
            f"{rebuilding}; no redundancy until it ends: one more disk failure "
            "loses the array",
            "remove no disk, keep the load light until it ends, and check that "
            "the mirror is current (appliance replication status)",
        )
    return warn(
        check,
        f"{rebuilding}; redundancy is reduced meanwhile",
        "let it finish (watch cat /proc/mdstat); avoid heavy migration meanwhile",
    )


def _healthy(check: str, array: Array, shape: str) -> Finding:
    running = array.progress
    spares = sum(member.spare for member in array.members)
    extra = f", {spares} spare(s)" if spares else ""
    if array.read_only:
        return warn(
            check,
            f"{shape}{extra}: read-only",
            f"if nothing keeps it read-only on purpose: mdadm --readwrite "
            f"/dev/{array.name}",
        )
    if array.auto_read_only:
        extra += ", auto-read-only until its first write"
    if running is not None and running.operation in ("check", "repair"):
        return ok(check, f"{shape}{extra}: scrub running, {_progress(running)}")
    if running is not None:
        return warn(
            check,
            f"{shape}{extra}: {_progress(running)}",
            "let it finish; if one starts after every boot, find why the server "
            "does not shut down cleanly (an internal bitmap shortens resyncs: "
            f"mdadm --grow --bitmap=internal /dev/{array.name})",
        )
    return ok(check, f"{shape}{extra}: healthy")


def _shape(array: Array) -> str:
    level = array.level or "no level"
    if array.wanted is None:
        return level
    return f"{level} [{array.wanted}/{array.working}] [{array.roles}]"


def _progress(running: Progress) -> str:
    if running.percent is None:
        return f"{running.operation} waiting (delayed or pending)"
    text = f"{running.operation} {running.percent:g}%"
    if running.minutes_left is not None:
        text += f", about {_duration(running.minutes_left)} left"
    return text


def _duration(minutes: float) -> str:
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"
