"""The ``appliance`` command line."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance import (
    cli_dr,
    cli_export,
    cli_hardware,
    cli_keys,
    cli_prefetch,
    cli_replication,
    cli_restore,
    cli_scrub,
    cli_tiers,
    cli_volumes,
    cli_web,
    logs,
)
from appliance import config as configuration
from appliance.cli_shared import config_option, data_dir_option
from appliance.errors import ApplianceError, ConfigError
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)
_LEVELS = ("patients", "studies", "series", "instances")


def _load(config_file: Path | None, overrides: dict[str, Any]) -> configuration.Config:
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return configuration.load(config_file, given)
    except ConfigError as exc:
        _print_problems(exc)
        sys.exit(2)


def _print_problems(exc: ConfigError) -> None:
    # Plain text: messages quote TOML such as [[peers]], which is not markup.
    for key, message in exc.problems:
        click.echo(f"{key}: {message}", err=True)


@click.group()
@click.version_option(package_name="pacs-appliance")
def main() -> None:
    """pacs-appliance: tiered storage and disaster recovery for a PACS."""


@main.command()
@config_option
@data_dir_option
@click.option("--port", type=int, help="DICOM port (node.port).")
@click.option("--bind", "bind_address", help="Address to bind (node.bind_address).")
@click.option("--ae-title", help="The appliance's AE title (node.ae_title).")
@click.option("--workers", type=int, help="Worker processes (node.workers).")
def serve(
    config_file: Path | None,
    data_dir: str | None,
    port: int | None,
    bind_address: str | None,
    ae_title: str | None,
    workers: int | None,
) -> None:
    """Run the appliance until stopped (SIGTERM or Ctrl-C)."""
    config = _load(
        config_file,
        {
            "storage.data_dir": data_dir,
            "node.port": port,
            "node.bind_address": bind_address,
            "node.ae_title": ae_title,
            "node.workers": workers,
        },
    )
    logs.setup(config.get("logging.level"), config.get("logging.format"))
    from appliance import service

    try:
        sys.exit(service.serve(config))
    except (ApplianceError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        sys.exit(1)


@main.command()
@config_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_file: Path | None, data_dir: str | None, as_json: bool) -> None:
    """Counts of patients, studies, series and instances, and tier usage."""
    config = _load(config_file, {"storage.data_dir": data_dir})
    from appliance.catalog.store import Catalog
    from appliance.storage.online import OnlineTier

    if not config.catalog_path.exists():
        click.echo(
            f"no catalog at {config.catalog_path}: nothing stored yet, or "
            "--data-dir / --config point elsewhere",
            err=True,
        )
        sys.exit(1)
    try:
        catalog = Catalog(
            config.catalog_path,
            config.get("storage.catalog_max_size"),
            readonly=True,
        )
    except ApplianceError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    counts = catalog.counts()
    catalog.close()
    online = OnlineTier(config.online_path)
    free = online.usage()[1] if config.online_path.exists() else 0

    if as_json:
        report: dict[str, Any] = {name: counts[name] for name in _LEVELS}
        report["tiers"] = {
            "online": {
                "path": str(config.online_path),
                "instance_bytes": counts.get("bytes.online", 0),
                "free_bytes": free,
            },
            **{
                tier: {
                    "instance_bytes": counts.get(f"bytes.{tier}", 0),
                    "pack_bytes": counts.get(f"packbytes.{tier}", 0),
                }
                for tier in ("nearline", "offline")
            },
        }
        restore = _restore_numbers(config)
        if restore is not None:
            report["restore"] = restore
        report["scrub"] = _scrub_numbers(config)
        click.echo(json.dumps(report, indent=2))
        return

    table = Table(title="Archive")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name in _LEVELS:
        table.add_row(name, f"{counts[name]:,}")
    console.print(table)

    tiers = Table(title="Tiers")
    for column in ("tier", "instance bytes", "pack bytes", "file system free"):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    tiers.add_row("online", size(counts.get("bytes.online", 0)), "-", size(free))
    for tier in ("nearline", "offline"):
        tiers.add_row(
            tier,
            size(counts.get(f"bytes.{tier}", 0)),
            size(counts.get(f"packbytes.{tier}", 0)),
            "-",
        )
    console.print(tiers)
    if _restore_numbers(config) is not None:
        from appliance.cli_restore import status_text

        click.echo(status_text(config.data_dir / "restore"))
    lost = _scrub_numbers(config)["lost"]
    if lost:
        click.echo(
            f"ALARM: {lost} instance(s) with no good copy left: appliance scrub report"
        )
    click.echo("studies, capacity and watermarks per tier: appliance tiers")


def _restore_numbers(config: configuration.Config) -> dict[str, Any] | None:
    """The running (or last) restore's numbers, if this appliance had one."""
    from appliance.restore.progress import Snapshot, is_pending, read

    folder = config.data_dir / "restore"
    snapshot = read(folder)
    if snapshot is None and not is_pending(folder):
        return None
    if snapshot is None:
        # The catalog is back; no data phase has written its numbers yet.
        snapshot = Snapshot(state="starting")
    numbers = snapshot.as_json()
    numbers["pending"] = is_pending(folder)
    numbers["seconds_left"] = snapshot.seconds_left
    return numbers


