"""Command line for the offline tier's volumes: ``appliance volumes list |
label | loaded | unloaded | scan | requests | verify | export``."""

from __future__ import annotations

import logging
import sys
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
from appliance.errors import ApplianceError
from appliance.log_text import printable
from appliance.terminal import console, progress_bar, size

logger = logging.getLogger(__name__)

# No single medium holds more; a larger figure is a typing mistake.
_LARGEST_VOLUME = 10**15
# Nor less: a smaller figure is a unit left out ("2" for 2T), and a volume
# is labelled once.
_SMALLEST_VOLUME = 10**6


def register(main: click.Group, load: Loader) -> None:
    """Add the ``volumes`` commands to ``main``."""

    @main.group()
    def volumes() -> None:
        """Offline volumes: list, label, loaded/unloaded, scan, requests, verify,
        export."""

    @volumes.command(name="list")
    @config_option
    @data_dir_option
    def list_volumes(config_file: Path | None, data_dir: str | None) -> None:
        """Every labelled volume: where it is, its room and its packs."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _existing_library(config)
        table = Table(title=f"Volumes ({config.get('volumes.kind')})")
        for column in ("label", "state", "capacity", "used", "free", "packs"):
            table.add_column(
                column, justify="left" if column in ("label", "state") else "right"
            )
        try:
            rows = overview.volume_rows(library)
        except ApplianceError as exc:
            # The library cannot look at its volumes at all (its staging
            # folder read only, its changer failing): one line, no table.
            click.echo(f"cannot list the volumes: {exc}", err=True)
            sys.exit(1)
        for row in rows:
            table.add_row(
                row["label"],
                _state(row, library.kind),
                size(row["capacity_bytes"]),
                size(row["used_bytes"]),
                size(row["free_bytes"]),
                "?" if row["packs"] is None else str(row["packs"]),
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
        # The label names the archive, for good on tape and disc: a mistyped
        # --data-dir must not make a new archive to name.
        require_catalog(config)
        from appliance.hsm.archive import archive_of

        try:
            archive_of(config, make=True)
            info = _library(config).label(label, wanted)
        except (ApplianceError, ValueError) as exc:
            click.echo(f"cannot label {printable(label)}: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            # The library folder or the data directory refuses to be
            # written (read only, not ours): the libraries leave it to us.
            shown = printable(label)
            click.echo(f"cannot label {shown}: {_os_problem(exc)}", err=True)
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
        from appliance.hsm.recall import Recaller

        waiting: list[str] = []
        incomplete = done = 0
        with (
            open_archive(config) as (catalog, opened),
            _clear_errors(label),
            interruptible() as interrupted,
        ):
            try:
                label, waiting = actions.mark_loaded(catalog, opened, label)
                recaller = Recaller(catalog, opened)
                for uid in waiting:
                    # Ctrl-C lets the study in flight finish; the others
                    # stay in the volume's request until they are recalled.
                    if interrupted.is_set():
                        break
                    incomplete += not recall_one(recaller, uid)
                    done += 1
            except KeyboardInterrupt:
                # A second Ctrl-C: the recall in flight stopped before its
                # study was taken off the request, so it is still asked for.
                interrupted.set()
        exit_if_interrupted(interrupted, done, len(waiting), "study(ies)")
        recalled = f"{len(waiting)}"
        if incomplete:
            # The studies above that failed are not to be counted as recalled.
            recalled = f"{len(waiting) - incomplete} of {len(waiting)}"
        click.echo(f"volume {label} loaded; {recalled} waiting study(ies) recalled")
        sys.exit(1 if incomplete else 0)

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def unloaded(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Take a volume out of its drive (tape); report where it is."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _existing_library(config)
        with _clear_errors(label):
            label, reachable = actions.mark_unloaded(library, label)
        click.echo(
            f"volume {label}: {'still reachable' if reachable else 'on the shelf'}"
        )

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def scan(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Read a whole tape written by an appliance and register it with its
        packs: a tape this library does not know (its volumes.state_path
        lost, or another appliance's). Takes as long as reading the tape."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _library(config)
        if not hasattr(library, "scan"):
            click.echo(
                f"a {config.get('volumes.kind')} library finds its volumes by "
                f"itself: put the volume in {config.volume_settings()['path']}",
                err=True,
            )
            sys.exit(1)
        click.echo(f"reading volume {label} to its end...")
        with _clear_errors(label):
            packs = library.scan(label)
        click.echo(f"volume {label}: {len(packs)} pack(s) registered")

    @volumes.command(name="requests")
    @config_option
    @data_dir_option
    def operator_requests(config_file: Path | None, data_dir: str | None) -> None:
        """What the appliance waits for a person to do."""
        config = load(config_file, {"storage.data_dir": data_dir})
        from appliance.catalog import requests

        with open_archive(config) as (catalog, _opened):
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
        """Read every pack the catalog records on a volume back from its
        position there and check every instance."""
        config = load(config_file, {"storage.data_dir": data_dir})
        from appliance.scrub.volume import VolumeCheck

        with open_archive(config) as (catalog, opened), _clear_errors(label):
            offline = opened.packs["offline"]
            label = actions.known_volume(offline.library, label)
            check = VolumeCheck(catalog, offline, opened.keys, label)
            with progress_bar() as progress:
                task = progress.add_task(
                    f"verifying {label}", total=len(check.recorded)
                )
                for pack in check.recorded:
                    problem = check.problem(pack)
                    if problem is not None:
                        click.echo(problem, err=True)
                    progress.advance(task)

        click.echo(check.describe())
        sys.exit(1 if check.bad or check.missing else 0)

    @volumes.command()
    @config_option
    @data_dir_option
    @click.argument("label")
    def export(config_file: Path | None, data_dir: str | None, label: str) -> None:
        """Make a volume ready for the off-site vault (finalise a disc image,
        eject a tape)."""
        config = load(config_file, {"storage.data_dir": data_dir})
        library = _existing_library(config)
        with _clear_errors(label):
            label = actions.known_volume(library, label)
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


def _state(row: dict[str, Any], kind: str) -> str:
    """Where a volume is and whether it takes packs, in the words of its
    medium: a cartridge's tab makes it write protected."""
    state = "loaded" if row["reachable"] else "on the shelf"
    if row["full"]:
        state += ", full"
    if row["read_only"]:
        state += ", write protected" if kind == "tape" else ", read only"
    return state


