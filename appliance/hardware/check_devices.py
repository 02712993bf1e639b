"""Checks of the offline library's devices and tools, and the mirror's kind.

A tape library needs its drive (the st driver's non-rewinding /dev/nstN,
listed in /sys/class/scsi_tape), its changer if any (a SCSI generic device
of type 8, medium changer, in /sys/class/scsi_generic), read and write
access to both, and the tools mt (mt-st) and mtx.
"""

from __future__ import annotations

import logging
import re

from appliance.hardware.findings import Finding, fail, ok, warn
from appliance.hardware.probe import HostFacts, ScsiGeneric, TapeDrive
from appliance.hardware.profile import Offline, Profile
from appliance.hardware.site import Site

logger = logging.getLogger(__name__)

PACKAGES = {"mt": "mt-st", "mtx": "mtx", "xorriso": "xorriso"}
_NST = re.compile(r"/dev/nst(\d+)")
_LTO = re.compile(r"(?:ULT3580-(?:HH|TD)|ULTRIUM[- ](?:HH|TD)?|LTO-?)(\d)", re.I)


def tools_needed(site: Site) -> tuple[str, ...]:
    """The programs the configured library runs."""
    if site.volumes_kind == "optical":
        return ("xorriso",)
    if site.volumes_kind != "tape" or site.simulated_path:
        return ()
    return ("mt", "mtx") if site.changer else ("mt",)


def check_devices(profile: Profile, site: Site, facts: HostFacts) -> list[Finding]:
    """The library's kind, tools and devices; the mirror's kind."""
    expected = profile.offline or Offline(kind=site.volumes_kind)
    findings = [_kind(expected, site, stated=profile.offline is not None)]
    findings += [_tool(tool, facts) for tool in tools_needed(site)]
    if site.volumes_kind == "tape" and site.simulated_path:
        findings.append(
            warn(
                "tape",
                f"the drive and changer are simulated in {site.simulated_path}",
                "remove volumes.simulated_path once the real drive is installed",
            )
        )
    elif site.volumes_kind == "tape":
        findings += _drive(expected, site, facts)
        findings += _changer(expected, site, facts)
    findings.append(_mirror(profile.mirror_kind, site.mirror_kind))
    return findings


def _kind(expected: Offline, site: Site, stated: bool) -> Finding:
    if not stated:
        return ok("offline", f"{site.volumes_kind} library")
    if expected.kind == site.volumes_kind:
        return ok("offline", f"{site.volumes_kind} library, as the profile expects")
    hint = {
        "tape": 'volumes.kind = "tape", volumes.device and volumes.changer',
        "optical": 'volumes.kind = "optical" and volumes.path',
        "directory": 'volumes.kind = "directory" and volumes.path',
    }[expected.kind]
    return fail(
        "offline",
        f"the configuration has a {site.volumes_kind} library, the profile "
        f"expects {expected.kind}",
        f"set {hint} (docs/volumes.md), or use the profile of this layout",
    )


def _tool(tool: str, facts: HostFacts) -> Finding:
    where = facts.tools.get(tool)
    if where:
        return ok(f"tool {tool}", f"found at {where}")
    return fail(
        f"tool {tool}",
        f"{tool} is not installed",
        f"apt-get install {PACKAGES.get(tool, tool)}",
    )


def _drive(expected: Offline, site: Site, facts: HostFacts) -> list[Finding]:
    drives = facts.tape_drives
    found = ", ".join(_describe_drive(d) for d in drives) or "none"
    findings = []
    if len(drives) < expected.drives:
        findings.append(
            fail(
                "tape drives",
                f"{len(drives)} found ({found}), the profile expects {expected.drives}",
                "check that every drive is powered, cabled and seen by the HBA "
                "(lsscsi -g), and that the st module is loaded (modprobe st)",
            )
        )
    match = _NST.fullmatch(site.tape_device)
    if match is None:
        findings.append(_not_nst(site.tape_device))
        return findings
    drive = next((d for d in drives if d.index == int(match.group(1))), None)
    if drive is None:
        findings.append(
            fail(
                "tape drive",
                f"volumes.device {site.tape_device} is not a drive of "
                f"/sys/class/scsi_tape (found: {found})",
                "check the drive is powered and cabled and the st module loaded "
                "(lsscsi -g lists drives), or set volumes.device to a found drive",
            )
        )
        return findings
    findings.append(
        _node("tape drive", site.tape_device, _describe_drive(drive), facts)
    )
    findings += _generation(expected, drive)
    return findings


