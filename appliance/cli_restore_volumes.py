"""Command line for ``appliance restore --from volumes``: the catalog from
the packs on every offline volume, then every instance recalled."""

from __future__ import annotations

import logging
from typing import Any

import click

from appliance.cli_restore import (
    RESTORE_HOLDER,
    _catalog,
    _keys,
    _print_rebuild,
    _print_report,
    _transfer_bar,
    print_stopped,
)
from appliance.config import Config
from appliance.terminal import progress_bar

logger = logging.getLogger(__name__)

_READ = "a restore from volumes must read the packs on it"


def restore_from_volumes(config: Config) -> bool:
    """Both phases and the report; whether everything came back.

    Ctrl-C or SIGTERM is noted, as for the mirror (:mod:`.restore.ctrl_c`):
    the catalog phase stops before the next pack it reads and puts nothing
    in place (a KeyboardInterrupt, which the caller reports); the data
    phase stops once the study in flight is counted, and the report says
    what is done."""
    from appliance.hsm.tier_folders import online_tier, vet_tier_folders
    from appliance.hsm.tiers import open_volume_library
    from appliance.restore.ctrl_c import CtrlC
    from appliance.storage.lock import claim_tier

    keys = _keys(config)
    # A restore goes on from the catalog there: its tiers' disks are mounted
    # before restored instances are written to them.
    vet_tier_folders(config, restoring=True)
    online = online_tier(config)
    online.open()
    # No appliance may serve this tier while it is restored.
    lock = claim_tier(config.online_path, 0.0, holder=RESTORE_HOLDER)
    folder = config.restore_folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with CtrlC() as ctrl_c:
            # A restore never writes to a volume: nothing to recover there.
            library = open_volume_library(config)
            if not library.list_volumes():
                click.echo(
                    "the volume library holds no volume: nothing to restore",
                    err=True,
                )
                return False
            outcome = _rebuild(config, library, keys, online, ctrl_c)
            report, waiting_for, stopped = _data_and_report(
                config, library, keys, outcome, ctrl_c
            )
    finally:
        lock.release()
    path = report.save(folder)
    if stopped:
        print_stopped(report, path)
        return False
    _print_report(report, path)
    _print_wanted(config, outcome.unread + waiting_for)
    return report.ok


def _data_and_report(
    config: Config, library: Any, keys: Any, outcome: Any, ctrl_c: Any
) -> tuple[Any, list[str], bool]:
    """The data phase and its report; the volumes on the shelf it waited
    for, and whether Ctrl-C stopped it before its last study. A Ctrl-C
    pressed once the catalog was in place stops here: the next run goes on
    with the data."""
    from appliance.restore.reasons import FailureLog
    from appliance.restore.volumedata import final_volume_report

    ctrl_c.check()
    failures = FailureLog(config.restore_folder)
    if not outcome.rebuild.done_before:
        failures.clear()  # an earlier restore's, if any
    catalog = _catalog(config)
    try:
        _ask_for(catalog, outcome.unread)
        note = outcome.rebuild.note
        waiting_for, stopped = _restore_data(
            config, catalog, keys, library, note, ctrl_c
        )
        report = final_volume_report(
            catalog, note, outcome.unread, library, failures.read()
        )
    finally:
        catalog.close()
    return report, waiting_for, stopped


def _rebuild(config: Config, library: Any, keys: Any, online: Any, ctrl_c: Any) -> Any:
    """The catalog phase, with a progress bar for the packs it reads;
    stopped by Ctrl-C (``ctrl_c``) before each pack."""
    from appliance.hsm.archive import archive_of
    from appliance.restore.volumes import rebuild_from_volumes

    with progress_bar() as bar:
        task = bar.add_task("reading the volumes", total=None)

        def shown(done: int, total: int) -> None:
            ctrl_c.check()
            bar.update(task, completed=done, total=total)

        outcome = rebuild_from_volumes(
            config.catalog_path,
            config.get("storage.catalog_max_size"),
            config.restore_folder / "work",
            library,
            keys,
            online,
            shown,
        )
    # The archive id the volumes' labels name, where the volumes read it.
    archive_of(config)
    _print_rebuild(outcome.rebuild, False)
    return outcome


def _restore_data(
    config: Config,
    catalog: Any,
    keys: Any,
    library: Any,
    note: dict[str, Any],
    ctrl_c: Any,
) -> tuple[list[str], bool]:
    """The data phase, with a progress bar of bytes, rate and time left,
    until done or Ctrl-C (asked between two studies); the volumes on the
    shelf that it waited for, and whether Ctrl-C stopped it."""
    from appliance.restore.volumedata import VolumeDataRestore
    from appliance.storage.offline import OfflineTier

    offline = OfflineTier(library, config.data_dir / "spool", salvage=True)
    offline.open()
    restorer = VolumeDataRestore(
        catalog,
        config.online_path,
        config.get("storage.reserved_bytes"),
        keys,
        offline,
        config.restore_folder,
        set(note.get("damaged_packs", {})),
    )
    plan = restorer.plan()
    with _transfer_bar() as bar:
        task = bar.add_task("restoring", total=plan.bytes)
        restorer.run(
            plan,
            lambda done, total, what: bar.update(
                task, completed=done, description=f"restoring {what}"
            ),
            lambda: ctrl_c.pressed,
        )
    return restorer.waiting_for, restorer.stopped


def _ask_for(catalog: Any, volumes: list[str]) -> None:
    """An operator request for each volume whose packs were not read."""
    from appliance.catalog import requests

    for volume in volumes:
        requests.request_volume(catalog, volume, _READ)


def _print_wanted(config: Config, volumes: list[str]) -> None:
    """Name every volume the restore waits for, and how to load it."""
    where = ""
    if config.get("volumes.kind") == "directory":
        folder = config.volume_settings()["path"]
        where = f" (a directory volume: its folder back in {folder})"
    for volume in dict.fromkeys(volumes):
        click.echo(
            f"load volume {volume} into the library{where}, then run the restore again",
            err=True,
        )
