"""Every hardware check, in the order they are reported.

check_all is pure: it compares a profile and the configuration's Site with
the HostFacts a probe read. inspect reads those facts from the host first.
"""

from __future__ import annotations

import logging

from appliance.hardware.check_devices import check_devices, tools_needed
from appliance.hardware.check_host import check_host
from appliance.hardware.check_raid import check_raid
from appliance.hardware.check_storage import check_storage
from appliance.hardware.findings import Finding, worst
from appliance.hardware.probe import HostFacts, Probe
from appliance.hardware.profile import Profile
from appliance.hardware.site import Site

logger = logging.getLogger(__name__)


def check_all(profile: Profile, site: Site, facts: HostFacts) -> list[Finding]:
    """Host, storage areas, RAID, offline devices and mirror, in that order."""
    findings = check_host(profile, facts)
    findings += check_storage(profile, site, facts)
    findings += check_raid(profile, facts)
    findings += check_devices(profile, site, facts)
    return findings


def inspect(profile: Profile, site: Site, probe: Probe) -> list[Finding]:
    """Read the host with ``probe`` and check it; logs the outcome."""
    facts = probe.read(
        paths=[area.path for area in site.areas],
        devices=site.devices,
        tools=tools_needed(site),
    )
    findings = check_all(profile, site, facts)
    logger.info(
        "hardware check against profile %s: %s (%d FAIL, %d WARN)",
        profile.name,
        worst(findings),
        sum(f.status == "FAIL" for f in findings),
        sum(f.status == "WARN" for f in findings),
    )
    return findings
