"""Command line for the scrub: ``appliance scrub status``, ``run``,
``report`` and ``adopt``."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance import logs
from appliance.cli_shared import Loader, config_option, data_dir_option, require_catalog
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)

_TIER_CHOICES = ("online", "nearline", "offline", "mirror")


def register(main: click.Group, load: Loader) -> None:
    """Add the ``scrub`` commands to ``main``."""

    @main.group(name="scrub")
    def scrub() -> None:
        """Read every copy back, repair damage from another copy, report orphans."""

    @scrub.command()
    @config_option
    @data_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def status(config_file: Path | None, data_dir: str | None, as_json: bool) -> None:
        """Each tier's pass (where it stands, the last whole pass), copies
        checked, bad and repaired; instances with no good copy; orphans."""
        config = load(config_file, {"storage.data_dir": data_dir})
        require_catalog(config)
        numbers = _status(config)
        if as_json:
            click.echo(json.dumps(numbers, indent=2))
            return
        _print_status(numbers)

    @scrub.command()
    @config_option
    @data_dir_option
    @click.option(
        "--tier",
        type=click.Choice(_TIER_CHOICES),
        help="Only this tier (default: online, nearline, then offline).",
    )
    @click.option("--study", "study_uid", help="Only this study's copies.")
    @click.pass_context
    def run(
        ctx: click.Context,
        config_file: Path | None,
        data_dir: str | None,
        tier: str | None,
        study_uid: str | None,
    ) -> None:
        """Check the rest of each tier's pass now (or one study's copies),
        within scrub.rate_mb_per_s, repairing what is bad. Exits 1 when a
        bad copy could not be repaired."""
        if tier == "mirror":
            # The mirror's scrub is the replication audit: run it whole.
            replication = main.commands["replication"]
            assert isinstance(replication, click.Group)
            verify = replication.commands["verify"]
            ctx.invoke(
                verify, config_file=config_file, data_dir=data_dir, check_all=True
            )
            return
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        require_catalog(config)
        if study_uid is not None and not _is_study(config, study_uid):
            click.echo(f"{study_uid!r}: no such study in the catalog", err=True)
            sys.exit(1)
        tiers = (tier,) if tier else ("online", "nearline", "offline")
        sys.exit(_run(config, tiers, study_uid))

    @scrub.command()
    @config_option
    @data_dir_option
    def report(config_file: Path | None, data_dir: str | None) -> None:
        """Instances with no good copy left, and orphans (files no catalog
        entry names; never deleted). Exits 1 when an instance is listed."""
        config = load(config_file, {"storage.data_dir": data_dir})
        require_catalog(config)
        from appliance.scrub import state

        saved = state.load(state.folder_of(config.data_dir))
        click.echo(f"{len(saved.lost)} instance(s) with no good copy left")
        for uid, problem in sorted(saved.lost.items()):
            click.echo(f"  {uid}: {problem}")
        for tier, found in sorted(saved.orphans.items()):
            click.echo(
                f"{len(found)} orphan(s) on {tier} (kept; review, then "
                "`appliance scrub adopt`)"
            )
            for location in found:
                click.echo(f"  {location}")
        sys.exit(1 if saved.lost else 0)

    @scrub.command()
    @config_option
    @data_dir_option
    @click.argument("locations", nargs=-1)
    @click.option(
        "--tier",
        type=click.Choice(("online", "nearline")),
        help="The tier the LOCATIONS are on (default: each is looked up).",
    )
    @click.option(
        "--all", "adopt_all", is_flag=True, help="Every orphan the report lists."
    )
    def adopt(
        config_file: Path | None,
        data_dir: str | None,
        locations: tuple[str, ...],
        tier: str | None,
        adopt_all: bool,
    ) -> None:
        """Bring orphans (as `appliance scrub report` lists them) into the
        catalog once you have reviewed them. Online files are checked like a
        C-STORE and recorded where they lie; nearline packs are read back
        whole first. Nothing is moved or deleted. Exits 1 when an orphan
        was refused."""
        config = load(config_file, {"storage.data_dir": data_dir})
        require_catalog(config)
        from appliance.scrub import adopt as adoption

        listed = adoption.listed_orphans(config, tier)
        if adopt_all == bool(locations):
            raise click.UsageError("name the orphans to adopt, or give --all")
        wanted = listed if adopt_all else _which(listed, locations, tier)
        if not wanted:
            click.echo("no orphans listed; the scrub finds them at the end of a pass")
            return
        try:
            done = adoption.adopt(config, wanted)
        except ApplianceError as exc:
            click.echo(f"nothing adopted: {exc}", err=True)
            sys.exit(1)
        for found in done:
            click.echo(
                f"{found.tier} {found.location}: {found.outcome}; {found.detail}"
            )
        refused = sum(found.outcome == adoption.REFUSED for found in done)
        click.echo(f"{len(done) - refused} of {len(done)} orphan(s) dealt with")
        sys.exit(1 if refused else 0)


def _which(
    listed: list[tuple[str, str]], locations: tuple[str, ...], tier: str | None
) -> list[tuple[str, str]]:
    """(tier, location) for each named orphan; one the report does not list
    is passed on with the tier given (or online) and refused there."""
    tier_of = {location: name for name, location in listed}
    return [(tier_of.get(loc, tier or "online"), loc) for loc in locations]


def _is_study(config: Config, uid: str) -> bool:
    from appliance.actions import is_study
    from appliance.catalog.store import Catalog

    catalog = Catalog(
        config.catalog_path, config.get("storage.catalog_max_size"), readonly=True
    )
    try:
        return is_study(catalog, uid)
    finally:
        catalog.close()


def _run(config: Config, tiers: tuple[str, ...], study_uid: str | None) -> int:
    from appliance.scrub.job import perform

    with progress_bar() as bar:
        task = bar.add_task("scrubbing", total=None)
        try:
            reports = perform(
                config,
                tiers,
                study_uid,
                progress=lambda tier, done: bar.update(
                    task, description=f"scrubbing {tier}", completed=done
                ),
            )
        except ApplianceError as exc:
            bar.stop()
            click.echo(f"the scrub did not run: {exc}", err=True)
            return 1
    for found in reports:
        click.echo(
            f"{found.tier}: {found.checked} copies checked ({size(found.bytes_read)}), "
            f"{found.bad} bad, {found.repaired} repaired"
            + ("; pass complete" if found.finished else "")
        )
    return 1 if any(r.bad > r.repaired for r in reports) else 0


def _status(config: Config) -> dict[str, Any]:
    from appliance.catalog.copies import pack_counts
    from appliance.catalog.store import Catalog
    from appliance.scrub import state

    saved = state.load(state.folder_of(config.data_dir))
    catalog = Catalog(
        config.catalog_path, config.get("storage.catalog_max_size"), readonly=True
    )
    try:
        counts = catalog.counts()
        packs = pack_counts(catalog)
    finally:
        catalog.close()
    totals = state.pass_sizes(counts["instances"], packs)
    tiers = {}
    for tier, total in totals.items():
        numbers = dict(vars(saved.tier(tier)))
        numbers["catalog_entries"] = total
        tiers[tier] = numbers
    return {
        "tiers": tiers,
        "lost": len(saved.lost),
        "orphans": {tier: len(found) for tier, found in saved.orphans.items()},
        "waiting_for_volumes": sorted(set(saved.waiting.values())),
        "cycle_days": config.get("scrub.cycle_days"),
        "rate_mb_per_s": config.get("scrub.rate_mb_per_s"),
    }


def _print_status(numbers: dict[str, Any]) -> None:
    table = Table(title="Scrub")
    columns = ("tier", "this pass", "last whole pass", "checked", "bad", "repaired")
    for column in columns:
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier, found in numbers["tiers"].items():
        table.add_row(
            tier,
            f"{found['pass_checked']:,} of ~{found['catalog_entries']:,}",
            _when(found["last_full_pass"]),
            f"{found['checked']:,}",
            f"{found['bad']:,}",
            f"{found['repaired']:,}",
        )
    console.print(table)
    click.echo(
        f"every copy once in {numbers['cycle_days']} days, at most "
        f"{numbers['rate_mb_per_s']:g} MB/s; {numbers['lost']} instance(s) with "
        "no good copy; orphans: "
        + (", ".join(f"{n} on {t}" for t, n in numbers["orphans"].items()) or "none")
    )
    if numbers["waiting_for_volumes"]:
        click.echo(
            "offline packs wait for volume(s) "
            + ", ".join(numbers["waiting_for_volumes"])
            + " to be loaded"
        )


def _when(seconds: float) -> str:
    if not seconds:
        return "never"
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")
