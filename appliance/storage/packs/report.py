"""The outcome of reading a whole pack: good or bad, instance by instance."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from appliance.storage.packs.manifest import Manifest, PackedInstance
from appliance.storage.packs.sealing import Opened
from appliance.storage.packs.tar import Member

logger = logging.getLogger(__name__)

# The problem of a member that decoded, in a pack whose manifest is lost.
UNCHECKED = "not checked: no manifest"


@dataclass(frozen=True)
class InstanceCheck:
    """One instance member and what is wrong with it (None when it is good)."""

    member: str
    sop_instance_uid: str | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        what = f"instance {self.sop_instance_uid}" if self.sop_instance_uid else "?"
        return f"{what} ({self.member}): {self.problem or 'good'}"


@dataclass
class VerifyReport:
    """Every instance checked against the manifest, and pack-level problems."""

    pack_id: str
    manifest: Manifest | None
    instances: list[InstanceCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the manifest was read and everything matched it."""
        return (
            self.manifest is not None
            and not self.problems
            and all(check.ok for check in self.instances)
        )

    @property
    def bad(self) -> list[InstanceCheck]:
        return [check for check in self.instances if not check.ok]

    def describe(self) -> str:
        """A few lines for a log or a terminal."""
        good = len(self.instances) - len(self.bad)
        lines = [f"pack {self.pack_id}: {good} of {len(self.instances)} instances good"]
        lines += [f"  {problem}" for problem in self.problems]
        lines += [f"  {check.describe()}" for check in self.bad]
        return "\n".join(lines)


@dataclass
class Seen:
    """An instance member as met while reading a pack in order."""

    member: Member
    opened: Opened | None
    problem: str | None


def compare(entry: PackedInstance, member: Member, opened: Opened) -> str | None:
    """What differs between an instance member as read and its manifest entry."""
    if (member.header_offset, member.data_offset, member.size) != (
        entry.header_offset,
        entry.data_offset,
        entry.member_size,
    ):
        return "its place or size in the pack differs from the manifest"
    if opened.compressed_size != entry.compressed_size:
        return (
            f"its zstd frame is {opened.compressed_size} bytes, the manifest "
            f"says {entry.compressed_size}"
        )
    if opened.size != entry.meta.size:
        return f"decodes to {opened.size} bytes, the manifest says {entry.meta.size}"
    if opened.sha256 != entry.meta.sha256:
        return "the SHA-256 of its decoded bytes differs from the manifest's"
    return None


def reconcile(
    pack_id: str,
    manifest: Manifest | None,
    seen: dict[str, Seen],
    problems: list[str],
    complete: bool,
) -> VerifyReport:
    """Match the members read against the manifest's list.

    ``complete`` says whether the whole pack could be read; if not,
    instances not met are reported as not reached rather than missing.
    """
    report = VerifyReport(pack_id, manifest, problems=list(problems))
    if manifest is None:
        report.problems.append("no readable manifest: instances cannot be checked")
        for name, item in seen.items():
            unchecked = item.problem or UNCHECKED
            report.instances.append(InstanceCheck(name, None, unchecked))
        return report

    left = dict(seen)
    for entry in manifest.instances:
        problem = _problem_of(entry, left.pop(entry.member, None), complete)
        report.instances.append(
            InstanceCheck(entry.member, entry.sop_instance_uid, problem)
        )
    report.problems += [f"{name} is not in the manifest" for name in left]
    return report


def _problem_of(entry: PackedInstance, item: Seen | None, complete: bool) -> str | None:
    if item is None:
        return "missing" if complete else "not reached: the pack breaks before it"
    if item.problem or item.opened is None:
        return item.problem or "not decoded"
    return compare(entry, item.member, item.opened)
