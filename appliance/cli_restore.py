"""Command line for disaster recovery: ``appliance restore --from mirror``."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from appliance import logs
from appliance.cli_shared import Loader, config_option, data_dir_option
from appliance.config import Config
from appliance.errors import (
    ApplianceError,
    KeyStoreError,
    OutOfSpaceError,
    TransportError,
)
from appliance.terminal import errors, size, transfer_bar

logger = logging.getLogger(__name__)

# UIDs printed per kind of problem; the report file lists them all.
_SHOWN = 50
_MEGABYTES = re.compile(r"\d+(\.\d*)?")
# How a restore names itself in the online tier's lock.
RESTORE_HOLDER = "appliance restore"


def register(main: click.Group, load: Loader) -> None:
    """Add the ``restore`` command (and ``restore status``) to ``main``."""

    @main.group(invoke_without_command=True)
    @config_option
    @data_dir_option
    @click.option(
        "--from",
        "source",
        type=click.Choice(["mirror", "volumes"]),
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
        "--background",
        is_flag=True,
        help="Rebuild the catalog, then leave the data to the service: it "
        "serves at once and restores the rest while it runs.",
    )
    @click.option(
        "--rate",
        help="Most bytes per second read from the mirror: a number of MB/s, "
        "or 20MB, 500KB, 100Mbit; default restore.timetable.",
    )
    @click.option(
        "--cache-gb",
        type=click.FloatRange(min=0.0),
        help="Local room, in GB, for packs fetched from the mirror; default "
        "restore.cache_gb.",
    )
    @click.pass_context
    def restore(
        context: click.Context,
        config_file: Path | None,
        data_dir: str | None,
        source: str | None,
        scan: bool,
        background: bool,
        rate: str | None,
        cache_gb: float | None,
    ) -> None:
        """Rebuild an empty appliance from the off-site mirror (or the
        offline volumes): the catalog first, then every instance, patients
        expected soon first, then newest studies first, each checked
        against its SHA-256. Import the master keys first (appliance keys
        import). Interrupted, run it again: it continues where it stopped.
        Exits 1 when any instance is missing or corrupt."""
        if context.invoked_subcommand is not None:
            return
        if source is None:
            raise click.UsageError("say where from: --from mirror or --from volumes")
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        chosen = _rate(rate)
        room = config.get("restore.cache_gb") if cache_gb is None else cache_gb
        with _failures():
            if source == "volumes":
                from appliance.cli_restore_volumes import restore_from_volumes

                if background or scan:
                    raise click.UsageError(
                        "--background and --scan are for --from mirror"
                    )

                ok = restore_from_volumes(config)
            else:
                ok = _restore(config, scan, background, chosen, int(room * 1e9))
        sys.exit(0 if ok else 1)

    @restore.command("status")
    @config_option
    @data_dir_option
    @click.option(
        "--follow", is_flag=True, help="Show a progress bar until the restore ends."
    )
    def status(config_file: Path | None, data_dir: str | None, follow: bool) -> None:
        """The restore's progress: studies and bytes left, rate, time left."""
        config = load(config_file, {"storage.data_dir": data_dir})
        folder = config.restore_folder
        if follow:
            _follow(folder)
        click.echo(status_text(folder))


def _rate(text: str | None) -> str | None:
    """The rate as a timetable of one rate (None: no limit)."""
    from appliance.replication import bandwidth

    if text is None:
        return None
    chosen = f"{text}MB" if _MEGABYTES.fullmatch(text) else text
    try:
        value = bandwidth.parse_rate(chosen)
    except ValueError:
        value = 0
    if value == 0:
        raise click.BadParameter(
            f"{text!r}: give a rate above 0: a number of MB/s, or 20MB, 500KB, "
            "100Mbit (restore.timetable may pause the data phase)",
            param_hint="--rate",
        )
    return None if value is None else chosen