def _not_nst(device: str) -> Finding:
    rewinding = re.fullmatch(r"/dev/st(\d+)[lma]?", device)
    if rewinding:
        better = f"/dev/nst{rewinding.group(1)}"
        return fail(
            "tape drive",
            f"volumes.device {device} rewinds at every close: each pack would "
            "overwrite the one before",
            f"set volumes.device = {better!r} (the non-rewinding device)",
        )
    return fail(
        "tape drive",
        f"volumes.device {device} is not a tape drive of the st driver",
        "set volumes.device to the drive's /dev/nstN (lsscsi -g lists them)",
    )


def _node(check: str, device: str, described: str, facts: HostFacts) -> Finding:
    node = facts.nodes.get(device)
    if node is None or not node.exists:
        return fail(
            check,
            f"{described} is listed, but {device} does not exist",
            "look at dmesg for the driver's messages; udev creates the device",
        )
    if not node.accessible:
        return warn(
            check,
            f"{described}: {device} is not readable and writable by this user",
            "run this check as the appliance's user; give it access through "
            "the device's group (usually tape) or a udev rule",
        )
    return ok(check, f"{described} at {device}")


def _generation(expected: Offline, drive: TapeDrive) -> list[Finding]:
    found = _LTO.search(drive.model)
    if expected.generation is None or found is None:
        return []
    generation = f"LTO-{found.group(1)}"
    if generation == expected.generation:
        return [ok("tape generation", f"{generation} drive, as the profile expects")]
    return [
        warn(
            "tape generation",
            f"the drive is {generation}, the profile expects "
            f"{expected.generation} cartridges",
            "an LTO drive writes its own generation and the one before it "
            "(LTO-9: LTO-9 and LTO-8): buy cartridges the drive writes, and "
            "size with their native capacity",
        )
    ]


def _changer(expected: Offline, site: Site, facts: HostFacts) -> list[Finding]:
    changers = [g for g in facts.generics if g.type == ScsiGeneric.CHANGER]
    listing = ", ".join(f"/dev/{_describe_generic(g)}" for g in changers)
    listing = listing or "none found"
    if not site.changer:
        if not expected.changer:
            return []
        return [
            fail(
                "tape changer",
                "the profile expects a changer, but volumes.changer is empty",
                f"set volumes.changer to the changer's device ({listing}; "
                "lsscsi -g shows it as 'mediumx')",
            )
        ]
    name = site.changer.removeprefix("/dev/")
    generic = next((g for g in facts.generics if g.name == name), None)
    if generic is None or generic.type != ScsiGeneric.CHANGER:
        what = "not listed" if generic is None else f"SCSI type {generic.type}"
        return [
            fail(
                "tape changer",
                f"volumes.changer {site.changer} is not a medium changer of "
                f"/sys/class/scsi_generic ({what}); changers: {listing}",
                "set volumes.changer to the changer's /dev/sgN (lsscsi -g: "
                "'mediumx'); check the library is on and cabled",
            )
        ]
    return [_node("tape changer", site.changer, _describe_generic(generic), facts)]


def _mirror(expected: str | None, configured: str) -> Finding:
    if expected is None or expected == configured:
        return ok("mirror", f"{configured} mirror")
    return fail(
        "mirror",
        f"the configuration has a {configured} mirror, the profile expects {expected}",
        f'set mirror.kind = "{expected}" and its keys (docs/replication.md)',
    )


def _describe_drive(drive: TapeDrive) -> str:
    name = " ".join(part for part in (drive.vendor, drive.model) if part)
    return f"nst{drive.index} ({name or 'unknown model'})"


def _describe_generic(generic: ScsiGeneric) -> str:
    name = " ".join(part for part in (generic.vendor, generic.model) if part)
    return f"{generic.name} ({name or 'unknown model'})"
