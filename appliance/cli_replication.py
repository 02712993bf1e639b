"""Command line for the off-site mirror: ``replication status``, ``verify``
and ``rate``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from appliance import actions, logs, overview
from appliance.cli_shared import (
    Loader,
    config_option,
    data_dir_option,
    require_catalog,
)
from appliance.config import Config
from appliance.errors import (
    ApplianceError,
    ForeignMirrorError,
    TransportError,
    UnknownMirrorError,
)
from appliance.storage.lock import serving
from appliance.terminal import progress_bar, size

logger = logging.getLogger(__name__)


def register(main: click.Group, load: Loader) -> None:
    """Add the ``replication`` commands to ``main``."""

    @main.group()
    def replication() -> None:
        """The off-site mirror: status, verify, rate."""

    @replication.command()
    @config_option
    @data_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def status(config_file: Path | None, data_dir: str | None, as_json: bool) -> None:
        """State (and what stops replication), queue, recovery point, rate."""
        config = load(config_file, {"storage.data_dir": data_dir})
        report = _status(config)
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        _print_status(report)

    @replication.command()
    @config_option
    @data_dir_option
    @click.option(
        "--sample", type=int, help="Check this many packs, oldest checked first."
    )
    @click.option("--all", "check_all", is_flag=True, help="Check every pack.")
    @click.option(
        "--new-mirror",
        is_flag=True,
        help="With --all: the mirror is a new, empty one (stop the service "
        "first). Every pack is found missing there and queued again, and the "
        "next replication marks it as this archive's.",
    )
    def verify(
        config_file: Path | None,
        data_dir: str | None,
        sample: int | None,
        check_all: bool,
        new_mirror: bool,
    ) -> None:
        """Read packs back from the mirror and check every instance.

        Without options, checks the packs not checked for longest, as many
        as ``--sample`` (default 10): run it regularly and it covers the
        whole mirror. A damaged or missing pack is reported by instance,
        and its instances are queued to be sent again. A mirror that is not
        this archive's is refused first, and nothing is changed.
        """
        if new_mirror and not check_all:
            # Packs left recorded on the old mirror would have the new one
            # refused by the replicator all the same.
            raise click.UsageError("--new-mirror goes with --all")
        config = load(config_file, {"storage.data_dir": data_dir})
        if new_mirror and serving(config.online_path):
            # The running service still sends to the mirror it started
            # with: it would pack what is queued again for the old one.
            click.echo(
                "the service is running: stop it first (systemctl stop "
                "pacs-appliance), then run this again; nothing was changed",
                err=True,
            )
            sys.exit(1)
        logs.setup("WARNING", config.get("logging.format"))
        from appliance.replication.audit import AuditReport, audit

        limit = None if check_all else (sample or 10)
        report = AuditReport()
        with (
            _parts(config) as (catalog, tiers, transport),
            progress_bar() as bar,
            _mirror_errors(report),
        ):
            _refuse_a_wrong_mirror(config, catalog, transport, tiers.keys, new_mirror)
            task = bar.add_task("verifying the mirror", total=None)
            audit(
                catalog,
                transport,
                tiers.keys,
                limit,
                lambda done, total: bar.update(task, completed=done, total=total),
                report,
            )
        click.echo(_found(report))
        _print_bad(report)
        sys.exit(1 if report.bad else 0)

    @replication.command()
    @config_option
    @data_dir_option
    @click.argument("rate")
    @click.option(
        "--for", "hours", type=float, help="Hours before the timetable resumes."
    )
    def rate(
        config_file: Path | None, data_dir: str | None, rate: str, hours: float | None
    ) -> None:
        """Change the rate now: e.g. 5MB, off (no limit), pause, or
        timetable (back to the configured timetable)."""
        config = load(config_file, {"storage.data_dir": data_dir})
        try:
            click.echo(actions.set_replication_rate(config, rate, hours))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None


def _status(config: Config) -> dict[str, Any]:
    require_catalog(config)
    from appliance.catalog.store import Catalog

    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        return overview.replication_status(config, catalog)
    finally:
        catalog.close()


def _print_status(report: dict[str, Any]) -> None:
    click.echo(f"mirror:          {report['mirror']}")
    click.echo(f"state:           {report['summary']}")
    click.echo(
        f"waiting:         {report['queued_instances']:,} instances, "
        f"{size(report['queued_bytes'])}"
    )
    click.echo(f"recovery point:  {_recovery_point(report)}")
    click.echo(
        f"on the mirror:   {size(report['offsite_instance_bytes'])} of instances in "
        f"{size(report['offsite_pack_bytes'])} of packs"
    )
    click.echo(f"rate:            {report['rate']}")
    click.echo(f"last snapshot:   {report['last_snapshot'] or 'none yet'}")


def _recovery_point(report: dict[str, Any]) -> str:
    """The recovery point; "up to date" only when nothing waits and
    replication works."""
    if report["queued_instances"]:
        return f"{report['recovery_point_seconds']:,.0f} s behind"
    if report["state"] == "up to date":
        return "up to date"
    return "no instance waits"


def _refuse_a_wrong_mirror(
    config: Config, catalog: Any, transport: Any, keys: Any, new_mirror: bool
) -> None:
    """Before anything is read back: on a mirror that is not this
    archive's (a mistyped path, an unmounted folder) every pack would seem
    lost, and the whole archive be queued again."""
    from appliance.replication.identity import vet_mirror
    from appliance.replication.process import mirror_place

    try:
        vet_mirror(catalog, transport, keys, new_mirror)
    except UnknownMirrorError as exc:
        # A folder not mounted is the usual cause; for SFTP, another server.
        if config.get("mirror.kind") == "directory":
            check = "is it mounted?"
        else:
            check = "is it the server and folder replicated to so far?"
        click.echo(
            f"the mirror is refused; nothing was changed: {exc}.\n"
            f"Check the [mirror] settings: the mirror is {mirror_place(config)} "
            f"({check}). "
            "To move the archive to a new, empty mirror: stop the service, "
            "point [mirror] at the new one, run 'appliance replication verify "
            "--all --new-mirror', then start the service.",
            err=True,
        )
        sys.exit(1)


def _found(report: Any) -> str:
    """What the packs read back showed, in one line."""
    return (
        f"{report.checked} pack(s) read back: {report.good} good, "
        f"{report.damaged} damaged or missing; "
        f"{report.queued_again} instance(s) queued to be sent again"
    )


def _print_bad(report: Any) -> None:
    for line in report.bad:
        click.echo(f"  {line}", err=True)


@contextmanager
def _mirror_errors(report: Any) -> Iterator[None]:
    """The mirror is not this archive's, or could not be reached: say so;
    nothing counts as lost that was not found lost before (``report``)."""
    try:
        yield
    except ForeignMirrorError as exc:
        click.echo(f"the mirror is refused; nothing was changed: {exc}", err=True)
        sys.exit(1)
    except TransportError as exc:
        if not report.checked:
            click.echo(f"cannot reach the mirror; nothing was changed: {exc}", err=True)
            sys.exit(1)
        # The packs found lost before the connection went are queued again
        # already (each in its own transaction); the rest are not checked.
        click.echo(_found(report))
        _print_bad(report)
        click.echo(
            f"cannot reach the mirror any more, the other packs were not read "
            f"back: {exc}; run the same command again once it can be reached",
            err=True,
        )
        sys.exit(1)


class _parts:
    """The catalog, tiers and mirror transport, closed on exit."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __enter__(self) -> tuple[Any, Any, Any]:
        require_catalog(self.config)
        from appliance.catalog.store import Catalog
        from appliance.hsm.tier_folders import vet_tier_folders
        from appliance.hsm.tiers import open_tiers
        from appliance.replication.process import open_mirror

        try:
            vet_tier_folders(self.config)
        except ApplianceError as exc:
            click.echo(f"cannot open the tiers: {exc}", err=True)
            sys.exit(1)
        try:
            self.catalog = Catalog(
                self.config.catalog_path, self.config.get("storage.catalog_max_size")
            )
            self.transport = open_mirror(self.config)
            return self.catalog, open_tiers(self.config), self.transport
        except ApplianceError as exc:
            click.echo(f"cannot reach the mirror: {exc}", err=True)
            sys.exit(1)

    def __exit__(self, *_: object) -> None:
        self.transport.close()
        self.catalog.close()
