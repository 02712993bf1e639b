"""Command line for disaster-recovery checks: ``appliance dr drill`` and
``appliance dr report``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance import logs, overview
from appliance.cli_shared import Loader, config_option, data_dir_option, require_catalog
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)

# Failures printed; the drill's record lists them all.
_SHOWN = 50


def register(main: click.Group, load: Loader) -> None:
    """Add the ``dr`` commands to ``main``."""

    @main.group(name="dr")
    def dr() -> None:
        """Disaster-recovery checks: restore drills, recovery point and time."""

    @dr.command()
    @config_option
    @data_dir_option
    @click.option(
        "--studies",
        type=click.IntRange(min=1),
        help="Studies to restore and check (default drills.studies).",
    )
    def drill(
        config_file: Path | None, data_dir: str | None, studies: int | None
    ) -> None:
        """Restore a random sample of replicated studies from the mirror into
        a scratch folder and check every instance: its size and SHA-256, and
        the attributes the catalog answers C-FIND with. Reads the catalog
        only; runs while the appliance serves. Exits 1 when anything fails."""
        config = load(
            config_file, {"storage.data_dir": data_dir, "drills.studies": studies}
        )
        # The summary lists every failure; log lines would only repeat them.
        logs.setup("ERROR", config.get("logging.format"))
        require_catalog(config)
        ok = _drill(config)
        sys.exit(0 if ok else 1)

    @dr.command()
    @config_option
    @data_dir_option
    @click.option(
        "--last",
        type=click.IntRange(min=1),
        default=10,
        show_default=True,
        help="Drills to show.",
    )
    def report(config_file: Path | None, data_dir: str | None, last: int) -> None:
        """The last drills, the recovery point (the oldest instance not yet
        on the mirror) and the estimated time to restore the whole archive."""
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        require_catalog(config)
        _report(config, last)


def _drill(config: Config) -> bool:
    from appliance.restore.drill import failure_text
    from appliance.restore.drill_job import perform

    with progress_bar() as bar:
        task = bar.add_task("restoring the sample", total=None)
        try:
            result, path = perform(
                config,
                config.get("drills.studies"),
                lambda done, total: bar.update(task, completed=done, total=total),
            )
        except ApplianceError as exc:
            bar.stop()
            click.echo(f"restore drill did not run: {exc}", err=True)
            return False
    outcome = "passed" if result.ok else f"FAILED ({len(result.failures)} problems)"
    click.echo(
        f"restore drill {outcome}: {len(result.studies)} studies, "
        f"{result.instances:,} instances in the sample; {size(result.bytes)} "
        f"restored and verified in {_duration(result.seconds)} "
        f"({result.rate / 1e6:.1f} MB/s); "
        f"{size(result.mirror_bytes)} read from the mirror"
    )
    click.echo("sample:")
    for study_uid in result.studies:
        click.echo(f"  {study_uid}")
    for failure in result.failures[:_SHOWN]:
        click.echo(f"  {failure_text(failure)}", err=True)
    if len(result.failures) > _SHOWN:
        click.echo(f"  ... and {len(result.failures) - _SHOWN} more", err=True)
    click.echo(f"record: {path}")
    return result.ok


def _report(config: Config, last: int) -> None:
    from appliance.catalog.store import Catalog

    try:
        catalog = Catalog(
            config.catalog_path, config.get("storage.catalog_max_size"), readonly=True
        )
    except ApplianceError as exc:
        click.echo(f"cannot open the catalog: {exc}", err=True)
        sys.exit(1)
    try:
        drills, waiting, estimate = overview.dr_report(config, catalog, last)
    finally:
        catalog.close()
    _print_drills(drills)
    _print_objectives(waiting, estimate)


def _print_drills(drills: list[Any]) -> None:
    if not drills:
        click.echo("no restore drill yet: appliance dr drill")
        return
    table = Table(title="Restore drills")
    for column in ("date (UTC)", "studies", "instances", "time", "rate", "result"):
        table.add_column(column, justify="left" if column == "date (UTC)" else "right")
    for drill in drills:
        result = "passed" if drill.ok else f"FAILED ({drill.failures})"
        table.add_row(
            drill.date,
            f"{drill.studies:,}",
            f"{drill.instances:,}",
            _duration(drill.seconds),
            f"{drill.rate / 1e6:.1f} MB/s",
            result,
        )
    console.print(table)


def _print_objectives(waiting: Any, estimate: Any) -> None:
    if waiting.oldest is None:
        click.echo("recovery point: nothing waiting for the mirror")
    else:
        click.echo(
            f"recovery point: {_duration(waiting.recovery_point_age)} "
            f"({waiting.instances:,} instance(s), {size(waiting.bytes)} waiting "
            "for the mirror)"
        )
    if estimate.seconds is None:
        click.echo(f"full restore: unknown: {estimate.basis}")
    else:
        click.echo(
            f"full restore: about {_duration(estimate.seconds)} "
            f"({size(estimate.bytes)} of {estimate.basis})"
        )


def _duration(seconds: float) -> str:
    """Seconds for people: 4.2 s, 12 min 5 s, 3 h 20 min, 2 d 4 h."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"