def _restore(
    config: Config, scan: bool, background: bool, rate: str | None, cache_bytes: int
) -> bool:
    """The catalog phase, then the data phase here or in the service;
    whether everything came back (or, in the background, the catalog).

    The catalog phase reads at full speed unless ``rate`` says otherwise:
    nothing is served until it is over. The data phase keeps to ``rate``,
    or else to ``restore.timetable``."""
    from appliance.hsm.tier_folders import online_tier, vet_tier_folders
    from appliance.replication.bandwidth import Limiter, parse_timetable
    from appliance.replication.process import mirror_place, open_mirror
    from appliance.restore import swap
    from appliance.restore.cache import PackCache
    from appliance.restore.ctrl_c import CtrlC
    from appliance.restore.mirror import Fetcher, survey
    from appliance.restore.progress import (
        Tracker,
        clear_pending,
        is_pending,
        mark_pending,
    )
    from appliance.restore.reasons import FailureLog

    keys = _keys(config)
    # A restore goes on from the catalog there: its tiers' disks are mounted
    # before restored instances are written to them.
    vet_tier_folders(config, restoring=True)
    online_tier(config).open()
    folder = config.restore_folder
    lock = _claim(config, folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctrl_c = CtrlC()
    # Ctrl-C ends a wait for bandwidth at once (see restore.ctrl_c).
    limiter = Limiter(
        parse_timetable(rate or "off"), sleep=ctrl_c.sleep, purpose="restore"
    )
    try:
        with open_mirror(config) as transport, ExitStack() as handled:
            fetcher = Fetcher(transport, limiter)
            contents = survey(transport)
            # From here to the data phase's own handler, Ctrl-C is acted
            # on between two steps of the work.
            handled.enter_context(ctrl_c)
            if not contents.packs:
                click.echo(
                    f"the mirror ({mirror_place(config)}) holds no pack: nothing "
                    "to restore; check that [mirror] names the mirror the lost "
                    "appliance replicated to",
                    err=True,
                )
                return False
            cache = PackCache(folder / "packs", fetcher, cache_bytes)
            if swap.note_of(config.catalog_path) is None:
                # Before the catalog goes into place: a run killed just
                # after must still find the data phase to do.
                mark_pending(folder, "mirror")
                FailureLog(folder).clear()
            elif not is_pending(folder):
                click.echo(
                    "this appliance was restored already; see appliance restore status"
                )
                return True
            tracker = Tracker(folder, "command")
            try:
                rebuild = _rebuild(
                    config, scan, fetcher, contents, keys, cache, tracker, ctrl_c
                )
            except BaseException:
                if swap.note_of(config.catalog_path) is None:
                    # Nothing was put in place: no data phase waits.
                    clear_pending(folder)
                raise
            if not rebuild.done_before:
                then = (
                    "the data waits for the service" if background else "the data next"
                )
                tracker.state("rebuilt", then)
            # Pressed once the catalog was whole: it is in place, and the
            # next run goes on with the data.
            ctrl_c.check()
            if background:
                _print_background(rebuild)
                return True
            # The data phase waits for bandwidth in a thread of its own,
            # and its Ctrl-C closes its limiter instead.
            limiter.close()
            limiter = Limiter(
                parse_timetable(rate or config.get("restore.timetable")),
                purpose="restore",
            )
            fetcher.limiter = limiter
            catalog = _catalog(config)
            try:
                report, path, stopped = _restore_data(
                    config, catalog, keys, cache, contents, limiter, ctrl_c
                )
            finally:
                catalog.close()
    finally:
        limiter.close()
        lock.release()
    if stopped:
        print_stopped(report, path)
        return False
    _print_report(report, path)
    return bool(report.ok)


def _claim(config: Config, folder: Path) -> Any:
    """Hold the online tier: no appliance may serve it while the catalog is
    rebuilt, or restore it at the same time."""
    from appliance.errors import StorageError
    from appliance.restore.progress import is_pending
    from appliance.storage.lock import claim_tier, holder_of

    try:
        return claim_tier(config.online_path, 0.0, holder=RESTORE_HOLDER)
    except StorageError:
        # The service writes no name in the lock; another restore does.
        if is_pending(folder) and not holder_of(config.online_path):
            raise StorageError(
                "the service is running and restores in the background; follow "
                "it with: appliance restore status --follow"
            ) from None
        raise


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
    config: Config,
    scan: bool,
    fetcher: Any,
    contents: Any,
    keys: Any,
    cache: Any,
    tracker: Any,
    ctrl_c: Any,
) -> Any:
    """The catalog phase, with a progress bar of each of its steps (bytes
    of the snapshot and journal read, journal entries replayed, packs read),
    also written for ``appliance restore status``; stopped by Ctrl-C
    (``ctrl_c``) as it tells how far it is."""
    from appliance.hsm.archive import archive_of
    from appliance.restore.rebuild import rebuild_catalog

    with _catalog_bar() as bar:
        task = bar.add_task("rebuilding the catalog", total=None, numbers="")

        def shown(step: Any) -> None:
            ctrl_c.check()
            bar.update(
                task,
                description=f"catalog: {step.what}",
                completed=step.done,
                total=step.total,
                numbers=step_numbers(step.done, step.total, step.unit),
            )
            tracker.rebuilding(step.what, step.done, step.total, step.unit)

        rebuild = rebuild_catalog(
            config.catalog_path,
            config.get("storage.catalog_max_size"),
            config.restore_folder / "work",
            fetcher,
            contents,
            keys,
            cache,
            scan,
            shown,
        )
    # The archive id the rebuilt catalog took, where the volumes read it.
    archive_of(config)
    _print_rebuild(rebuild, scan)
    return rebuild


