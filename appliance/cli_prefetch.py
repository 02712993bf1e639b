"""Command line for the RIS's appointments: ``prefetch import`` and
``prefetch appointments``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from appliance import overview
from appliance.catalog.store import Catalog, catalog_exists
from appliance.cli_shared import (
    Loader,
    config_option,
    data_dir_option,
    require_catalog,
)
from appliance.config import Config
from appliance.errors import CatalogError
from appliance.prefetch import appointments, listfile, reconcile

_DAY = 86400.0


def register(main: click.Group, load: Loader) -> None:
    """Add the ``prefetch`` commands to ``main``."""

    @main.group()
    def prefetch() -> None:
        """Appointments from the RIS, for prefetching priors."""

    @prefetch.command("import")
    @config_option
    @data_dir_option
    @click.argument(
        "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False)
    )
    def import_(
        config_file: Path | None, data_dir: str | None, files: tuple[str]
    ) -> None:
        """Record the appointments of CSV list files (docs/prefetch.md)."""
        config = load(config_file, {"storage.data_dir": data_dir})
        require_catalog(config)
        failed = False
        for name in files:
            failed |= not _import_file(config, Path(name))
        sys.exit(1 if failed else 0)

    @prefetch.command()
    @config_option
    @data_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def status(config_file: Path | None, data_dir: str | None, as_json: bool) -> None:
        """Upcoming appointments, their priors and how far each is."""
        config = load(config_file, {"storage.data_dir": data_dir})
        report = _status(config)
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        _print_status(report)

    @prefetch.command()
    @config_option
    @data_dir_option
    @click.option(
        "--done",
        "done",
        metavar="STUDY_UID",
        multiple=True,
        help="Drop a study from the list once it has been dealt with.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def mismatches(
        config_file: Path | None,
        data_dir: str | None,
        done: tuple[str, ...],
        as_json: bool,
    ) -> None:
        """Arrived studies that match no order, or another patient's."""
        config = load(config_file, {"storage.data_dir": data_dir})
        require_catalog(config)
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
        try:
            unknown = [uid for uid in done if not reconcile.forget(catalog, uid)]
            found = reconcile.mismatches(catalog)
        finally:
            catalog.close()
        for uid in unknown:
            click.echo(f"{uid}: not in the list", err=True)
        if as_json:
            click.echo(json.dumps([m.__dict__ for m in found], indent=2))
        elif not found:
            click.echo("no mismatches")
        else:
            for m in found:
                click.echo(f"{m.study_uid}  {m.reason}")
        sys.exit(1 if unknown else 0)

    @prefetch.command("appointments")
    @config_option
    @data_dir_option
    @click.option(
        "--days",
        type=click.FloatRange(min=0),
        default=7.0,
        show_default=True,
        help="Show appointments up to this many days ahead.",
    )
    @click.option(
        "--all", "show_all", is_flag=True, help="Also past and cancelled appointments."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def list_(
        config_file: Path | None,
        data_dir: str | None,
        days: float,
        show_all: bool,
        as_json: bool,
    ) -> None:
        """Appointments the RIS has sent, earliest first."""
        config = load(config_file, {"storage.data_dir": data_dir})
        found = _appointments(config, days, show_all)
        if as_json:
            click.echo(json.dumps([a.as_json() for a in found], indent=2))
            return
        _print(found)


def _status(config: Config) -> dict[str, Any]:
    """The last planner run's plans with their appointments, and counts."""
    if not catalog_exists(config.catalog_path):
        return overview.empty_prefetch_status()
    catalog = Catalog(
        config.catalog_path, config.get("storage.catalog_max_size"), readonly=True
    )
    try:
        return overview.prefetch_status(config, catalog)
    finally:
        catalog.close()


def _print_status(report: dict[str, Any]) -> None:
    hits = report["hit_rate"]
    if hits["retrieved"]:
        share = hits["online"] / hits["retrieved"]
        click.echo(
            f"hit rate, last {hits['days']} days: {share:.0%} of "
            f"{hits['retrieved']} priors online when first retrieved after "
            "their appointment"
        )
    else:
        click.echo(f"hit rate: no prior retrieved in the last {hits['days']} days")
    rows = report["appointments"]
    if not rows:
        click.echo("no appointments planned (the planner runs every prefetch.interval)")
        return
    table = Table(box=None)
    for column in ("time", "patient", "modality", "prior", "state", "detail"):
        table.add_column(column)
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["start"]))
        patient = ", ".join(pid for pid, _issuer in row["patients"])
        modality = row["modality"] or row["procedure_code"]
        if not row["priors"]:
            table.add_row(when, patient, modality, "(no prior)", "", "")
        for index, prior in enumerate(row["priors"]):
            first = index == 0
            table.add_row(
                when if first else "",
                patient if first else "",
                modality if first else "",
                prior["study_uid"],
                prior["state"],
                prior["detail"],
            )
    Console().print(table)
    click.echo(
        f"{len(rows)} appointments: {report['ready']} ready, "
        f"{report['waiting']} priors waiting for a volume, {report['late']} late"
    )


def _import_file(config: Config, path: Path) -> bool:
    try:
        text = listfile.load(path)
    except (OSError, ValueError) as exc:
        click.echo(f"{path}: cannot read: {exc}", err=True)
        return False
    found = listfile.read(text, path.name)
    if found.problems:
        click.echo(f"{path}: refused, nothing imported:", err=True)
        for problem in found.problems:
            click.echo(f"  {problem}", err=True)
        return False
    try:
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
        try:
            count = appointments.record(catalog, found.appointments)
        finally:
            catalog.close()
    except CatalogError as exc:
        click.echo(f"{path}: not imported: {exc}", err=True)
        return False
    click.echo(f"{path}: {count} appointments recorded")
    return True


def _appointments(
    config: Config, days: float, show_all: bool
) -> list[appointments.Appointment]:
    if not catalog_exists(config.catalog_path):
        return []
    catalog = Catalog(
        config.catalog_path, config.get("storage.catalog_max_size"), readonly=True
    )
    try:
        found = appointments.appointments(catalog)
    finally:
        catalog.close()
    if show_all:
        return found
    now = time.time()
    return [
        a
        for a in found
        if a.active and a.start is not None and now <= a.start <= now + days * _DAY
    ]


def _print(found: list[appointments.Appointment]) -> None:
    if not found:
        click.echo("no appointments")
        return
    table = Table(box=None)
    for column in ("time", "state", "patient", "modality", "procedure", "accession"):
        table.add_column(column)
    for a in found:
        when = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(a.start))
            if a.start is not None
            else "-"
        )
        patients = ", ".join(
            f"{p.patient_id} ({p.issuer})" if p.issuer else p.patient_id
            for p in a.patients
        )
        table.add_row(
            when,
            a.state,
            patients,
            a.modality,
            a.procedure_code,
            a.accession,
        )
    Console().print(table)
