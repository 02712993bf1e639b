"""Command line for disaster recovery: ``appliance restore --from mirror``."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from appliance import logs
from appliance.cli_shared import Loader, config_option, data_dir_option
from appliance.config import Config
from appliance.errors import ApplianceError, KeyStoreError, TransportError
from appliance.terminal import errors, progress_bar, size

logger = logging.getLogger(__name__)

# UIDs printed per kind of problem; the report file lists them all.
_SHOWN = 50
_MEGABYTES = re.compile(r"\d+(\.\d*)?")


def register(main: click.Group, load: Loader) -> None:
    """Add the ``restore`` command to ``main``."""

    @main.command()
    @config_option
    @data_dir_option
    @click.option(
        "--from",
        "source",
        type=click.Choice(["mirror", "volumes"]),
        required=True,
        help="Where the archive comes back from: the configured mirror, or "
        "the offline volumes of the [volumes] library.",
    )
    @click.option(
        "--scan",
        is_flag=True,
        help="Rebuild the catalog from every pack's manifest instead of the "
        "latest catalog snapshot and the journal.",
    )
    @click.option(
        "--rate",
        help="Most bytes per second read from the mirror: a number of MB/s, "
        "or 20MB, 500KB, 100Mbit; default no limit.",
    )
    @click.option(
        "--cache-gb",
        type=click.FloatRange(min=0.0),
        default=4.0,
        show_default=True,
        help="Local room, in GB, for packs fetched from the mirror.",
    )
    def restore(
        config_file: Path | None,
        data_dir: str | None,
        source: str,
        scan: bool,
        rate: str | None,
        cache_gb: float,
    ) -> None:
        """Rebuild an empty appliance from the off-site mirror (or the
        offline volumes): the catalog first, then every instance, newest
        studies first, each checked against its SHA-256. Import the master
        keys first (appliance keys import). Interrupted, run it again: it
        continues where it stopped.
        Exits 1 when any instance is missing or corrupt."""
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        limit = _rate(rate)
        with _failures():
            if source == "volumes":
                from appliance.cli_restore_volumes import restore_from_volumes

                ok = restore_from_volumes(config)
            else:
                ok = _restore(config, scan, limit, int(cache_gb * 1e9))
        sys.exit(0 if ok else 1)


def _rate(text: str | None) -> str | None:
    """The rate as a timetable of one rate (None: no limit)."""
    from appliance.replication import bandwidth

    if text is None:
        return None
    chosen = f"{text}MB" if _MEGABYTES.fullmatch(text) else text
    try:
        value = bandwidth.parse_rate(chosen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rate") from None
    if value == 0:
        raise click.BadParameter("a restore cannot pause", param_hint="--rate")
    return None if value is None else chosen


def _restore(config: Config, scan: bool, rate: str | None, cache_bytes: int) -> bool:
    """Both phases and the report; whether everything came back."""
    from appliance.replication.bandwidth import Limiter, parse_timetable
    from appliance.replication.process import open_mirror
    from appliance.restore.cache import PackCache
    from appliance.restore.mirror import Fetcher, survey
    from appliance.restore.report import final_report
    from appliance.storage.lock import claim_tier
    from appliance.storage.online import OnlineTier

    keys = _keys(config)
    OnlineTier(config.online_path).open()
    # No appliance may serve this tier while it is restored.
    lock = claim_tier(config.online_path, wait_for_workers=0.0)
    folder = config.data_dir / "restore"
    folder.mkdir(parents=True, exist_ok=True)
    limiter = Limiter(parse_timetable(rate)) if rate else None
    try:
        with open_mirror(config) as transport:
            fetcher = Fetcher(transport, limiter)
            contents = survey(transport)
            if not contents.packs:
                click.echo("the mirror holds no pack: nothing to restore", err=True)
                return False
            cache = PackCache(folder / "packs", fetcher, cache_bytes)
            rebuild = _rebuild(config, scan, fetcher, contents, keys, cache)
            catalog = _catalog(config)
            try:
                _restore_data(config, catalog, keys, cache, contents)
                report = final_report(catalog, contents, rebuild.note)
            finally:
                catalog.close()
    finally:
        if limiter is not None:
            limiter.close()
        lock.release()
    _print_report(report, report.save(folder))
    return report.ok


def _keys(config: Config) -> Any:
    from appliance.storage.keys import KeyStore, key_store_path

    try:
        return KeyStore.load(key_store_path(config.data_dir))
    except KeyStoreError as exc:
        raise KeyStoreError(
            f"{exc}: import the escrow copy of the master keys first "
            "(appliance keys import FILE)"
        ) from exc


def _catalog(config: Config) -> Any:
    from appliance.catalog.store import Catalog

    return Catalog(config.catalog_path, config.get("storage.catalog_max_size"))


def _rebuild(
    config: Config, scan: bool, fetcher: Any, contents: Any, keys: Any, cache: Any
) -> Any:
    """The catalog phase, with a progress bar for the packs it reads."""
    from appliance.restore.rebuild import rebuild_catalog

    with progress_bar() as bar:
        task = bar.add_task("rebuilding the catalog", total=None)
        rebuild = rebuild_catalog(
            config.catalog_path,
            config.get("storage.catalog_max_size"),
            config.data_dir / "restore" / "work",
            fetcher,
            contents,
            keys,
            cache,
            scan,
            lambda done, total: bar.update(task, completed=done, total=total),
        )
    _print_rebuild(rebuild, scan)
    return rebuild


def _restore_data(
    config: Config, catalog: Any, keys: Any, cache: Any, contents: Any
) -> None:
    """The data phase, with a progress bar of bytes, rate and time left."""
    from appliance.restore.data import DataRestore

    restorer = DataRestore(
        catalog,
        config.online_path,
        config.get("storage.reserved_bytes"),
        keys,
        cache,
        contents,
        config.data_dir / "restore",
    )
    plan = restorer.plan()
    with _transfer_bar() as bar:
        task = bar.add_task("restoring", total=plan.bytes)
        restorer.run(
            plan,
            lambda done, total, what: bar.update(
                task, completed=done, description=f"restoring {what}"
            ),
        )


def _transfer_bar() -> Progress:
    """Bytes restored, the rate and the time left, on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=errors,
    )