@contextmanager
def _clear_errors(label: str) -> Iterator[None]:
    """A wrong label or an unreachable volume is one line and exit 1."""
    try:
        yield
    except (ApplianceError, ValueError) as exc:
        click.echo(f"volume {label}: {exc}", err=True)
        sys.exit(1)


def _os_problem(exc: OSError) -> str:
    """An OSError as one line: what the system said, and about which file."""
    what = exc.strerror or str(exc)
    return f"{exc.filename}: {what}" if exc.filename else what


def _existing_library(config: Config) -> Any:
    """The library for the commands that read it (list) or act on a volume
    it knows (unloaded, export), which work without a catalog, for a
    restore from volumes: its folder is never made. A mistyped --data-dir
    must not become a data directory with an empty library."""
    key, folder = _library_folder(config)
    # A missing folder that volumes.path names is refused by the library,
    # with what to do about it.
    named = key == "volumes.path" and config.get(key)
    # A file in its place is for the library to name, as on every command.
    if not folder.exists() and not named:
        click.echo(
            f"no volume library at {folder}: no volume labelled yet, or "
            "--data-dir / --config point elsewhere",
            err=True,
        )
        sys.exit(1)
    return _library(config)


def _library_folder(config: Config) -> tuple[str, Path]:
    """The key and folder of where the library keeps what it knows: a
    directory or optical library's folder, a tape library's state."""
    settings = config.volume_settings()
    if config.get("volumes.kind") == "tape":
        return "volumes.state_path", Path(settings["state_path"])
    return "volumes.path", Path(settings["path"])


def _library(config: Config) -> Any:
    from appliance.hsm.tiers import open_volume_library

    try:
        return open_volume_library(config)
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
    if not _SMALLEST_VOLUME <= value <= _LARGEST_VOLUME:
        raise click.BadParameter(
            f"the capacity must be at least 1M and at most 1000T (got {text!r}; "
            "give its unit: K, M, G or T)"
        )
    return value