def _catalog_bar() -> Progress:
    """The step under way, its bar and numbers, and the time left, on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[numbers]}"),
        TimeRemainingColumn(),
        console=errors,
    )


def step_numbers(done: int, total: int, unit: str) -> str:
    """How far a step of the catalog phase is, in its unit."""
    from appliance.restore.sources import BYTES

    if unit == BYTES:
        return f"{size(done)} of {size(total)}"
    return f"{done:,} of {total:,} {unit}"


def _restore_data(
    config: Config,
    catalog: Any,
    keys: Any,
    cache: Any,
    contents: Any,
    limiter: Any,
    ctrl_c: Any,
) -> tuple[Any, Path, bool]:
    """The data phase, with a progress bar of bytes, rate and time left; the
    report (of what is done so far, when Ctrl-C or SIGTERM stopped it), its
    file, and whether it was stopped so. A Ctrl-C that ``ctrl_c`` noted on
    the way here stops it at once."""
    import signal
    import threading

    from appliance.errors import LimiterClosed
    from appliance.restore.export import rebuilt_note
    from appliance.restore.progress import Tracker
    from appliance.restore.reasons import FailureLog
    from appliance.restore.report import final_report
    from appliance.restore.run import run_data_phase

    stop = threading.Event()

    def interrupt(*_: Any) -> None:
        stop.set()
        limiter.close()  # a wait for bandwidth (a paused timetable) ends

    interrupted = {
        number: signal.signal(number, interrupt)
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    if ctrl_c.pressed:
        interrupt()
    report = None
    try:
        with _transfer_bar() as bar:
            task = bar.add_task("restoring", total=None)

            def shown(snapshot: Any) -> None:
                bar.update(
                    task,
                    total=snapshot.bytes,
                    completed=snapshot.bytes_done,
                    description=bar_label(snapshot),
                )

            tracker = Tracker(config.restore_folder, "command", shown)
            try:
                report = run_data_phase(
                    config,
                    catalog,
                    keys,
                    cache,
                    contents,
                    tracker,
                    stop.is_set,
                    limiter=limiter,
                )
            except LimiterClosed:
                tracker.state("stopped", "run the restore again to continue")
    finally:
        for number, handler in interrupted.items():
            signal.signal(number, handler)
    if report is None:
        folder = config.restore_folder
        noted = FailureLog(folder).read()
        report = final_report(catalog, contents, rebuilt_note(catalog) or {}, (), noted)
        return report, report.save(folder), True
    return report, Path(tracker.snapshot.report), False


def _transfer_bar() -> Progress:
    """Bytes restored, the rate and the time left, on stderr."""
    return transfer_bar()


def _print_background(rebuild: Any) -> None:
    click.echo(
        "the data is restored by the service: start it (systemctl start "
        "pacs-appliance, or appliance serve); it serves at once and restores "
        "in the background; follow it with: appliance restore status --follow"
    )


def status_text(folder: Path) -> str:
    """The restore's numbers, as ``appliance restore status`` prints them."""
    from appliance.restore.progress import is_pending, read

    snapshot = read(folder)
    pending = is_pending(folder)
    if snapshot is None:
        if pending:
            return "restore: the catalog is back; the data waits for the service"
        return "restore: none on this appliance"
    lines = [describe(snapshot, pending)]
    if snapshot.report:
        lines.append(f"report: {snapshot.report}")
    return "\n".join(lines)


def describe(snapshot: Any, pending: bool) -> str:
    """One line about a restore: shared with ``appliance status``."""
    from appliance.terminal import duration

    if snapshot.state == "done" and not pending:
        return "restore: finished"
    from appliance.children import process_alive

    if snapshot.state in ("rebuilding", "rebuilt"):
        return _catalog_phase(snapshot, process_alive(snapshot.pid))

    running = snapshot.state in ("starting", "restoring", "paused")
    if running and not process_alive(snapshot.pid):
        snapshot.state = "stopped (its process is gone)"
        snapshot.doing = (
            "the service starts it again"
            if snapshot.runner == "service"
            else "run the restore again to continue"
        )
        running = False
    left = snapshot.bytes - snapshot.bytes_done
    text = (
        f"restore ({snapshot.runner}): {snapshot.state}, {snapshot.studies:,} "
        f"studies ({snapshot.expected_studies:,} of patients expected soon), "
        f"{size(snapshot.bytes_done)} of {size(snapshot.bytes)} done"
    )
    if snapshot.rate > 0 and running:
        text += f", {size(int(snapshot.rate))}/s"
    seconds = snapshot.seconds_left
    if seconds is not None and snapshot.state == "restoring":
        text += f", about {duration(seconds)} left ({size(left)})"
    if snapshot.left_on_mirror:
        text += f"; {snapshot.left_on_mirror:,} old studies left on the mirror"
    if snapshot.doing:
        text += f"; {snapshot.doing}"
    return text