def _print_rebuild(rebuild: Any, scan: bool) -> None:
    if rebuild.done_before:
        note = "" if not scan else " (--scan ignored: the data restore has begun)"
        click.echo(f"catalog: rebuilt by an earlier run, from {rebuild.source}{note}")
    else:
        click.echo(f"catalog: rebuilt from {rebuild.source}")
    if rebuild.set_aside is not None:
        click.echo(f"  the empty catalog found was set aside in {rebuild.set_aside}")


def _print_report(report: Any, path: Path) -> None:
    click.echo(
        f"restored and verified: {len(report.restored):,} instance(s), "
        f"{size(report.restored_bytes)}; missing: {len(report.missing):,}; "
        f"corrupt: {len(report.corrupt):,}; not tried yet: {len(report.waiting):,}"
    )
    for kind, problems in (
        ("missing", report.missing),
        ("corrupt", report.corrupt),
        ("not tried yet", report.waiting),
    ):
        for problem in problems[:_SHOWN]:
            pack = f", pack {problem.pack_id}" if problem.pack_id else ""
            click.echo(
                f"  {kind}: instance {problem.sop_instance_uid} of study "
                f"{problem.study_uid}: {problem.reason}{pack}",
                err=True,
            )
        if len(problems) > _SHOWN:
            click.echo(f"  ... and {len(problems) - _SHOWN} more {kind}", err=True)
    if report.waiting:
        click.echo("run the restore again to continue", err=True)
    click.echo(f"report: {path}")


@contextmanager
def _failures() -> Iterator[None]:
    """Errors that stop a restore: say what to do; the next run continues."""
    try:
        yield
    except TransportError as exc:
        click.echo(
            f"cannot read the mirror: {exc}; run the restore again to continue",
            err=True,
        )
        sys.exit(1)
    except ApplianceError as exc:
        click.echo(f"restore stopped: {exc}", err=True)
        sys.exit(1)
