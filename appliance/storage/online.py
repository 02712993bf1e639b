"""The online tier: one plain file per instance, exactly the bytes received.

Layout under the tier's root::

    incoming/worker-N/     files being received by worker N; never counted,
                           emptied at start and when the worker dies
    objects/ab/KEY.dcm     stored instances; KEY is a random 32-hex-digit name
                           that the catalog assigns, never dataset content;
                           ab are its first two digits, random too (the
                           same for all the files one recall stages). The
                           256 folders are made when the tier is opened,
                           so that storing never has to create and flush a
                           new folder
    recalls/PID-X.note     the keys each recall in progress is writing, for
                           the clean-up after a killed one (hsm.recall_notes)

A file under ``objects/`` counts as a copy only once the catalog records it.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
from pathlib import Path

from appliance.errors import OutOfSpaceError, StorageError
from appliance.storage import durable

# What new_key makes: checked on every use, so it must cost little (a
# restore asks for several paths per instance).
_KEY = re.compile(r"[0-9a-f]{32}")

logger = logging.getLogger(__name__)

TIER_NAME = "online"


class OnlineTier:
    """Plain files on fast local storage (RAID or SSD)."""

    def __init__(
        self, root: Path, reserved_bytes: int = 0, make_root: bool = True
    ) -> None:
        """``make_root`` False: ``root`` is a folder the configuration names
        (a mount point), which ``open`` never makes."""
        self.root = root
        self.reserved_bytes = reserved_bytes
        self.make_root = make_root
        self.incoming = root / "incoming"
        self.objects = root / "objects"

    def open(self) -> None:
        """Create the layout if it is not there yet."""
        if not self.make_root:
            durable.require_named_folder(
                self.root, "storage.online_path", "online tier"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            durable.make_directories(self.incoming, self.root)
            durable.make_directories(self.objects, self.root)
            self._make_folders()
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot open {self.root}") from exc

    def _make_folders(self) -> None:
        """The 256 folders of ``objects/``, with one flush of their parent
        for all those made (not one each: a fresh tier makes them all)."""
        made = False
        for index in range(256):
            folder = self.objects / f"{index:02x}"
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                made = True
        if made:
            durable.fsync_directory(self.objects)

    def incoming_for(self, worker: int) -> Path:
        """The folder one worker process receives data sets into."""
        folder = self.incoming / f"worker-{worker}"
        folder.mkdir(exist_ok=True)
        return folder

    def discard_incoming(self, worker: int | None = None) -> None:
        """Drop files left half-received by a crash: all of them before the
        service starts (with instances half-recalled), or those of one
        worker that died."""
        folder = self.incoming if worker is None else self.incoming / f"worker-{worker}"
        if not folder.is_dir():
            return
        leftovers = [path for path in folder.rglob("*") if path.is_file()]
        if worker is None:
            # A recall extracts to a hidden temporary name beside the object.
            leftovers += list(self.objects.glob("*/.*.tmp"))
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        if leftovers:
            logger.info(
                "online tier: removed %d partly received file(s)", len(leftovers)
            )

    @staticmethod
    def new_key(beside: str | None = None) -> str:
        """A fresh, unguessable location key for a new instance; with
        ``beside``, one in the same folder as that key (a recall puts a
        study's files together, so that one flush of their folder makes
        all their names durable)."""
        if beside is None:
            return secrets.token_hex(16)
        return beside[:2] + secrets.token_hex(15)

    def path_of(self, key: str) -> Path:
        """The file that holds the instance stored under ``key``."""
        if not _KEY.fullmatch(key):
            raise StorageError(f"not an online tier key: {key!r}")
        return self.objects / key[:2] / f"{key}.dcm"

    def check_room(self, size: int) -> None:
        """Refuse a store of ``size`` bytes that would eat into the reserve."""
        free = shutil.disk_usage(self.root).free
        if free - size < self.reserved_bytes:
            raise OutOfSpaceError(
                f"no room for {size} bytes more: online tier {self.root} has "
                f"{free} bytes free, {self.reserved_bytes} are reserved"
            )

    def adopt(self, received: Path, key: str, flushed: bool = False) -> Path:
        """Move a fully received file in ``incoming/`` durably under ``key``;
        ``flushed``: its bytes are already on stable storage."""
        destination = self.path_of(key)
        durable.move_into_place(received, destination, self.root, flushed)
        return destination

    def remove(self, key: str) -> None:
        """Delete the file under ``key`` (only once the catalog no longer counts it)."""
        path = self.path_of(key)
        try:
            path.unlink(missing_ok=True)
            durable.fsync_directory(path.parent)
        except OSError as exc:
            logger.warning("online tier: cannot remove %s: %s", path, exc)

    def usage(self) -> tuple[int, int]:
        """(bytes used on the file system, bytes free) for status reports."""
        usage = shutil.disk_usage(self.root)
        return usage.used, usage.free
