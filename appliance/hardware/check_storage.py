"""Checks of the storage areas: folder, mount, capacity and free space.

For each area of the configuration (the online and nearline tiers and the
catalog), four lines: whether its folder exists; whether it is on the file
system the profile expects (an array that failed to mount leaves the folder
on the system disk, which then fills with images); whether that file system
is as large as the profile and the configured capacity say; and whether its
free space leaves the headroom the watermarks and reserve count on.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from appliance.hardware.findings import Finding, fail, ok, warn
from appliance.hardware.probe import HostFacts, PathFacts
from appliance.hardware.procfs import Mount, mount_of
from appliance.hardware.profile import Area, Profile
from appliance.hardware.site import AreaSite, Site
from appliance.hardware.units import format_size

logger = logging.getLogger(__name__)

# A file system is somewhat smaller than the array under it (metadata,
# journal, reserved blocks); below this share of the expected capacity, the
# wrong array is mounted or the file system was not grown.
CAPACITY_TOLERANCE = 0.9
VOLATILE = ("tmpfs", "ramfs")
CONFIG_KEYS = {
    "online": "storage.online_path",
    "nearline": "storage.nearline_path",
    "catalog": "storage.catalog_path",
}


def check_storage(profile: Profile, site: Site, facts: HostFacts) -> list[Finding]:
    """Four findings per storage area of ``site``."""
    findings: list[Finding] = []
    for area in site.areas:
        expected = profile.areas.get(area.name) or Area(area.name)
        path = facts.paths.get(area.path)
        if path is None:
            findings.append(warn(area.name, "not probed", "report this as a bug"))
            continue
        findings.append(_folder(area, path))
        findings.append(_mount(area, expected, path, facts.mounts))
        findings += _capacity(area, expected, path)
        findings.append(_space(area, site, path))
    return findings


def _folder(area: AreaSite, path: PathFacts) -> Finding:
    check = f"{area.name} folder"
    if path.exists:
        return ok(check, f"{path.path} exists")
    return warn(
        check,
        f"{path.path} does not exist yet (measured at {path.measured})",
        "create it on the intended file system, owned by the appliance's "
        "user; the appliance would make it on whatever file system holds "
        f"{path.measured}",
    )


def _mount(
    area: AreaSite,
    expected: Area,
    path: PathFacts,
    mounts: tuple[Mount, ...] | None,
) -> Finding:
    check = f"{area.name} mount"
    mount = mount_of(path.resolved, list(mounts)) if mounts else None
    if mount is None:
        return warn(
            check,
            f"cannot tell which file system holds {path.resolved}",
            "check that /proc is mounted (findmnt shows the mounts)",
        )
    where = f"{mount.point} ({mount.source}, {mount.fstype})"
    problem = _mount_problem(area, expected, path, mount)
    if problem is not None:
        return problem
    if expected.mount is None:
        return ok(check, f"on {where}; the profile names no mount point")
    return ok(check, f"on {where}, as the profile expects")


def _mount_problem(
    area: AreaSite, expected: Area, path: PathFacts, mount: Mount
) -> Finding | None:
    check = f"{area.name} mount"
    if mount.fstype in VOLATILE:
        return fail(
            check,
            f"{path.resolved} is on {mount.fstype} at {mount.point}: lost at reboot",
            f"set {CONFIG_KEYS[area.name]} to a folder on a disk",
        )
    if mount.read_only:
        return fail(
            check,
            f"{mount.point} ({mount.source}) is mounted read-only",
            "look for disk or file system errors (dmesg, which may have "
            "remounted it read-only), repair with fsck, then remount it rw",
        )
    if expected.mount is None:
        return None

    wanted = PurePosixPath(expected.mount)
    target = PurePosixPath(path.resolved)
    if target != wanted and wanted not in target.parents:
        return fail(
            check,
            f"{path.resolved} is not under the profile's mount point {wanted}",
            f"set {CONFIG_KEYS[area.name]} to a folder on {wanted}, or correct "
            f"{area.name}.mount in the profile",
        )
    if PurePosixPath(mount.point) != wanted:
        return fail(
            check,
            f"{path.resolved} is on {mount.point} ({mount.source}), not on its "
            f"own file system at {wanted}: that file system is not mounted",
            f"mount {wanted} (check /etc/fstab, findmnt --verify) before "
            f"starting the appliance; until then files land on {mount.point}",
        )
    if expected.device and mount.source != expected.device:
        return fail(
            check,
            f"{wanted} is mounted from {mount.source}, the profile expects "
            f"{expected.device}",
            "check which array is mounted where (lsblk, /etc/fstab) and fix "
            f"the mount or {area.name}.device in the profile",
        )
    return None


def _capacity(area: AreaSite, expected: Area, path: PathFacts) -> list[Finding]:
    check = f"{area.name} capacity"
    if path.space is None:
        return [warn(check, f"cannot measure {path.measured}: {path.error}", "")]
    total = path.space.total
    findings = []
    if expected.capacity is None:
        findings.append(
            ok(check, f"file system of {format_size(total)}; the profile names none")
        )
    elif total < expected.capacity * CAPACITY_TOLERANCE:
        findings.append(
            fail(
                check,
                f"file system of {format_size(total)}, the profile expects "
                f"{format_size(expected.capacity)}",
                "mount the intended array here, or grow the file system "
                "(xfs_growfs, resize2fs) after growing the array",
            )
        )
    else:
        findings.append(
            ok(
                check,
                f"file system of {format_size(total)} (the profile expects "
                f"{format_size(expected.capacity)})",
            )
        )
    if area.capacity_bytes > total:
        findings.append(
            fail(
                f"{area.name} capacity_bytes",
                f"{area.name}.capacity_bytes is {format_size(area.capacity_bytes)}"
                f", more than the file system's {format_size(total)}: the disk "
                "fills before the watermarks release anything",
                f"set {area.name}.capacity_bytes to at most {total}, or 0 for "
                "the file system's size",
            )
        )
    return findings


def _space(area: AreaSite, site: Site, path: PathFacts) -> Finding:
    check = f"{area.name} space"
    if path.space is None:
        return warn(check, f"cannot measure {path.measured}: {path.error}", "")
    space = path.space
    used = f"{format_size(space.free)} free of {format_size(space.total)}"
    if area.high_watermark is None:
        return _catalog_space(check, site, space.free, used)

    if space.free < area.reserved_bytes:
        return fail(
            check,
            f"{used}; storage.reserved_bytes keeps "
            f"{format_size(area.reserved_bytes)}, so stores are refused (0xA700)",
            "free space on this file system (other files share it?), let the "
            "watermark release run (appliance migrate --now --watermarks-only),"
            " or add capacity",
        )
    # As the watermarks count it: without the blocks reserved for root,
    # which the appliance, not running as root, can never fill.
    capacity = area.capacity_bytes or space.used + space.free
    headroom = capacity * (100 - area.high_watermark) / 100
    if space.free < headroom:
        return warn(
            check,
            f"{used}: less than the {format_size(int(headroom))} above the high "
            f"watermark ({area.high_watermark:g}%)",
            "the file system fills before the watermarks act: move other files "
            f"away, lower {area.name}.capacity_bytes, or add capacity",
        )
    return ok(check, used)


def _catalog_space(check: str, site: Site, free: int, used: str) -> Finding:
    if free < site.catalog_max_size:
        return warn(
            check,
            f"{used}; the catalog may grow to {format_size(site.catalog_max_size)}"
            " (storage.catalog_max_size)",
            "give the catalog a file system with that much room, or lower "
            "storage.catalog_max_size to what the archive needs",
        )
    return ok(check, used)