def _catalog_phase(snapshot: Any, alive: bool) -> str:
    """The line of a restore in (or just after) its catalog phase."""
    if snapshot.state == "rebuilt":
        return f"restore: the catalog is back; {snapshot.doing}"
    if not alive:
        return (
            "restore: stopped while the catalog was rebuilt (its process is "
            "gone); run the restore again to continue"
        )
    numbers = step_numbers(snapshot.step_done, snapshot.step_total, snapshot.step_unit)
    return (
        f"restore ({snapshot.runner}): rebuilding the catalog, {snapshot.step}: "
        f"{numbers}"
    )


def _follow(folder: Path) -> None:
    """A progress bar from the numbers the running restore writes (a line
    every ten seconds when stderr is not a terminal)."""
    import time

    from appliance.restore.progress import is_pending, read
    from appliance.terminal import errors

    if not errors.is_terminal:
        while is_pending(folder):
            click.echo(status_text(folder), err=True)
            time.sleep(10.0)
        return
    with _transfer_bar() as bar:
        task = bar.add_task("restoring", total=None)
        while is_pending(folder):
            snapshot = read(folder)
            if snapshot is not None and snapshot.state == "rebuilding":
                # Not bytes restored: the step's numbers go in the words.
                numbers = step_numbers(
                    snapshot.step_done, snapshot.step_total, snapshot.step_unit
                )
                bar.update(
                    task,
                    total=None,
                    completed=0,
                    description=f"catalog: {snapshot.step}: {numbers}",
                )
            elif snapshot is not None:
                bar.update(
                    task,
                    total=snapshot.bytes or None,
                    completed=snapshot.bytes_done,
                    description=bar_label(snapshot),
                )
            time.sleep(1.0)


def bar_label(snapshot: Any) -> str:
    """The progress bar's words for a restore's data phase: what it does,
    or, once stopped, why and what next."""
    if snapshot.state == "stopped":
        return f"stopped: {snapshot.doing}".rstrip(": ")
    return f"restoring {snapshot.doing}".rstrip()


def _print_rebuild(rebuild: Any, scan: bool) -> None:
    if rebuild.done_before:
        note = "" if not scan else " (--scan ignored: the data restore has begun)"
        click.echo(f"catalog: rebuilt by an earlier run, from {rebuild.source}{note}")
    else:
        click.echo(f"catalog: rebuilt from {rebuild.source}")
    if rebuild.set_aside is not None:
        click.echo(f"  the empty catalog found was set aside in {rebuild.set_aside}")


def print_stopped(report: Any, path: Path) -> None:
    """A data phase that Ctrl-C or SIGTERM stopped: one line of what is
    done (the report has the rest), and what to do."""
    found = [
        f"{len(problems):,} {kind}"
        for kind, problems in (("missing", report.missing), ("corrupt", report.corrupt))
        if problems
    ]
    click.echo(
        f"restore interrupted: {len(report.restored):,} instance(s) restored and "
        f"verified, {len(report.waiting):,} not tried yet"
        + "".join(f", {each}" for each in found)
        + f"; report: {path}",
        err=True,
    )
    click.echo("run the same command again to continue", err=True)


def _print_report(report: Any, path: Path) -> None:
    click.echo(
        f"restored and verified: {len(report.restored):,} instance(s), "
        f"{size(report.restored_bytes)}; missing: {len(report.missing):,}; "
        f"corrupt: {len(report.corrupt):,}; not tried yet: {len(report.waiting):,}"
    )
    if report.left_on_mirror:
        click.echo(
            f"left on the mirror until asked for: {len(report.left_on_mirror):,} "
            "instance(s) of old studies (restore.online_days)"
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
    except OutOfSpaceError as exc:
        click.echo(
            f"restore stopped: {exc}; make room on the online tier (or lower "
            "storage.reserved_bytes), then run the restore again to continue",
            err=True,
        )
        sys.exit(1)
    except ApplianceError as exc:
        click.echo(f"restore stopped: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        # The data phase handles Ctrl-C itself, with a report; before it
        # (the catalog phase) nothing unchecked was put in place.
        click.echo("stopped: run the same command again to continue", err=True)
        sys.exit(1)
