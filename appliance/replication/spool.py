"""Packs written for the mirror and not yet recorded there, in the spool.

::

    SPOOL/pending/p-000000123.pack      a pack, complete
    SPOOL/pending/p-000000123.json      its note: size, SHA-256, members,
                                        checksums, queue entries, master key
    SPOOL/pending/p-000000124.pack.tmp  a pack being written

A pack is written under its ``.tmp`` name and renamed; its note follows
(temporary name, flush, rename). The queue entries a note lists stay in the
catalog's queue until the pack is recorded, so a pack lost from the spool
only means they are packed again. That is why a pack's bytes are not
flushed: the spool holds copies of what the online tier keeps durably, and
flushing them doubled what replication writes to the disk (and slowed the
flushes that receiving and the mirror wait for) to save, after a power
cut, the packing of a pack or two again.

A power cut may therefore leave a note whose pack is cut short or holds
other bytes. :meth:`Spool.clean`, at the next start, removes what was being
written (a ``.tmp`` file, a pack without a note) and every pack whose size
or SHA-256 is not that of its note; the note of the lowest pack number left
is the next pack to send. A pack the running process wrote goes up from
the copy it kept in memory as it wrote (and hashed) it; the others, from
the spool, have the SHA-256 of what they send checked by the upload, so
bytes that change after the start are never recorded either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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

    def intact(self) -> bool:
        """Whether the pack's bytes still have the SHA-256 its note gives."""
        try:
            with open(self.path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256")
        except OSError:
            return False
        return digest.hexdigest() == self.sha256

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
        """Remove what a process that died while writing left behind, and
        the packs a power cut damaged (their instances are packed again).

        Only while no pack is being written: a pack between its rename and
        its note looks the same as one whose writer died.
        """
        for leftover in self.folder.glob(f"*{_TEMPORARY}"):
            leftover.unlink()
        for pack in self.folder.glob("*.pack"):
            if not pack.with_suffix(".json").exists():
                pack.unlink()
        for spooled in self.packs():
            if not spooled.intact():
                logger.warning(
                    "dropping %s from the spool: its bytes are not those its "
                    "note lists (cut off by a power cut?); its instances are "
                    "packed again",
                    spooled.path.name,
                )
                spooled.discard()

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
        """Put a written pack in place (not flushed: see above), then its note."""
        try:
            os.rename(written, pack.path)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot spool {pack.path}") from exc
        pack.save()
