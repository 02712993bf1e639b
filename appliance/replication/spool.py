"""Packs written for the mirror and not yet recorded there, in the spool.

::

    SPOOL/pending/p-000000123.pack      a pack, complete and flushed
    SPOOL/pending/p-000000123.json      its note: size, SHA-256, members,
                                        checksums, queue entries, master key
    SPOOL/pending/p-000000124.pack.tmp  a pack being written

A pack is written under its ``.tmp`` name, flushed and renamed; its note
follows (temporary name, flush, rename). So every note has its whole pack
on disk, a crash at any instant leaves at worst a ``.tmp`` file or a pack
without a note, both removed by :meth:`Spool.clean` at the next start, and
the note of the lowest pack number is the next pack to send. The queue
entries a note lists stay in the catalog's queue until the pack is
recorded: a pack lost from the spool only means they are packed again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from appliance.storage import durable

logger = logging.getLogger(__name__)

_TEMPORARY = ".tmp"


@dataclass
class SpooledPack:
    """A pack in the spool waiting to reach the mirror, and what it holds."""

    path: Path
    pack_id: str
    size: int
    sha256: str
    members: dict[str, str]  # SOP Instance UID -> member name
    checksums: dict[str, str]  # SOP Instance UID -> SHA-256 of its bytes
    numbers: dict[str, list[int]]  # SOP Instance UID -> its queue entries
    key_id: str | None = None  # the master key that wraps the pack's data key

    @property
    def note(self) -> Path:
        return self.path.with_suffix(".json")

    def queue_numbers(self) -> set[int]:
        """The queue entries this pack takes off the queue once recorded."""
        return {number for numbers in self.numbers.values() for number in numbers}

    def save(self) -> None:
        """Write the note, durably; the pack must be in place already."""
        note = {
            "pack_id": self.pack_id,
            "size": self.size,
            "sha256": self.sha256,
            "members": self.members,
            "checksums": self.checksums,
            "numbers": self.numbers,
            "key_id": self.key_id,
        }
        temporary = self.note.with_suffix(".json" + _TEMPORARY)
        temporary.write_text(json.dumps(note))
        durable.move_into_place(temporary, self.note, self.path.parent)

    @classmethod
    def load(cls, note: Path) -> SpooledPack | None:
        """The pack a note describes; None (and both removed) if the note
        is unreadable or the pack is not the size it says."""
        path = note.with_suffix(".pack")
        try:
            data = json.loads(note.read_text())
            if path.stat().st_size != data["size"]:
                raise ValueError("the spooled pack is cut short")
            return cls(path=path, **data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("dropping the unfinished upload %s: %s", note.name, exc)
            note.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            return None

    def discard(self) -> None:
        """Remove the note, then the pack (the order a crash can survive)."""
        self.note.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


class Spool:
    """The folder of packs waiting for the mirror."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def clean(self) -> None:
        """Remove what a process that died while writing left behind.

        Only while no pack is being written: a pack between its rename and
        its note looks the same as one whose writer died.
        """
        for leftover in self.folder.glob(f"*{_TEMPORARY}"):
            leftover.unlink()
        for pack in self.folder.glob("*.pack"):
            if not pack.with_suffix(".json").exists():
                pack.unlink()

    def empty(self) -> bool:
        return not any(self.folder.glob("*.json"))

    def packs(self) -> list[SpooledPack]:
        """Every pack with its note, the oldest (lowest number) first."""
        found = []
        for note in sorted(self.folder.glob("*.json")):
            pack = SpooledPack.load(note)
            if pack is not None:
                found.append(pack)
        return found

    def writing_path(self, pack_id: str) -> Path:
        """Where a pack is written before :meth:`add` puts it in place."""
        return self.folder / f"{pack_id}.pack{_TEMPORARY}"

    def add(self, written: Path, pack: SpooledPack) -> None:
        """Put a written pack in place, flushed, then its note."""
        durable.move_into_place(written, pack.path, self.folder)
        pack.save()
