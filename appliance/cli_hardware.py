"""Command line for the archive hardware: ``appliance hardware check |
size | profiles``."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from appliance.cli_shared import Loader, config_option, data_dir_option
from appliance.config import Config, default_rules
from appliance.hardware import profile as profiles
from appliance.hardware.checks import inspect
from appliance.hardware.findings import Finding, worst
from appliance.hardware.probe import Probe
from appliance.hardware.retention import derive
from appliance.hardware.site import site_of
from appliance.hardware.sizing import PACK_RATIO, Media, Sizing, Workload, size
from appliance.hardware.units import format_size, parse_size

logger = logging.getLogger(__name__)


def register(main: click.Group, load: Loader) -> None:
    """Add the ``hardware`` commands to ``main``."""

    @main.group()
    def hardware() -> None:
        """Archive hardware: check the host against a profile, size the tiers."""

    @hardware.command()
    @config_option
    @data_dir_option
    @click.option(
        "--profile",
        "wanted",
        help="A profile name (hardware/NAME.toml) or file; without it only "
        "the configuration and the host's health are checked.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
    @click.option(
        "--root",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        default="/",
        hidden=True,
        help="Read /proc, /sys, /dev and the folders below this root (tests).",
    )
    def check(
        config_file: Path | None,
        data_dir: str | None,
        wanted: str | None,
        as_json: bool,
        strict: bool,
        root: Path,
    ) -> None:
        """Compare the host with a hardware profile and the configuration:
        memory, cores, open files, mounts and space, RAID, tape devices.

        Exit status: 0 when nothing failed, 1 when a check failed (or, with
        --strict, warned), 2 when the configuration or profile is invalid.
        """
        config = load(config_file, {"storage.data_dir": data_dir})
        profile = _profile(wanted)
        findings = inspect(profile, site_of(config), Probe(root))
        outcome = worst(findings)
        if as_json:
            click.echo(json.dumps(_check_report(profile, findings), indent=2))
        else:
            _print_findings(profile, findings)
        failed = outcome == "FAIL" or (strict and outcome == "WARN")
        sys.exit(1 if failed else 0)

    @hardware.command(name="profiles")
    def list_profiles() -> None:
        """The hardware profiles that --profile NAME finds."""
        found = profiles.available()
        if not found:
            click.echo("no profiles found (looked in ./hardware and the repository)")
        for path in found:
            try:
                summary = profiles.load_profile(path).summary
            except profiles.ProfileError as exc:
                summary = f"invalid: {len(exc.problems)} problem(s)"
            click.echo(f"{path.stem:<16} {summary}  ({path})")

    @hardware.command(name="size")
    @config_option
    @click.option(
        "--studies-per-day",
        type=click.FloatRange(min=0, min_open=True),
        required=True,
        help="Studies received a day.",
    )
    @click.option(
        "--mb-per-study",
        type=click.FloatRange(min=0, min_open=True),
        required=True,
        help="Average study size, MB (10**6 bytes).",
    )
    @click.option(
        "--years",
        type=click.FloatRange(min=0, min_open=True),
        required=True,
        help="Years to size for.",
    )
    @click.option(
        "--tape-capacity",
        default="18T",
        show_default=True,
        help="Native capacity of one offline volume (LTO-9: 18T).",
    )
    @click.option(
        "--copies-offline",
        type=click.IntRange(1, 4),
        default=2,
        show_default=True,
        help="Offline volumes written per pack.",
    )
    @click.option(
        "--pack-ratio",
        type=click.FloatRange(0, 1, min_open=True),
        default=PACK_RATIO,
        show_default=True,
        help="Pack bytes per instance byte.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def size_command(
        config_file: Path | None,
        studies_per_day: float,
        mb_per_study: float,
        years: float,
        tape_capacity: str,
        copies_offline: int,
        pack_ratio: float,
        as_json: bool,
    ) -> None:
        """The capacity each tier needs under the configured rules and
        watermarks, and the offline volumes a year."""
        config = load(config_file, {})
        try:
            media = Media(parse_size(tape_capacity), copies_offline)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tape-capacity") from None
        try:
            workload = Workload(studies_per_day, mb_per_study, years)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        sizing = _size(config, workload, media, pack_ratio)
        if as_json:
            click.echo(json.dumps(asdict(sizing), indent=2))
        else:
            default = config.rules == default_rules()
            _print_sizing(sizing, "the default rules" if default else "its rules")


def _profile(wanted: str | None) -> profiles.Profile:
    if wanted is None:
        return profiles.NO_PROFILE
    try:
        return profiles.load_profile(profiles.find_profile(wanted))
    except profiles.ProfileError as exc:
        for key, message in exc.problems:
            click.echo(f"{exc.source}: {key}: {message}", err=True)
        sys.exit(2)


def _check_report(profile: profiles.Profile, findings: list[Finding]) -> dict[str, Any]:
    return {
        "profile": profile.name,
        "profile_file": profile.source,
        "outcome": worst(findings),
        "checks": [finding.as_dict() for finding in findings],
    }


def _print_findings(profile: profiles.Profile, findings: list[Finding]) -> None:
    source = f" ({profile.source})" if profile.source else ""
    click.echo(f"hardware profile: {profile.name}{source}")
    for finding in findings:
        click.echo(finding.line())
    counts = {s: sum(f.status == s for f in findings) for s in ("OK", "WARN", "FAIL")}
    click.echo(
        f"{worst(findings)}: {counts['FAIL']} failed, {counts['WARN']} warned, "
        f"{counts['OK']} OK"
    )


def _size(config: Config, workload: Workload, media: Media, ratio: float) -> Sizing:
    retention = derive(
        config.rules,
        config.get("migration.min_copies"),
        mirror=config.get("replication.enabled"),
    )
    lows = {
        tier: config.get(f"{tier}.low_watermark") for tier in ("online", "nearline")
    }
    reserved = config.get("storage.reserved_bytes")
    return size(workload, retention, lows, reserved, media, ratio)


def _print_sizing(sizing: Sizing, rules_from: str) -> None:
    work = sizing.workload
    daily = work.bytes_per_day
    click.echo(
        f"{work.studies_per_day:g} studies a day of {work.mb_per_study:g} MB: "
        f"{format_size(daily)} a day, {format_size(daily * 365)} a year; "
        f"sized for {work.years:g} year(s) under {rules_from}"
    )
    click.echo("")
    click.echo(f"{'tier':<9} {'days':>7} {'holds':>11} {'capacity':>11}  basis")
    for need in sizing.tiers:
        capacity = (
            "-" if need.capacity_bytes is None else format_size(need.capacity_bytes)
        )
        click.echo(
            f"{need.tier:<9} {need.days:>7g} {format_size(need.held_bytes):>11} "
            f"{capacity:>11}  {need.basis}"
        )
    click.echo("")
    click.echo(_volumes_line(sizing))
    click.echo("")
    click.echo("assumed:")
    for note in sizing.notes:
        click.echo(f"- {note}")


def _volumes_line(sizing: Sizing) -> str:
    volumes = sizing.volumes
    if volumes is None:
        return "offline: no rule copies studies to offline volumes"
    media = volumes.media
    return (
        f"offline: {format_size(volumes.pack_bytes_per_year)} of packs a year on "
        f"volumes of {format_size(media.capacity)}, {media.copies} copies: "
        f"{volumes.per_year:.2f} volumes a year, {volumes.total} over "
        f"{sizing.workload.years:g} year(s)"
    )
