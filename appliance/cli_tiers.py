"""Command line for the tiers: ``tiers``, ``migrate``, ``recall``.

These commands work on the same catalog and tiers as a running service
(LMDB serialises writers across processes); a migration takes a lock so
that the command line and the service's nightly run never overlap.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance import actions, logs, overview
from appliance.cli_interrupt import exit_if_interrupted, interruptible
from appliance.cli_shared import (
    Loader,
    config_option,
    data_dir_option,
    open_archive,
    recall_one,
    require_catalog,
)
from appliance.config import Config
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)


def register(main: click.Group, load: Loader) -> None:
    """Add the tier commands to ``main``; ``load`` reads the configuration."""

    @main.command()
    @config_option
    @data_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def tiers(config_file: Path | None, data_dir: str | None, as_json: bool) -> None:
        """Usage, capacity, watermarks and studies of every tier."""
        config = load(config_file, {"storage.data_dir": data_dir})
        with open_archive(config) as (catalog, opened):
            rows = overview.tier_rows(config, catalog, opened)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        _print_tiers(rows)

    @main.command()
    @config_option
    @data_dir_option
    @click.option("--dry-run", is_flag=True, help="Print what would be done, why.")
    @click.option("--now", "run_now", is_flag=True, help="Do it now, with progress.")
    @click.option(
        "--watermarks-only", is_flag=True, help="Only releases for watermarks."
    )
    def migrate(
        config_file: Path | None,
        data_dir: str | None,
        dry_run: bool,
        run_now: bool,
        watermarks_only: bool,
    ) -> None:
        """Plan, or run, the migration rules and watermark releases."""
        if dry_run == run_now:
            raise click.UsageError("give exactly one of --dry-run and --now")
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        from appliance.hsm.jobs import MigrationJob

        # Before the lock, which would be made in a data directory that is
        # not an archive's (or fail in one that does not exist).
        require_catalog(config)
        steps_done = 0
        with (
            _migration_lock(config),
            open_archive(config, writer=True) as (
                catalog,
                opened,
            ),
            # A step is never stopped half way (a pack half written to a
            # write-once volume is room lost): every signal waits for it.
            interruptible(at_once=False) as interrupted,
        ):
            job = MigrationJob(catalog, opened, config)
            plan = job.plan(watermarks_only=watermarks_only)
            _print_plan(plan)
            if dry_run or not plan.actions:
                return
            with progress_bar() as progress:
                task = progress.add_task("migrating", total=len(plan.actions))

                def shown(finished: int, _total: int) -> None:
                    nonlocal steps_done
                    steps_done = finished
                    progress.update(task, completed=finished)

                outcomes = job.run(plan, shown, interrupted.is_set)
        failed = [o for o in outcomes if not o.ok]
        if interrupted.is_set() and steps_done < len(plan.actions):
            _print_failed(failed)
            exit_if_interrupted(interrupted, steps_done, len(plan.actions), "step(s)")
        moved = sum(o.bytes for o in outcomes)
        # A move is a copy and then a release: counted as what was done.
        done = Counter(o.action for o in outcomes if o.ok)
        click.echo(
            f"{len(plan.actions)} planned step(s) run: {done['copy']} copy(ies) "
            f"made, {done['release']} release(s), {len(failed)} failed; "
            f"{moved:,} bytes of packs written"
        )
        _print_failed(failed)
        sys.exit(1 if failed else 0)

    @main.command()
    @config_option
    @data_dir_option
    @click.argument("study_uids", nargs=-1, required=True)
    def recall(
        config_file: Path | None, data_dir: str | None, study_uids: tuple[str, ...]
    ) -> None:
        """Bring studies back online from nearline, offline volumes or, when
        no nearer copy is readable, the mirror."""
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        from appliance.hsm.recall import Recaller
        from appliance.restore.reasons import while_restoring

        incomplete = done = 0
        with (
            open_archive(config, mirror=True) as (catalog, opened),
            interruptible() as interrupted,
        ):
            recaller = Recaller(
                catalog, opened, failed=while_restoring(config.restore_folder)
            )
            for uid in study_uids:
                # Ctrl-C lets the study in flight finish: its files are
                # written before the catalog counts them. A second one
                # stops its recall, which removes the files it wrote.
                if interrupted.is_set():
                    break
                if not actions.is_study(catalog, uid):
                    click.echo(f"{uid!r}: no such study in the catalog", err=True)
                    incomplete += 1
                else:
                    incomplete += not recall_one(recaller, uid)
                done += 1
        exit_if_interrupted(interrupted, done, len(study_uids), "study(ies)")
        sys.exit(1 if incomplete else 0)


@contextmanager
def _migration_lock(config: Config) -> Iterator[None]:
    try:
        with actions.migration_lock(config):
            yield
    except actions.MigrationRunning as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


def _print_failed(failed: list[Any]) -> None:
    for outcome in failed:
        click.echo(
            f"  {outcome.action} {outcome.study_uid} -> {outcome.tier}: "
            f"{outcome.problem}"
        )


def _print_tiers(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Tiers")
    columns = (
        "tier",
        "studies",
        "instance bytes",
        "pack bytes",
        "used",
        "capacity",
        "marks",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "tier" else "right")
    for row in rows:
        capacity = row["capacity_bytes"]
        used = row["used_bytes"]
        percent = f" ({100 * used / capacity:.0f}%)" if capacity else ""
        marks = (
            f"{row['low_watermark']:g}% / {row['high_watermark']:g}%"
            if row["high_watermark"] is not None
            else "-"
        )
        table.add_row(
            row["tier"],
            f"{row['studies']:,}",
            size(row["instance_bytes"]),
            size(row["pack_bytes"]),
            "-" if used is None else size(used) + percent,
            "-" if capacity is None else size(capacity),
            marks,
        )
    console.print(table)


def _print_plan(plan: Any) -> None:
    """One line per decision: what, which study, between which tiers, why."""
    for usage in plan.usage:
        click.echo(
            f"{usage.tier}: {usage.percent:.1f}% used "
            f"(watermarks {usage.low:g}% / {usage.high:g}%)"
        )
    holds = len(plan.decisions) - len(plan.actions)
    click.echo(f"{len(plan.actions)} step(s) planned, {holds} study(ies) held")
    if not plan.decisions:
        click.echo(
            "  no rule applies to any study now, and no tier is above its high "
            "watermark (rules: appliance config example; docs/policies.md)"
        )
    for decision in plan.decisions:
        click.echo(f"  {decision}")
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
