"""Command line for a migration to another PACS: ``appliance export``."""

from __future__ import annotations

import datetime
import logging
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    TaskID,
    TextColumn,
)

from appliance import logs
from appliance.cli_shared import Loader, config_option, data_dir_option, open_archive
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.terminal import size, transfer_bar

logger = logging.getLogger(__name__)

# UIDs printed per kind of problem; the report file lists them all.
_SHOWN = 50
_DASHED = re.compile(r"\d{4}-\d{2}-\d{2}")
_DIGITS = re.compile(r"\d{8}")


def register(main: click.Group, load: Loader) -> None:
    """Add the ``export`` command to ``main``."""

    @main.command()
    @config_option
    @data_dir_option
    @click.option(
        "--to", "target", required=True, help="The receiver, as AE@host:port."
    )
    @click.option(
        "--since",
        help="Only studies the appliance received on or after this day "
        "(YYYY-MM-DD or YYYYMMDD, from 00:00 local time).",
    )
    @click.option(
        "--calling-ae", help="The AE title to call from (default: node.ae_title)."
    )
    def export(
        config_file: Path | None,
        data_dir: str | None,
        target: str,
        since: str | None,
        calling_ae: str | None,
    ) -> None:
        """Send every instance of the archive to another DICOM node by
        C-STORE, exactly as stored; studies not online are recalled first.
        Interrupted, run it again: what the receiver accepted is not sent
        twice. Exits 1 when any instance was refused or not sent."""
        destination = _destination(target)
        start = _since(since)
        config = load(config_file, {"storage.data_dir": data_dir})
        if calling_ae is None:
            calling_ae = config.get("node.ae_title")
        # An empty --calling-ae is refused, not taken for the default.
        calling = _calling_ae(calling_ae)
        logs.setup("WARNING", config.get("logging.format"))
        # The export reports every refusal itself, with the receiver's words.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        try:
            report, path = _export(config, destination, calling, start)
        except ApplianceError as exc:
            click.echo(f"export stopped: {exc}", err=True)
            sys.exit(1)
        _print_report(report, path)
        sys.exit(0 if report.ok else 1)


def _destination(text: str) -> Any:
    from appliance.export.destination import parse_destination

    try:
        return parse_destination(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from None


def _since(text: str | None) -> float | None:
    """Seconds since the epoch at 00:00 local time of the day given."""
    if text is None:
        return None
    for layout, shape in (("%Y-%m-%d", _DASHED), ("%Y%m%d", _DIGITS)):
        if not shape.fullmatch(text.strip()):
            continue
        try:
            day = datetime.datetime.strptime(text.strip(), layout)
            return day.timestamp()
        except (ValueError, OverflowError, OSError):
            # Not a day of the calendar, or one local time cannot express.
            break
    raise click.BadParameter(
        f"{text!r} is not a date as YYYY-MM-DD or YYYYMMDD", param_hint="--since"
    )


def _calling_ae(text: str) -> str:
    from appliance.export.destination import ae_title_problem

    problem = ae_title_problem(text)
    if problem:
        raise click.BadParameter(f"{text!r}: {problem}", param_hint="--calling-ae")
    return text.strip()


def _tls_args(config: Config, destination: Any) -> Any:
    """TLS when the destination is a [[peers]] entry (same AE title and
    port) configured ``tls = true``."""
    from appliance import tls

    peer = config.peer(destination.ae_title)
    if peer is None or peer.port != destination.port:
        return None
    return tls.client_args(config, peer)


def _export(
    config: Config, destination: Any, calling: str, since: float | None
) -> tuple[Any, Path]:
    """One run with a progress bar; the report and where it was saved."""
    from appliance.export.run import Exporter, select
    from appliance.export.sender import Sender, Timeouts
    from appliance.export.state import ExportState

    folder = config.data_dir / "exports" / destination.folder_name
    timeouts = Timeouts(
        association=config.get("timeouts.association"),
        dimse=config.get("timeouts.dimse"),
        network=config.get("timeouts.network"),
        connect=config.get("timeouts.connect"),
    )
    with open_archive(config, mirror=True) as (catalog, tiers):
        state = ExportState(folder).open()
        try:
            selection = select(catalog, state, since)
            with _Bar() as bar:
                exporter = Exporter(
                    catalog,
                    tiers,
                    state,
                    Sender(
                        destination, calling, timeouts, _tls_args(config, destination)
                    ),
                    config.get("migration.min_copies"),
                    bar,
                )
                with _stopped_by_signals(exporter):
                    report = exporter.run(selection)
            return report, report.save(folder)
        finally:
            state.close()


class _Bar:
    """The export's progress on stderr: instances, bytes, rate, time left."""

    def __init__(self) -> None:
        self.progress = transfer_bar(TextColumn("{task.fields[instances]}"))
        self.task: TaskID | None = None
        self.total = 0
        self.done = 0

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def begin(self, instances: int, size: int) -> None:
        self.total = instances
        self.task = self.progress.add_task(
            "exporting", total=size, instances=f"0/{instances} instances"
        )

    def recalling(self, study_uid: str, done: int, total: int) -> None:
        if self.task is not None:
            what = f"recalling {study_uid} ({done}/{total})"
            self.progress.update(self.task, description=what)

    def answered(self, size: int) -> None:
        if self.task is None:
            return
        self.done += 1
        self.progress.update(
            self.task,
            advance=size,
            description="exporting",
            instances=f"{self.done}/{self.total} instances",
        )


@contextmanager
def _stopped_by_signals(exporter: Any) -> Iterator[None]:
    """Ctrl-C or SIGTERM: stop after the instance in flight, its answer
    recorded; a second one stops at once."""
    previous = {
        number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)
    }

    def stop(number: int, _frame: Any) -> None:
        exporter.stop(f"interrupted by {signal.Signals(number).name}")
        for each, handler in previous.items():
            signal.signal(each, handler)

    for number in previous:
        signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _print_report(report: Any, path: Path) -> None:
    from appliance.export.report import hex_status

    click.echo(
        f"export to {report.destination}: {report.sent:,} instance(s) sent "
        f"({size(report.sent_bytes)}), {report.sent_before:,} accepted by earlier "
        f"runs; refused: {len(report.refused):,}; not sent: "
        f"{report.not_sent_count:,}"
    )
    for refused in report.refused[:_SHOWN]:
        comment = f" ({refused.comment})" if refused.comment else ""
        click.echo(
            f"  refused: instance {refused.sop_instance_uid} of study "
            f"{refused.study_uid}: status {hex_status(refused.status)}{comment}",
            err=True,
        )
    if len(report.refused) > _SHOWN:
        click.echo(f"  ... and {len(report.refused) - _SHOWN} more refused", err=True)
    for entry in report.not_sent[:_SHOWN]:
        what = (
            f"instance {entry.sop_instance_uid} of study {entry.study_uid}"
            if entry.sop_instance_uid
            else f"{entry.instances} instance(s) of study {entry.study_uid}"
        )
        click.echo(f"  not sent: {what}: {entry.reason}", err=True)
    if len(report.not_sent) > _SHOWN:
        click.echo(f"  ... and {len(report.not_sent) - _SHOWN} more not sent", err=True)
    if report.stopped:
        click.echo(
            f"the export stopped: {report.stopped}; what was sent is recorded, "
            "run it again to continue",
            err=True,
        )
    click.echo(f"report: {path}")
