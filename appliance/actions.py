"""Operator actions the command line and the admin API share: a volume
marked loaded or unloaded, the mirror's rate changed for now, a migration
planned without being run, a study looked up before it is recalled.

Each function does the work and raises on a refusal (ValueError for a
wrong argument, ApplianceError for a state that refuses it); the callers
only say it in their own way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from appliance.catalog import copies, requests
from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.errors import ApplianceError, VolumeNotReachable

logger = logging.getLogger(__name__)

# A year: a longer override is a mistake, not a plan.
LONGEST_OVERRIDE_HOURS = 24 * 366


class MigrationRunning(ApplianceError):
    """Another migration (the service's or a command's) holds the lock."""


def known_volume(library: Any, label: str) -> str:
    """The label of the volume of ``library`` that ``label`` names, as it
    was labelled: labels that differ only by case name one volume (they
    are written by hand). ValueError if there is none."""
    known = [volume.label for volume in library.list_volumes()]
    if label in known:
        return label
    wanted = label.casefold()
    for candidate in known:
        if candidate.casefold() == wanted:
            return candidate
    raise ValueError(f"no volume {label!r} is labelled in this library")


def mark_loaded(catalog: Catalog, opened: Any, label: str) -> tuple[str, list[str]]:
    """Say a volume is back (a tape is put in a drive): its label as it
    was labelled, and the studies that waited for it, to recall now. Their
    request stays open until their recalls have run. VolumeNotReachable,
    saying why, when the volume is still not there (or another is)."""
    library = opened.packs["offline"].library
    label = known_volume(library, label)
    if hasattr(library, "load"):
        library.load(label)
    try:
        library.check_reachable(label)
    except VolumeNotReachable as exc:
        # Each kind of library says where the volume goes (a folder, an
        # image, a drive or a slot).
        raise VolumeNotReachable(f"not reachable yet: {exc}") from exc
    return label, requests.volume_loaded(catalog, label)


def mark_unloaded(library: Any, label: str) -> tuple[str, bool]:
    """Take a volume out of its drive (tape): its label as it was labelled,
    and whether it is still reachable (a directory or disc image volume
    stays so until it is moved away)."""
    label = known_volume(library, label)
    if hasattr(library, "unload") and library.is_reachable(label):
        library.unload()
    return label, bool(library.is_reachable(label))


def set_replication_rate(config: Config, rate: str, hours: float | None) -> str:
    """Change the mirror's rate now: ``5MB``, ``off`` (no limit), ``pause``
    or ``timetable`` (back to the configured one), for ``hours`` or until
    changed. Returns what is in force, in words."""
    from appliance.replication import bandwidth
    from appliance.replication.process import override_path

    path = override_path(config)
    if hours is not None and not 0 < hours <= LONGEST_OVERRIDE_HOURS:
        raise ValueError(
            f"the duration takes hours, more than 0 and at most "
            f"{LONGEST_OVERRIDE_HOURS}"
        )
    if rate == "timetable":
        if hours is not None:
            raise ValueError("the timetable takes no duration")
        bandwidth.clear_override(path)
        return "the timetable is in force again"
    value = bandwidth.parse_rate(rate)
    until = datetime.now().astimezone() + timedelta(hours=hours) if hours else None
    bandwidth.write_override(path, value, until)
    return (
        f"mirror rate {bandwidth.format_rate(value)}"
        + (f" until {until:%Y-%m-%d %H:%M}" if until else " until changed")
        + " (the replicator picks it up within seconds)"
    )


@contextmanager
def migration_lock(config: Config) -> Iterator[None]:
    """Hold the migration lock, or raise MigrationRunning at once."""
    from appliance.hsm.scheduler import MIGRATION_LOCK
    from appliance.storage.lock import TierLock

    lock = TierLock(config.data_dir, MIGRATION_LOCK)
    if not lock.acquire(exclusive=True, wait=0):
        raise MigrationRunning(
            "a migration is already running (the service's or another)"
        )
    try:
        yield
    finally:
        lock.release()


def plan_migration(
    config: Config, catalog: Catalog, opened: Any, watermarks_only: bool = False
) -> Any:
    """What a migration run would do now, and why (a dry run), planned
    under the migration lock as a run would be."""
    from appliance.hsm.jobs import MigrationJob

    with migration_lock(config):
        return MigrationJob(catalog, opened, config).plan(
            watermarks_only=watermarks_only
        )


def is_study(catalog: Catalog, uid: str) -> bool:
    """Whether the catalog holds a study with this Study Instance UID."""
    if not uid.strip():
        return False
    with catalog.read() as txn:
        return copies.study_copies(catalog, txn, uid) is not None
