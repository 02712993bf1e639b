"""Command line for the tiers: ``tiers``, ``migrate``, ``recall``, ``volumes``.

These commands work on the same catalog and tiers as a running service
(LMDB serialises writers across processes); a migration takes a lock so
that the command line and the service's nightly run never overlap.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance import logs
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)

_TIER_ORDER = ("online", "nearline", "offline")
# No single medium holds more; a larger figure is a typing mistake.
_LARGEST_VOLUME = 10**15

Loader = Callable[[Path | None, dict[str, Any]], Config]


def register(main: click.Group, load: Loader) -> None:
    """Add the tier commands to ``main``; ``load`` reads the configuration."""
    config_option = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML configuration file (every key has a default).",
    )
    data_dir_option = click.option(
        "--data-dir", help="Directory for all data (storage.data_dir)."
    )

    @main.command()
    @config_option
    @data_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def tiers(config_file: Path | None, data_dir: str | None, as_json: bool) -> None:
        """Usage, capacity, watermarks and studies of every tier."""
        config = load(config_file, {"storage.data_dir": data_dir})
        with _archive(config) as (catalog, opened):
            rows = _tier_rows(config, catalog, opened)
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

        with (
            _migration_lock(config),
            _archive(config, writer=True) as (
                catalog,
                opened,
            ),
        ):
            job = MigrationJob(catalog, opened, config)
            plan = job.plan(watermarks_only=watermarks_only)
            _print_plan(plan)
            if dry_run or not plan.actions:
                return
            with progress_bar() as progress:
                task = progress.add_task("migrating", total=len(plan.actions))
                outcomes = job.run(
                    plan, lambda done, _total: progress.update(task, completed=done)
                )
        failed = [o for o in outcomes if not o.ok]
        moved = sum(o.bytes for o in outcomes)
        click.echo(
            f"{len(outcomes)} step(s) done, {len(failed)} failed; "
            f"{moved:,} bytes of packs written"
        )
        for outcome in failed:
            click.echo(
                f"  {outcome.action} {outcome.study_uid} -> {outcome.tier}: "
                f"{outcome.problem}"
            )
        sys.exit(1 if failed else 0)

    @main.command()
    @config_option
    @data_dir_option
    @click.argument("study_uids", nargs=-1, required=True)
    def recall(
        config_file: Path | None, data_dir: str | None, study_uids: tuple[str, ...]
    ) -> None:
        """Bring studies back online from nearline or offline volumes."""
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        from appliance.hsm.recall import Recaller

        incomplete = 0
        with _archive(config) as (catalog, opened):
            recaller = Recaller(catalog, opened)
            for uid in study_uids:
                if not _is_study(catalog, uid):
                    click.echo(f"{uid!r}: no such study in the catalog", err=True)
                    incomplete += 1
                    continue
                incomplete += not _recall_one(recaller, uid)
        sys.exit(1 if incomplete else 0)

    @main.group()
    def volumes() -> None:
        """Offline volumes: list, label, loaded/unloaded, requests, verify, export."""

    @volumes.command(name="list")
    @config_option
    @data_dir_option
    def list_volumes(config_file: Path | None, data_dir: str | None) -> None:
        """Every labelled volume: where it is, its room and its packs."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _library(config)
        table = Table(title=f"Volumes ({config.get('volumes.kind')})")
        for column in ("label", "state", "capacity", "used", "free", "packs"):
            table.add_column(
                column, justify="left" if column in ("label", "state") else "right"
            )
        for info in library.list_volumes():
            state = "loaded" if info.reachable else "on the shelf"
            if info.full:
                state += ", full"
            packs = len(library.list_packs(info.label)) if info.reachable else None
            table.add_row(
                info.label,
                state,
                size(info.capacity),
                size(info.used),
                size(info.free),
                "?" if packs is None else str(packs),
            )
        console.print(table)

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    @click.option(
        "--capacity",
        required=True,
        help="Room for packs: bytes, or with K, M, G, T (powers of 1000, as "
        "media are sold), e.g. 12T for an LTO-8 cartridge.",
    )
    def label(
        config_file: Path | None, data_dir: str | None, label: str, capacity: str
    ) -> None:
        """Initialise a blank volume (its barcode, on tape) for packs."""
        config = load(config_file, {"storage.data_dir": data_dir})
        wanted = _parse_size(capacity)
        try:
            info = _library(config).label(label, wanted)
        except (ApplianceError, ValueError) as exc:
            click.echo(f"cannot label {label}: {exc}", err=True)
            sys.exit(1)
        click.echo(f"volume {info.label} labelled, {size(info.capacity)} for packs")

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def loaded(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Say a volume is back in its drive, slot or folder; the recalls
        waiting for it run now."""
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        from appliance.catalog import requests
        from appliance.hsm.recall import Recaller

        with _archive(config) as (catalog, opened), _clear_errors(label):
            library = opened.packs["offline"].library
            _known_volume(library, label)
            if hasattr(library, "load"):
                library.load(label)
            if not library.is_reachable(label):
                folder = config.volume_settings()["path"]
                click.echo(
                    f"volume {label} is not reachable yet: put it in the library "
                    f"(for a directory library, its folder back under {folder})",
                    err=True,
                )
                sys.exit(1)
            waiting = requests.close_volume_requests(catalog, label)
            recaller = Recaller(catalog, opened)
            incomplete = sum(not _recall_one(recaller, uid) for uid in waiting)
        click.echo(f"volume {label} loaded; {len(waiting)} waiting study(ies) recalled")
        sys.exit(1 if incomplete else 0)

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def unloaded(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Take a volume out of its drive (tape); report where it is."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _library(config)
        with _clear_errors(label):
            _known_volume(library, label)
            if hasattr(library, "unload") and library.is_reachable(label):
                library.unload()
            reachable = library.is_reachable(label)
        click.echo(
            f"volume {label}: {'still reachable' if reachable else 'on the shelf'}"
        )

    @volumes.command(name="requests")
    @config_option
    @data_dir_option
    def operator_requests(config_file: Path | None, data_dir: str | None) -> None:
        """What the appliance waits for a person to do."""
        config = load(config_file, {"storage.data_dir": data_dir})
        from appliance.catalog import requests

        with _archive(config) as (catalog, _opened):
            found = requests.open_requests(catalog)
        if not found:
            click.echo("no open requests")
        for request in found:
            click.echo(request.describe())

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def verify(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Read every pack of a volume back and check every instance."""
        config = load(config_file, {"storage.data_dir": data_dir})
        bad = 0
        with _archive(config) as (catalog, opened), _clear_errors(label):
            offline = opened.packs["offline"]
            packs = offline.library.list_packs(label)
            with progress_bar() as progress:
                task = progress.add_task(f"verifying {label}", total=len(packs))
                for location in packs:
                    report = offline.verify(location, opened.keys)
                    if not report.ok:
                        bad += 1
                        click.echo(report.describe(), err=True)
                    progress.advance(task)
            present = {f"{p.volume}/{p.position}" for p in packs}
            missing = _recorded_on(catalog, label) - present
        for location in sorted(missing):
            click.echo(
                f"pack at {location} is in the catalog but not on the volume", err=True
            )
        click.echo(
            f"volume {label}: {len(packs)} pack(s) read, {bad} bad, "
            f"{len(missing)} missing"
        )
        sys.exit(1 if bad or missing else 0)

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def export(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Make a volume ready for the off-site vault (finalise a disc image,
        eject a tape)."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _library(config)
        with _clear_errors(label):
            _known_volume(library, label)
            if hasattr(library, "finalise"):
                library.finalise(label)
            elif hasattr(library, "unload") and library.is_reachable(label):
                library.unload()
        where = (
            f"move its folder out of {config.volume_settings()['path']}"
            if config.get("volumes.kind") == "directory"
            else "take it out of the library"
        )
        click.echo(
            f"volume {label} is ready to leave ({where}): its packs are "
            "encrypted; the master keys must be escrowed separately"
        )

    @main.group()
    def keys() -> None:
        """The master keys that packs are encrypted under: export for the
        escrow, import on a new appliance, rotate."""

    @keys.command()
    @config_option
    @data_dir_option
    def init(config_file: Path | None, data_dir: str | None) -> None:
        """Make the master key (if there is none) and say how to escrow it."""
        from appliance.storage.keys import KeyStore, key_store_path

        config = load(config_file, {"storage.data_dir": data_dir})
        path = key_store_path(config.data_dir)
        existed = path.exists()
        try:
            store = KeyStore.create_if_missing(path)
        except ApplianceError as exc:
            click.echo(f"cannot make the key store: {exc}", err=True)
            sys.exit(1)
        state = "already there" if existed else "made"
        click.echo(
            f"master key {store.current.key_id} {state} in {path} (mode 0600).\n"
            "Every pack on the volumes and on the mirror is encrypted under it:\n"
            "without a copy of it, they cannot be read after a disaster.\n"
            "Now: appliance keys export > escrow.txt, print it or write it to\n"
            "removable media, store it away from the appliance and its volumes\n"
            "(a safe, the key escrow of your IT security office), then delete\n"
            "escrow.txt. Export again after every appliance keys rotate."
        )

    @keys.command(name="export")
    @config_option
    @data_dir_option
    def export_keys(config_file: Path | None, data_dir: str | None) -> None:
        """Print every master key in escrow form (keep it offline, safe)."""
        store = _key_store(load(config_file, {"storage.data_dir": data_dir}))
        click.echo(store.export_escrow(), nl=False)

    @keys.command(name="import")
    @config_option
    @data_dir_option
    @click.argument("escrow_file", type=click.Path(path_type=Path, dir_okay=False))
    def import_keys(
        config_file: Path | None, data_dir: str | None, escrow_file: Path
    ) -> None:
        """Add the master keys of an escrow file (disaster recovery)."""
        from appliance.storage.keys import import_escrow, key_store_path

        config = load(config_file, {"storage.data_dir": data_dir})
        try:
            store = import_escrow(
                key_store_path(config.data_dir), escrow_file.read_text()
            )
        except (ApplianceError, OSError) as exc:
            click.echo(f"cannot import {escrow_file}: {exc}", err=True)
            sys.exit(1)
        click.echo(f"{len(store.keys)} master key(s); current {store.current_id}")

    @keys.command()
    @config_option
    @data_dir_option
    def rotate(config_file: Path | None, data_dir: str | None) -> None:
        """Make a new current master key; older ones still read old packs."""
        store = _key_store(load(config_file, {"storage.data_dir": data_dir}))
        new = store.rotate()
        click.echo(f"new current master key {new.key_id}: export it to the escrow")


def require_catalog(config: Config) -> None:
    """Stop with a clear message when there is no archive where the
    configuration points: a command run from the wrong folder must not
    quietly make a new, empty one."""
    if not config.catalog_path.exists():
        click.echo(
            f"no catalog at {config.catalog_path}: nothing stored yet, or "
            "--data-dir / --config point elsewhere",
            err=True,
        )
        sys.exit(1)


def _key_store(config: Config) -> Any:
    from appliance.storage.keys import KeyStore, key_store_path

    path = key_store_path(config.data_dir)
    if not path.exists():
        click.echo(
            f"no key store at {path}: the appliance makes one when it first "
            "starts (or run appliance keys init); after a disaster, import "
            "the escrow copy with appliance keys import",
            err=True,
        )
        sys.exit(1)
    try:
        return KeyStore.load(path)
    except ApplianceError as exc:
        click.echo(f"cannot open the key store: {exc}", err=True)
        sys.exit(1)


def _is_study(catalog: Any, uid: str) -> bool:
    from appliance.catalog import copies

    if not uid.strip():
        return False
    with catalog.read() as txn:
        return copies.study_copies(catalog, txn, uid) is not None


def _known_volume(library: Any, label: str) -> None:
    if label not in {v.label for v in library.list_volumes()}:
        raise ValueError(f"no volume {label!r} is labelled in this library")


def _recorded_on(catalog: Any, label: str) -> set[str]:
    """Where the catalog says packs lie on volume ``label``."""
    with catalog.read() as txn:
        return {
            data["location"]
            for _key, data in catalog.all_records(txn, "packs")
            if data.get("tier") == "offline"
            and data["location"].partition("/")[0] == label
        }


@contextmanager
def _clear_errors(label: str) -> Iterator[None]:
    """A wrong label or an unreachable volume is one line and exit 1."""
    try:
        yield
    except (ApplianceError, ValueError) as exc:
        click.echo(f"volume {label}: {exc}", err=True)
        sys.exit(1)


def _library(config: Config) -> Any:
    from appliance.storage.volumes import open_library

    try:
        return open_library(
            config.get("volumes.kind"), config.volume_settings(), recover=False
        )
    except ApplianceError as exc:
        click.echo(f"cannot open the volume library: {exc}", err=True)
        sys.exit(1)


def _parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    cleaned = text.strip().upper().removesuffix("B")
    factor = units.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in units else cleaned
    try:
        value = int(float(number) * factor)
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{text!r} is not a size such as 800G") from None
    if not 0 < value <= _LARGEST_VOLUME:
        raise click.BadParameter("the capacity must be more than 0 and at most 1000T")
    return value


def _recall_one(recaller: Any, uid: str) -> bool:
    with progress_bar() as progress:
        task = progress.add_task(f"recalling {uid}", total=None)
        result = recaller.recall(
            uid, lambda done, total: progress.update(task, completed=done, total=total)
        )
    if result.ok:
        click.echo(f"{uid}: {result.staged} instance(s) staged online")
        return True
    click.echo(
        f"{uid}: {result.staged} staged, {len(result.missing)} not recalled", err=True
    )
    for volume in result.waiting_for:
        click.echo(f"  waiting for volume {volume}: load it, then run again", err=True)
    for problem in result.problems:
        click.echo(f"  {problem}", err=True)
    return False


@contextmanager
def _archive(config: Config, writer: bool = False) -> Iterator[tuple[Any, Any]]:
    """The catalog and the opened tiers; exits with a message if they fail."""
    from appliance.catalog.store import Catalog
    from appliance.hsm.tiers import open_tiers

    require_catalog(config)
    try:
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    except ApplianceError as exc:
        click.echo(f"cannot open the catalog: {exc}", err=True)
        sys.exit(1)
    try:
        opened = open_tiers(config, writer)
    except ApplianceError as exc:
        catalog.close()
        click.echo(f"cannot open the tiers: {exc}", err=True)
        sys.exit(1)
    try:
        yield catalog, opened
    finally:
        catalog.close()


@contextmanager
def _migration_lock(config: Config) -> Iterator[None]:
    from appliance.hsm.scheduler import MIGRATION_LOCK
    from appliance.storage.lock import TierLock

    lock = TierLock(config.data_dir, MIGRATION_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        click.echo(
            "a migration is already running (the service's or another)", err=True
        )
        sys.exit(1)
    try:
        yield
    finally:
        lock.release()


def _tier_rows(config: Config, catalog: Any, opened: Any) -> list[dict[str, Any]]:
    from appliance.catalog import copies

    counts = catalog.counts()
    studies = {tier: 0 for tier in _TIER_ORDER}
    for study in copies.all_study_copies(catalog):
        for tier in _TIER_ORDER:
            studies[tier] += study.complete_on(tier)

    from appliance.hsm.jobs import MigrationJob

    job = MigrationJob(catalog, opened, config)
    rows = []
    for tier in _TIER_ORDER:
        usage = job.usage(tier)
        rows.append(
            {
                "tier": tier,
                "studies": studies[tier],
                "instance_bytes": counts.get(f"bytes.{tier}", 0),
                "pack_bytes": counts.get(f"packbytes.{tier}", 0),
                "used_bytes": usage.used if usage else None,
                "capacity_bytes": usage.capacity if usage else None,
                "high_watermark": usage.high if usage else None,
                "low_watermark": usage.low if usage else None,
            }
        )
    return rows


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
