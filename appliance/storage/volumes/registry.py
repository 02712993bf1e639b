"""The library's memory of its volumes, kept on the appliance's own disk.

A medium on the shelf cannot be asked anything, yet the administrator must
see it (to know what to load) and the library must refuse to label its
name twice. So every labelled volume has one small JSON file here::

    REGISTRY/
      A00001L6.json   {"label": ..., "capacity": ..., "used": ...,
                       "full": ..., "packs": [...]}

``packs`` is filled only by backends whose medium cannot be listed cheaply
(tape); the others list the medium itself. Files are replaced durably, so
a crash leaves the previous or the next version, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.errors import VolumeError
from appliance.storage import durable
from appliance.storage.volumes.base import PackLocation, check_label

logger = logging.getLogger(__name__)


@dataclass
class VolumeRecord:
    """One volume as the registry remembers it."""

    label: str
    capacity: int
    used: int = 0
    full: bool = False
    packs: list[PackLocation] = field(default_factory=list)


class Registry:
    """Volume records, one JSON file each, under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def labels(self) -> list[str]:
        """Labels of every recorded volume, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(path.stem for path in self.folder.glob("*.json"))

    def twin_of(self, label: str) -> str | None:
        """A known label that differs from ``label`` only by case, if any."""
        wanted = label.casefold()
        for known in self.labels():
            if known != label and known.casefold() == wanted:
                return known
        return None

    def refuse_twin(self, label: str) -> None:
        """VolumeError if ``label`` differs only by case from a known label:
        one volume, whatever the case it is written in."""
        twin = self.twin_of(label)
        if twin is not None:
            raise VolumeError(
                f"volume label {label} differs only by case from volume {twin}, "
                f"labelled already: labels name one volume whatever their case "
                f"(use {twin}, or another label)"
            )

    def get(self, label: str) -> VolumeRecord | None:
        """The record of ``label``, or None if the volume is not known."""
        path = self.folder / f"{check_label(label)}.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise VolumeError(
                f"volume registry file {path} is unreadable: {exc}"
            ) from exc

        try:
            packs = [PackLocation(**entry) for entry in raw.pop("packs", [])]
            record = VolumeRecord(**raw, packs=packs)
        except TypeError as exc:
            raise VolumeError(f"volume registry file {path} is damaged: {exc}") from exc
        # On a file system that ignores case, another spelling's file.
        return record if record.label == label else None

    def save(self, record: VolumeRecord) -> None:
        """Replace the record of ``record.label`` durably; a new record's
        label never differs only by case from a known one's."""
        if record.label not in self.labels():
            self.refuse_twin(record.label)
        path = self.folder / f"{check_label(record.label)}.json"
        text = json.dumps(asdict(record), indent=1, sort_keys=True)
        write_atomically(path, text.encode(), self.folder.parent)


def write_atomically(path: Path, data: bytes, root: Path) -> None:
    """Write a small file so that a crash leaves all of it or none of it."""
    try:
        durable.make_directories(path.parent, root)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise durable.translate_os_error(exc, f"cannot write {path}") from exc

    try:
        durable.move_into_place(temporary, path, root)
    finally:
        if temporary.exists():
            os.unlink(temporary)
