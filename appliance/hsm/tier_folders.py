"""The tiers' folders and the catalog's, checked before they are used.

A folder that the configuration names (``storage.online_path``,
``storage.nearline_path``, ``storage.catalog_path``) is a mount point, or a
folder on a mounted disk. When that disk is not mounted, the folder may
still be there, empty, on the system disk: opened as it is, it would look
like a tier that lost every file, or a new archive; new instances would
fill the system disk, and they would be hidden once the disk is mounted
over them. A missing named folder is never made
(:func:`appliance.storage.durable.require_named_folder`); an empty one is
recognised here, before a tier makes its layout in it:

- the catalog records instances (on the online tier, or all moved to
  packs) and the online folder has no ``objects/`` folder, or packs on the
  nearline tier (``packbytes.nearline``) and the nearline folder has no
  ``packs/``;
- there is no catalog, and the online tier holds instance files or the
  nearline tier packs: the catalog's own disk is not mounted, and a new,
  empty catalog would be made beside the archive that is there.

A tier whose disk was lost for good and replaced by a new one is taken
back by making that folder by hand (``objects/``, ``packs/``); the scrub
then finds the copies it lacks (docs/operations.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from appliance.catalog.store import Catalog, catalog_exists
from appliance.config import Config
from appliance.errors import StorageError
from appliance.storage.durable import require_named_folder
from appliance.storage.nearline import NearlineTier
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)


def online_tier(config: Config) -> OnlineTier:
    """The online tier ``config`` describes, not opened yet."""
    return OnlineTier(
        config.online_path,
        config.get("storage.reserved_bytes"),
        make_root=not config.get("storage.online_path"),
    )


def nearline_tier(config: Config) -> NearlineTier:
    """The nearline tier ``config`` describes, not opened yet."""
    return NearlineTier(
        config.nearline_path, make_root=not config.get("storage.nearline_path")
    )


def vet_tier_folders(config: Config, restoring: bool = False) -> None:
    """Raise :class:`StorageError` if a tier's folder is empty where the
    catalog records copies, or the catalog is missing beside a tier that
    holds instances (unless ``restoring``: a restore is what makes a lost
    catalog again); makes and changes nothing."""
    named = (
        ("storage.catalog_path", config.catalog_path, "catalog"),
        ("storage.online_path", config.online_path, "online tier"),
        ("storage.nearline_path", config.nearline_path, "nearline tier"),
    )
    for key, path, what in named:
        if config.get(key):
            require_named_folder(path, key, what)

    if not catalog_exists(config.catalog_path):
        if not restoring:
            _vet_without_catalog(config)
        return

    catalog = Catalog(config.catalog_path, readonly=True)
    try:
        counts = catalog.counts()
    finally:
        catalog.close()

    # The online tier's layout is made at the first store and stays when
    # every study has moved to packs: an archive's online folder without it
    # is an empty mount point even where no copy is online now.
    online = online_tier(config)
    if not online.objects.is_dir():
        if counts.get("bytes.online", 0) > 0:
            recorded = f"{counts['bytes.online']:,} bytes on the online tier"
            raise StorageError(_emptied("online", online.objects, recorded))
        if counts.get("instances", 0) > 0:
            recorded = f"{counts['instances']:,} instances (none online now)"
            raise StorageError(_emptied("online", online.objects, recorded))
    nearline = nearline_tier(config)
    if counts.get("packbytes.nearline", 0) > 0 and not nearline.packs.is_dir():
        recorded = f"{counts['packbytes.nearline']:,} bytes on the nearline tier"
        raise StorageError(_emptied("nearline", nearline.packs, recorded))


def _emptied(tier: str, layout: Path, recorded: str) -> str:
    return (
        f"the catalog records {recorded}, but "
        f"{layout.parent} holds no {layout.name}/ folder: is the {tier} tier's "
        f"disk mounted there? (if that disk was lost and replaced, make "
        f"{layout} to take the new one, then run appliance scrub run --tier {tier})"
    )


def _vet_without_catalog(config: Config) -> None:
    # An archive whose studies all went to packs has no instance file left
    # online: its packs say as much that a catalog was there.
    held = (
        (online_tier(config).objects, "online tier", "instance files"),
        (nearline_tier(config).packs, "nearline tier", "packs"),
    )
    for layout, tier, files in held:
        if _holds_files(layout):
            raise StorageError(
                f"no catalog at {config.catalog_path}, but the {tier} at "
                f"{layout.parent} holds {files}: is the catalog's disk "
                "mounted? A new, empty catalog is not made beside them (if "
                "the catalog is lost for good, rebuild it: docs/restore.md)"
            )


def _holds_files(layout: Path) -> bool:
    """Whether any of the folders under ``layout`` (``objects``, ``packs``)
    holds a file; each folder's listing stops at its first entry."""
    try:
        folders = list(os.scandir(layout))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StorageError(f"cannot read {layout}: {exc.strerror or exc}") from exc
    for folder in folders:
        if not folder.is_dir(follow_symlinks=False):
            continue
        try:
            with os.scandir(folder.path) as entries:
                if any(entry.is_file(follow_symlinks=False) for entry in entries):
                    return True
        except OSError as exc:
            # Unreadable (not the service's user's): one clear line, as for
            # the layout itself, rather than a traceback.
            reason = exc.strerror or exc
            raise StorageError(f"cannot read {folder.path}: {reason}") from exc
    return False
