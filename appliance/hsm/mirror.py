"""The off-site mirror as the farthest tier a recall reads from.

When no nearer copy of an instance can be read (a restore is still under
way, or a nearline pack was lost), a recall fetches the pack that holds it
from the mirror into a scratch folder, reads it, and removes it. Nothing is
kept between recalls: a recall reads each pack once, and the restore has
its own cache. An instance on a volume on the shelf is not read from the
mirror: the operator is asked to load the volume, as without a mirror.

A recall someone waits for goes before a restore in the background: while
it fetches, it holds a shared lock that the restore waits on before it
fetches its next pack (:func:`wait_for_recalls`). It is not held to the
restore's timetable for the same reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.children import process_alive
from appliance.errors import StorageError
from appliance.replication.names import pack_name
from appliance.replication.transports import Transport
from appliance.restore.cache import ReadOnlyMirror
from appliance.restore.mirror import Fetcher
from appliance.storage.keys import KeyStore
from appliance.storage.lock import TierLock
from appliance.storage.packs import PackReader

logger = logging.getLogger(__name__)

RECALLS_LOCK = "recalls.lock"
_SCRATCH_PREFIX = "recall-"

OpenTransport = Callable[[], Transport]


class MirrorRecallTier(ReadOnlyMirror):
    """Packs read from the mirror when a recall needs them."""

    def __init__(self, open_transport: OpenTransport, folder: Path) -> None:
        self.open_transport = open_transport
        self.folder = folder

    @contextmanager
    def reader(
        self,
        location: str,
        pack_id: str,
        size: int,
        sha256: str,
        keys: KeyStore | None = None,
    ) -> Iterator[PackReader]:
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.folder)
        scratch = Path(
            tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=self.folder)
        )
        try:
            path = self._fetch(pack_id, size, sha256, scratch)
            with PackReader.open(path, keys) as reader:
                if reader.pack_id != pack_id:
                    raise StorageError(f"{location} holds pack {reader.pack_id}")
                yield reader
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _fetch(self, pack_id: str, size: int, sha256: str, scratch: Path) -> Path:
        """The pack fetched into ``scratch``, holding back a restore meanwhile."""
        started = time.monotonic()
        recalling = TierLock(self.folder, RECALLS_LOCK)
        recalling.acquire(exclusive=False, wait=60.0)
        try:
            transport = self.open_transport()
            try:
                fetched = Fetcher(transport).fetch(
                    pack_name(pack_id), scratch / f"{pack_id}.pack"
                )
            finally:
                transport.close()
        finally:
            recalling.release()
        if fetched.size != size or fetched.sha256 != sha256:
            # Still read: every instance is checked against the catalog as
            # it is extracted, so the intact ones come back.
            logger.warning(
                "pack %s read from the mirror differs from its record (%d bytes of %d)",
                pack_id,
                fetched.size,
                size,
            )
        logger.info(
            "pack %s fetched from the mirror for a recall: %d bytes in %.1f s",
            pack_id,
            fetched.size,
            time.monotonic() - started,
        )
        return fetched.path


def wait_for_recalls(folder: Path, stopping: Callable[[], bool]) -> None:
    """Wait while a recall fetches from the mirror (it goes first)."""
    lock = TierLock(folder, RECALLS_LOCK)
    said = False
    while not lock.acquire(exclusive=True):
        if stopping():
            return
        if not said:
            logger.info("restore waits: a recall is reading the mirror")
            said = True
        time.sleep(0.5)
    lock.release()


def remove_abandoned(folder: Path) -> None:
    """Scratch folders of processes that died while they recalled."""
    for path in folder.glob(f"{_SCRATCH_PREFIX}*"):
        pid = path.name[len(_SCRATCH_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