def _scrub_numbers(config: configuration.Config) -> dict[str, int]:
    """What the scrub found: instances with no good copy, orphans."""
    from appliance.scrub import state

    saved = state.load(state.folder_of(config.data_dir))
    orphans = sum(len(found) for found in saved.orphans.values())
    return {"lost": len(saved.lost), "orphans": orphans}


@main.command(name="import")
@config_option
@data_dir_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def import_(
    config_file: Path | None, data_dir: str | None, paths: tuple[Path, ...]
) -> None:
    """Import DICOM files and folders (a CD, an old archive) into the archive."""
    config = _load(config_file, {"storage.data_dir": data_dir})
    # The summary lists every refusal; log lines would only repeat it.
    logs.setup("ERROR", config.get("logging.format"))
    from appliance.catalog.store import Catalog
    from appliance.ingest import Ingest
    from appliance.storage.online import OnlineTier

    files, refusals = _files_under(paths)
    try:
        online = OnlineTier(config.online_path, config.get("storage.reserved_bytes"))
        online.open()
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    except ApplianceError as exc:
        click.echo(f"cannot import: {exc}", err=True)
        sys.exit(1)
    ingest = Ingest(catalog, online, config.get("storage.duplicate_policy"))
    outcomes: Counter[str] = Counter()
    try:
        with progress_bar() as progress:
            task = progress.add_task("importing", total=len(files))
            for path in files:
                result = ingest.import_file(path, "import")
                if result.ok and result.outcome is not None:
                    outcomes[result.outcome.value] += 1
                else:
                    refusals.append((path, result.reason))
                progress.advance(task)
    finally:
        ingest.close()
        catalog.close()

    outcomes["refused"] = len(refusals)
    _print_import_summary(len(files), outcomes, refusals)
    sys.exit(1 if refusals else 0)


def _files_under(paths: tuple[Path, ...]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The regular files to import, and the paths that cannot be imported."""
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if not p.is_dir())
        elif path.exists() or path.is_symlink():
            candidates = [path]
        else:
            problems.append((path, "no such file or folder"))
            continue
        for candidate in candidates:
            if candidate.is_file():
                found.append(candidate)
            elif candidate.is_symlink() and not candidate.exists():
                problems.append((candidate, "broken symbolic link"))
            else:
                problems.append((candidate, "not a regular file"))
    return found, problems


def _print_import_summary(
    total: int, outcomes: Counter[str], refusals: list[tuple[Path, str]]
) -> None:
    click.echo(
        f"{total} file(s) read: {outcomes['stored']} stored, "
        f"{outcomes['identical']} already there, "
        f"{outcomes['kept_first'] + outcomes['replaced']} duplicates resolved "
        f"by policy; {outcomes['refused']} refused"
    )
    for path, reason in refusals:
        click.echo(f"  refused {path}: {reason}")


@main.group(name="config")
def config_group() -> None:
    """Check or print configuration files."""


@config_group.command()
@click.argument("config_file", type=click.Path(path_type=Path, dir_okay=False))
def check(config_file: Path) -> None:
    """Report every error in CONFIG_FILE, with its key and what is allowed."""
    try:
        configuration.load(config_file)
    except ConfigError as exc:
        _print_problems(exc)
        click.echo(f"{len(exc.problems)} error(s) in {config_file}", err=True)
        sys.exit(1)
    click.echo(f"{config_file}: OK")


@config_group.command()
def example() -> None:
    """Print a configuration file with every key, its default and a comment."""
    click.echo(configuration.example(), nl=False)


# The other commands live in modules of their own; they share this group
# and this configuration loader.
for commands in (
    cli_tiers,
    cli_volumes,
    cli_keys,
    cli_replication,
    cli_restore,
    cli_dr,
    cli_prefetch,
    cli_hardware,
    cli_export,
    cli_scrub,
    cli_web,
):
    commands.register(main, _load)
