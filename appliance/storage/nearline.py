"""The nearline tier: study packs as files on a slower disk array.

Layout under the tier's root::

    packs/NN/p-000000123.pack    one pack per file; NN are the pack
                                 number's last two digits (100 folders), so
                                 that no folder grows without bound

A pack file counts as a copy only once it was read back, verified and
recorded in the catalog; files the catalog does not know are orphans that
the scrub reports (never deleted here).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import StorageError
from appliance.storage import durable
from appliance.storage.keys import DataKey, KeyStore
from appliance.storage.packs import PackReader, PackSummary, write_pack_file
from appliance.storage.packs.manifest import InstanceMeta
from appliance.storage.packs.writer import Source

logger = logging.getLogger(__name__)

TIER_NAME = "nearline"
_PACK_ID = re.compile(r"p-\d{9}")


def _drop_cached(path: Path) -> None:
    """Ask the kernel to forget a flushed file's cached pages."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError as exc:
        logger.debug("cannot drop the cached pages of %s: %s", path, exc)


class NearlineTier:
    """Study packs in plain files on a disk array."""

    def __init__(self, root: Path, make_root: bool = True) -> None:
        """``make_root`` False: ``root`` is a folder the configuration names
        (a mount point), which ``open`` never makes."""
        self.root = root
        self.make_root = make_root
        self.packs = root / "packs"

    def open(self, writer: bool = False) -> None:
        """Create the layout if it is not there yet; the writer (the holder
        of the migration lock) also removes packs a crash left half-written."""
        if not self.make_root:
            durable.require_named_folder(
                self.root, "storage.nearline_path", "nearline tier"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            durable.make_directories(self.packs, self.root)
            if writer:
                for leftover in self.packs.glob("*/.*.partial"):
                    leftover.unlink(missing_ok=True)
                    logger.info("nearline tier: removed half-written %s", leftover)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {self.root}") from exc

    def location_of(self, pack_id: str) -> str:
        """Where the tier keeps ``pack_id``, relative to its root."""
        if not _PACK_ID.fullmatch(pack_id):
            raise StorageError(f"not a pack ID: {pack_id!r}")
        return f"packs/{pack_id[-2:]}/{pack_id}.pack"

    def path_of(self, location: str) -> Path:
        """The file at a location this tier gave out."""
        pack_id = Path(location).stem
        if location != self.location_of(pack_id):
            raise StorageError(f"not a nearline location: {location!r}")
        return self.root / location

    def write(
        self,
        pack_id: str,
        items: Iterable[tuple[InstanceMeta, Source]],
        study_uid: str,
        key: DataKey | None,
        keys: KeyStore | None = None,
    ) -> tuple[str, PackSummary]:
        """Write a pack durably and read it all back; (its location, what
        was written). A pack that fails the read-back is deleted."""
        location = self.location_of(pack_id)
        # The tier's folder is made when it opens, never here: gone since,
        # its disk is no longer mounted, and a pack made anew in the empty
        # mount point would be hidden once the disk is back.
        if not self.packs.is_dir():
            raise StorageError(
                f"{self.packs} is gone: is the nearline tier's disk still "
                f"mounted at {self.root}?"
            )
        summary = write_pack_file(
            self.root / location, items, pack_id, study_uid, key, root=self.packs
        )
        # Read the disk, not the page cache the write just filled: a bad
        # write to the array must fail here, not at the first recall.
        _drop_cached(self.root / location)
        with PackReader.open(self.root / location, keys) as reader:
            report = reader.read_all()
        if not report.ok:
            self.remove(location)
            raise StorageError(
                f"pack {pack_id} failed its read-back: {report.describe()}"
            )
        return location, summary

    @contextmanager
    def reader(
        self,
        location: str,
        pack_id: str,
        size: int,
        sha256: str,
        keys: KeyStore | None = None,
    ) -> Iterator[PackReader]:
        """A reader of the pack at ``location``."""
        with PackReader.open(self.path_of(location), keys) as reader:
            if reader.pack_id != pack_id:
                raise StorageError(f"{location} holds pack {reader.pack_id}")
            yield reader

    def is_reachable(self, location: str) -> bool:
        return True

    def volume_of(self, location: str) -> str | None:
        return None

    def remove(self, location: str) -> None:
        """Delete a pack (only once the catalog no longer counts it)."""
        path = self.path_of(location)
        try:
            path.unlink()
            durable.fsync_directory(path.parent)
        except FileNotFoundError:
            # Gone already, its folder too maybe (a disk lost and replaced,
            # its packs made again elsewhere): nothing to remove or flush.
            return
        except OSError as exc:
            logger.warning("nearline tier: cannot remove %s: %s", path, exc)

    def usage(self) -> tuple[int, int]:
        """(bytes used on the file system, bytes free)."""
        usage = shutil.disk_usage(self.root)
        return usage.used, usage.free
