"""Command line for the audit trail: ``appliance audit show``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.table import Table

from appliance.audit import events
from appliance.audit.log import AuditLog, Record
from appliance.audit.messages import Summary, summarize
from appliance.audit.sender import Position
from appliance.audit.trail import Trail, audit_folder
from appliance.cli_shared import Loader, config_option, data_dir_option
from appliance.terminal import console, size

_OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major"}


def register(main: click.Group, load: Loader) -> None:
    """Add the ``audit`` commands to ``main``."""

    @main.group(name="audit")
    def audit() -> None:
        """The audit trail: who stored, queried, retrieved or changed what."""

    @audit.command()
    @config_option
    @data_dir_option
    @click.option(
        "--patient", "patient_id", help="Only records naming this patient ID."
    )
    @click.option(
        "--since",
        help="Only records from this time on: a date (2026-12-01, UTC) or a "
        "date and time (2026-12-01T08:00:00Z).",
    )
    @click.option(
        "--event",
        "event_name",
        help="Only this event, e.g. instances-stored, query, security-alert.",
    )
    @click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
    def show(
        config_file: Path | None,
        data_dir: str | None,
        patient_id: str | None,
        since: str | None,
        event_name: str | None,
        as_json: bool,
    ) -> None:
        """List audit records, oldest first."""
        config = load(config_file, {"storage.data_dir": data_dir})
        start = _parse_since(since) if since else None
        trail = Trail.of(config)
        chosen = list(_matching(trail.log, patient_id, start, event_name))
        if trail.log.path.exists():
            # Reading the audit log is itself audited (PS3.15 A.5.3.2).
            used = events.audit_log_used(trail.ae_title, str(trail.log.path))
            trail.record(used)
        if as_json:
            for record, summary in chosen:
                entry = {"name": record.event, **summary.as_json()}
                click.echo(json.dumps(entry, ensure_ascii=False))
            return
        _print_table(chosen)

    @audit.command()
    @config_option
    @data_dir_option
    def status(config_file: Path | None, data_dir: str | None) -> None:
        """Records in the audit log, how many were sent to the collector and
        how many wait."""
        config = load(config_file, {"storage.data_dir": data_dir})
        log = AuditLog(audit_folder(config))
        position = Position(log.folder)
        unsent = log.read_from(position.offset, 10**12, position.segment)
        waiting = sum(1 for _ in unsent)
        transport = config.get("audit.syslog_transport")
        click.echo(f"audit log: {log.path} ({size(log.size())})")
        rotated = log.rotated()
        if rotated:
            kept = size(sum(path.stat().st_size for path in rotated))
            oldest = rotated[0].name
            click.echo(f"rotated: {len(rotated)} file(s) ({kept}), {oldest} on")
        if transport == "off":
            click.echo("syslog: off (audit.syslog_transport)")
            return
        where = f"{config.get('audit.syslog_host')} over {transport}"
        click.echo(f"syslog: {position.sent} record(s) sent to {where}")
        click.echo(f"waiting: {waiting} record(s)")


def _parse_since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            "use a date such as 2026-12-01 or 2026-12-01T08:00:00Z",
            param_hint="--since",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _matching(
    log: AuditLog,
    patient_id: str | None,
    start: datetime | None,
    event_name: str | None,
) -> Iterator[tuple[Record, Summary]]:
    for record in log.records():
        if event_name and record.event != event_name:
            continue
        if start and _time_of(record) < start:
            continue
        try:
            summary = summarize(record.message)
        except ValueError:
            continue
        if patient_id is not None and patient_id not in summary.patients:
            continue
        yield record, summary


def _time_of(record: Record) -> datetime:
    try:
        return datetime.fromisoformat(record.time.replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _print_table(chosen: list[tuple[Record, Summary]]) -> None:
    table = Table(title=f"Audit records: {len(chosen)}")
    for column in ("time (UTC)", "event", "outcome", "user / AE", "patient", "study"):
        table.add_column(column, overflow="fold")
    for record, summary in chosen:
        table.add_row(
            summary.time.replace("T", " ")[:19],
            record.event,
            _OUTCOMES.get(summary.outcome, str(summary.outcome)),
            summary.users[0] if summary.users else "",
            "\n".join(summary.patients),
            "\n".join(summary.studies),
        )
    console.print(table)
