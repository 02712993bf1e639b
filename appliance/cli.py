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
    audit,
    cli_audit,
    cli_dr,
    cli_export,
    cli_hardware,
    cli_keys,
    cli_metrics,
    cli_prefetch,
    cli_replication,
    cli_restore,
    cli_scrub,
    cli_tiers,
    cli_volumes,
    cli_web,
    logs,
    overview,
    tls,
)
from appliance import config as configuration
from appliance.cli_interrupt import Group, exit_if_interrupted, interruptible
from appliance.cli_shared import (
    config_option,
    data_dir_option,
    no_catalog,
)
from appliance.errors import ApplianceError, ConfigError
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)


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


@click.group(cls=Group)
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
@click.option("--web-port", type=int, help="HTTP port (web.port).")
def serve(
    config_file: Path | None,
    data_dir: str | None,
    port: int | None,
    bind_address: str | None,
    ae_title: str | None,
    workers: int | None,
    web_port: int | None,
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
            "web.port": web_port,
        },
    )
    logs.setup_service(config)
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
    from appliance.catalog.store import Catalog, catalog_exists

    if not catalog_exists(config.catalog_path):
        click.echo(no_catalog(config.catalog_path), err=True)
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
    try:
        report = overview.archive_status(config, catalog)
    finally:
        catalog.close()

    if as_json:
        click.echo(json.dumps(report, indent=2))
        return

    table = Table(title="Archive")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name in overview.LEVELS:
        table.add_row(name, f"{report[name]:,}")
    console.print(table)

    tiers = Table(title="Tiers")
    for column in ("tier", "instance bytes", "pack bytes", "file system free"):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    online = report["tiers"]["online"]
    tiers.add_row(
        "online", size(online["instance_bytes"]), "-", size(online["free_bytes"])
    )
    for tier in ("nearline", "offline"):
        numbers = report["tiers"][tier]
        tiers.add_row(
            tier, size(numbers["instance_bytes"]), size(numbers["pack_bytes"]), "-"
        )
    console.print(tiers)
    if "restore" in report:
        from appliance.cli_restore import status_text

        click.echo(status_text(config.restore_folder))
    lost = report["scrub"]["lost"]
    if lost:
        click.echo(
            f"ALARM: {lost} instance(s) with no good copy left: appliance scrub report"
        )
    click.echo(f"mirror: {report['replication']['summary']}")
    reports = report["commitment"]["pending_reports"]
    if reports:
        click.echo(f"storage commitment: {reports} report(s) not delivered yet")
    click.echo("studies, capacity and watermarks per tier: appliance tiers")


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
    from appliance.hsm.tier_folders import online_tier, vet_tier_folders
    from appliance.ingest import Ingest

    files, skipped = _files_under(paths)
    try:
        vet_tier_folders(config)
        online = online_tier(config)
        online.open()
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    except ApplianceError as exc:
        click.echo(f"cannot import: {exc}", err=True)
        sys.exit(1)
    ingest = Ingest(catalog, online, config.get("storage.duplicate_policy"))
    outcomes: Counter[str] = Counter()
    imported: list[str] = []
    refusals: list[tuple[Path, str]] = []
    read = 0
    # A second Ctrl-C lets the file in flight finish too (milliseconds):
    # stopped between its move into place and its commit, it would be a
    # file no catalog entry names.
    with interruptible(at_once=False) as interrupted:
        try:
            with progress_bar() as progress:
                task = progress.add_task("importing", total=len(files))
                for path in files:
                    if interrupted.is_set():
                        break
                    result = ingest.import_file(path, "import")
                    if result.ok and result.outcome is not None:
                        outcomes[result.outcome.value] += 1
                        imported.append(result.sop_instance_uid)
                    else:
                        refusals.append((path, result.reason))
                    read += 1
                    progress.advance(task)
        finally:
            source = ", ".join(str(path) for path in paths)
            audit.instances_imported(config, catalog, imported, source)
            ingest.close()
            catalog.close()

    outcomes["refused"] = len(refusals)
    _print_import_summary(read, outcomes, refusals, skipped)
    exit_if_interrupted(interrupted, read, len(files), "file(s)")
    sys.exit(1 if refusals or skipped else 0)


def _files_under(paths: tuple[Path, ...]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The regular files to import, and the entries skipped without being
    read, with why: every entry below ``paths`` but the folders is in one."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            # rglob does not follow links to folders below: they are
            # listed, and skipped below, rather than left out of the counts.
            candidates = sorted(
                p for p in path.rglob("*") if p.is_symlink() or not p.is_dir()
            )
        elif path.exists() or path.is_symlink():
            candidates = [path]
        else:
            skipped.append((path, "no such file or folder"))
            continue
        for candidate in candidates:
            problem = _not_importable(candidate)
            if problem is None:
                found.append(candidate)
            else:
                skipped.append((candidate, problem))
    return found, skipped


def _not_importable(path: Path) -> str | None:
    """Why ``path`` is not read at all, or None for a regular file.

    Only the file's type is looked at, never its contents: a FIFO or a
    device opened for reading could block the import for ever.
    """
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    if path.is_dir():
        return "symbolic link to a folder, not followed"
    return "not a regular file"


def _print_import_summary(
    total: int,
    outcomes: Counter[str],
    refusals: list[tuple[Path, str]],
    skipped: list[tuple[Path, str]],
) -> None:
    """One line whose numbers add up: the files read are stored, already
    there, resolved by policy or refused; the entries skipped were not read."""
    line = (
        f"{total} file(s) read: {outcomes['stored']} stored, "
        f"{outcomes['identical']} already there, "
        f"{outcomes['kept_first'] + outcomes['replaced']} duplicates resolved "
        f"by policy, {outcomes['refused']} refused"
    )
    if skipped:
        line += f"; {len(skipped)} skipped, not read"
    click.echo(line)

    for path, reason in refusals:
        click.echo(f"  refused {path}: {reason}")
    for path, reason in skipped:
        click.echo(f"  skipped {path}: {reason}")


@main.group(name="config")
def config_group() -> None:
    """Check or print configuration files."""


@config_group.command()
@click.argument("config_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--mirror-files/--no-mirror-files",
    default=True,
    help="Check that the mirror's key file, known_hosts file or folder exist "
    "(the default); --no-mirror-files for a file checked before they are put "
    "in place, as the ansible role does.",
)
def check(config_file: Path, mirror_files: bool) -> None:
    """Report every error in CONFIG_FILE, with its key and what is allowed."""
    try:
        loaded = configuration.load(config_file)
        # The certificate, key and CA files, when TLS is in use.
        problems = tls.file_problems(loaded)
        if mirror_files:
            problems += configuration.mirror_file_problems(loaded)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _print_problems(exc)
        click.echo(f"{len(exc.problems)} error(s) in {config_file}", err=True)
        sys.exit(1)
    for caveat in tls.unchecked_bindings(loaded):
        click.echo(f"warning: {caveat}", err=True)
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
    cli_audit,
    cli_metrics,
):
    commands.register(main, _load)
