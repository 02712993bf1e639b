"""Why each instance a restore could not bring back failed, kept for the
final report in ``DATA_DIR/restore/failures.jsonl``.

The catalog only says that a copy stopped counting; the report, written
when every study was tried (perhaps by another run, or by the service),
needs to say what went wrong. So each failure is appended here, one JSON
line per instance, and flushed, before recall stops counting the copy,
whichever recall it was: the restore's own, or one the service or a
command made from the mirror while the restore was pending::

    {"uid": "1.2.826...", "pack": "p-000000003", "kind": "member-damaged",
     "detail": "instances/000001.dcm.zst.enc: GCM tag does not match..."}

A later line for the same instance wins (a salvage says more than the
recall before it). A line cut short by a crash is skipped when read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.hsm.failures import Failure
from appliance.restore.progress import is_pending
from appliance.storage import durable

if TYPE_CHECKING:
    from appliance.hsm.recall import RecallResult

logger = logging.getLogger(__name__)

FILE = "failures.jsonl"


@dataclass(frozen=True)
class Noted:
    """A failure as noted: the pack that did not give the instance, and why."""

    pack_id: str
    failure: Failure


class FailureLog:
    """The failures noted by a restore in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE

    def add(self, pack_id: str, found: dict[str, Failure]) -> None:
        """Note why each instance of ``found`` (by SOP Instance UID) was not
        given by ``pack_id``, on the disk before this returns."""
        if not found:
            return
        lines = "".join(
            json.dumps({"uid": uid, "pack": pack_id, **failure.as_json()}) + "\n"
            for uid, failure in found.items()
        )
        try:
            new = not self.path.exists()
            if not new and not _ends_a_line(self.path):
                lines = "\n" + lines  # after the line a crash cut short
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(lines)
                out.flush()
                os.fsync(out.fileno())
            if new:
                durable.fsync_directory(self.path.parent)
        except OSError as exc:
            raise durable.translate_os_error(exc, f"cannot write {self.path}") from exc

    def note_recall(self, result: RecallResult) -> None:
        """Note why each instance the recall's packs did not give failed."""
        for pack_id, uids in result.damaged.items():
            noted = result.failures
            self.add(pack_id, {uid: noted[uid] for uid in uids if uid in noted})

    def read(self) -> dict[str, Noted]:
        """Every instance noted, by SOP Instance UID; the last note wins."""
        noted: dict[str, Noted] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return noted
        except OSError as exc:
            logger.warning("cannot read %s: %s", self.path, exc)
            return noted
        for line in text.splitlines():
            try:
                data = json.loads(line)
                noted[data["uid"]] = Noted(data["pack"], Failure.from_json(data))
            except (ValueError, KeyError, TypeError):
                continue  # the last line of a run that died while writing it
        return noted

    def clear(self) -> None:
        """Forget the failures of an earlier restore (a new one begins)."""
        self.path.unlink(missing_ok=True)


def while_restoring(folder: Path) -> Callable[[RecallResult], None]:
    """A recall's ``failed`` hook for the recalls made beside a restore (the
    service's, a command's): while the restore in ``folder`` still has its
    data to bring back, why each instance failed goes into its log, or its
    report would have only the catalog's word that the copy stopped
    counting."""
    log = FailureLog(folder)

    def failed(result: RecallResult) -> None:
        if is_pending(folder):
            log.note_recall(result)

    return failed


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or its last byte ends a line."""
    with open(path, "rb") as source:
        if source.seek(0, os.SEEK_END) == 0:
            return True
        source.seek(-1, os.SEEK_END)
        return source.read(1) == b"\n"
