"""What the command-line modules share: options, opening the archive,
recalling a study with a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.terminal import progress_bar

Loader = Callable[[Path | None, dict[str, Any]], Config]

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML configuration file (every key has a default).",
)
data_dir_option = click.option(
    "--data-dir", help="Directory for all data (storage.data_dir)."
)


def require_catalog(config: Config) -> None:
    """Stop with a clear message when there is no archive where the
    configuration points: a command run from the wrong folder must not
    quietly make a new, empty one."""
    from appliance.catalog.store import catalog_exists

    if not catalog_exists(config.catalog_path):
        click.echo(no_catalog(config.catalog_path), err=True)
        sys.exit(1)
    # A catalog_path of its own is found whatever --data-dir says; the data
    # directory (keys, spool, locks) must be there too, or the command would
    # fail half way, or make one.
    if not config.data_dir.is_dir():
        click.echo(
            f"no data directory {config.data_dir} for the catalog at "
            f"{config.catalog_path}: --data-dir / --config point elsewhere",
            err=True,
        )
        sys.exit(1)


def no_catalog(path: Path) -> str:
    """The line that says there is no archive at ``path``."""
    if path.is_dir():
        # An empty folder: made by hand, or a disk not mounted there.
        return (
            f"no catalog at {path}: the folder holds none (nothing stored yet, "
            "its disk not mounted, or --data-dir / --config point elsewhere)"
        )
    return (
        f"no catalog at {path}: nothing stored yet, or --data-dir / --config "
        "point elsewhere"
    )


@contextmanager
def open_archive(
    config: Config, writer: bool = False, mirror: bool = False
) -> Iterator[tuple[Any, Any]]:
    """The catalog and the opened tiers (the mirror too, for recalls, with
    ``mirror``); exits with a message if they fail."""
    from appliance.catalog.store import Catalog
    from appliance.hsm.tier_folders import vet_tier_folders
    from appliance.hsm.tiers import open_tiers

    require_catalog(config)
    try:
        vet_tier_folders(config)
    except ApplianceError as exc:
        click.echo(f"cannot open the tiers: {exc}", err=True)
        sys.exit(1)
    try:
        catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    except ApplianceError as exc:
        click.echo(f"cannot open the catalog: {exc}", err=True)
        sys.exit(1)
    try:
        opened = open_tiers(config, writer, mirror)
    except ApplianceError as exc:
        catalog.close()
        click.echo(f"cannot open the tiers: {exc}", err=True)
        sys.exit(1)
    try:
        yield catalog, opened
    finally:
        catalog.close()


def recall_one(recaller: Any, uid: str) -> bool:
    """Recall one study with a progress bar and say how it went; False when
    it is not wholly online."""
    try:
        with progress_bar() as progress:
            task = progress.add_task(f"recalling {uid}", total=None)
            result = recaller.recall(
                uid,
                lambda done, total: progress.update(task, completed=done, total=total),
            )
    except ApplianceError as exc:
        # The online tier refused the files (full, read only): nothing is
        # counted, the next recall's clean-up removes what it wrote, and
        # the other studies named may still be recalled.
        click.echo(f"{uid}: not recalled: {exc}", err=True)
        return False
    if result.ok and not result.staged:
        click.echo(f"{uid}: already online, nothing to recall")
        return True
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
