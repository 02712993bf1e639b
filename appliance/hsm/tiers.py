"""The tiers the migrator and recall work with, behind one small interface.

The online tier holds plain files; every tier below it holds packs
(``nearline``: pack files on a disk array, ``offline``: packs on volumes).
Pack tiers are tried for recall in the order given, nearest first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from appliance.audit.trail import Trail
from appliance.config import Config
from appliance.hsm.tier_folders import nearline_tier, online_tier
from appliance.storage.archive_id import ArchiveIdFile
from appliance.storage.keys import DataKey, KeyStore, key_store_path
from appliance.storage.offline import OfflineTier
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader, PackSummary
from appliance.storage.packs.manifest import InstanceMeta
from appliance.storage.packs.writer import Source
from appliance.storage.volumes import VolumeLibrary, open_library

logger = logging.getLogger(__name__)

ONLINE = "online"
NEARLINE = "nearline"
OFFLINE = "offline"
OFFSITE = "offsite"


class PackTier(Protocol):
    """A tier that keeps studies as packs."""

    def write(
        self,
        pack_id: str,
        items: Iterable[tuple[InstanceMeta, Source]],
        study_uid: str,
        key: DataKey | None,
        keys: KeyStore | None = None,
    ) -> tuple[str, PackSummary]:
        """Write a pack and read it all back; (its location, what was written)."""
        ...

    def reader(
        self,
        location: str,
        pack_id: str,
        size: int,
        sha256: str,
        keys: KeyStore | None = None,
    ) -> AbstractContextManager[PackReader]:
        """A reader of a recorded pack."""
        ...

    def is_reachable(self, location: str) -> bool:
        """Whether the pack can be read now, without a person's help."""
        ...

    def remove(self, location: str) -> None:
        """Delete a pack the catalog no longer counts, where the medium can."""
        ...

    def volume_of(self, location: str) -> str | None:
        """The volume a person must load to reach the pack, if any."""
        ...


@dataclass
class Tiers:
    """The online tier, the pack tiers nearest first, and the keys packs are
    encrypted with."""

    online: OnlineTier
    packs: dict[str, PackTier] = field(default_factory=dict)
    keys: KeyStore | None = None
    # Where recalls, releases and repairs of copies are recorded.
    audit: Trail | None = None

    def pack_tier(self, name: str) -> PackTier | None:
        return self.packs.get(name)


def open_tiers(config: Config, writer: bool = False, mirror: bool = False) -> Tiers:
    """Every tier the configuration describes, opened, with the key store
    (made on first use: packs are always encrypted).

    ``writer`` is for the one process that writes packs, the holder of the
    migration lock: it also clears what a crashed writer left half-done.
    ``mirror`` adds the off-site mirror as the farthest tier, for recalls
    of what no nearer tier holds (it is connected to only then).
    """
    online = online_tier(config)
    online.open()
    nearline = nearline_tier(config)
    nearline.open(writer)
    packs: dict[str, PackTier] = {NEARLINE: nearline}

    library = open_volume_library(config, writer)
    offline = OfflineTier(library, config.data_dir / "spool")
    offline.open(writer)
    packs[OFFLINE] = offline
    if mirror:
        packs[OFFSITE] = _mirror_tier(config)

    keys = KeyStore.create_if_missing(key_store_path(config.data_dir))
    return Tiers(online, packs, keys, Trail.of(config))


def open_volume_library(config: Config, recover: bool = False) -> VolumeLibrary:
    """The configured volume library (see :func:`open_library`).

    Only the default folder, in the data directory, is made on first use:
    one that ``volumes.path`` names and that is missing (mistyped, or its
    disk not mounted) is refused, naming the key."""
    return open_library(
        config.get("volumes.kind"),
        config.volume_settings(),
        recover,
        ArchiveIdFile(config.data_dir),
        make_folder=not config.get("volumes.path"),
    )


def _mirror_tier(config: Config) -> PackTier:
    from appliance.hsm.mirror import MirrorRecallTier
    from appliance.replication.process import open_mirror

    return MirrorRecallTier(
        lambda: open_mirror(config), config.restore_folder / "recall"
    )
