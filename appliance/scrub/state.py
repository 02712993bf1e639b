"""What the scrub remembers between runs: ``DATA_DIR/scrub/state.json``.

Per tier: where the pass under way stopped (the catalog key last checked),
when it began, when the last whole pass ended, and the counts of copies
checked, found bad and repaired. Beside them, the instances left with no
good copy, the orphans the last whole pass found, the offline packs
waiting for their volume and when each volume was last read. The file is replaced
durably (temp name, fsync, rename), so a killed scrub resumes from the
last saved cursor and checks at most the copies since again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import StorageError
from appliance.storage import durable

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class TierState:
    """One tier's pass: its cursor and its counts."""

    cursor: str = ""  # the last catalog key checked; "" at a pass's start
    pass_started: float = 0.0
    pass_checked: int = 0
    last_full_pass: float = 0.0  # when the last whole pass ended
    checked: int = 0
    bad: int = 0
    repaired: int = 0


@dataclass
class ScrubState:
    """The scrub's memory: tiers, instances without a good copy, orphans."""

    tiers: dict[str, TierState] = field(default_factory=dict)
    # SOP Instance UID -> what was found (no good copy left anywhere)
    lost: dict[str, str] = field(default_factory=dict)
    # tier -> paths, relative to the tier's root, no catalog entry names
    orphans: dict[str, list[str]] = field(default_factory=dict)
    # pack ID -> the volume, not loaded when the pass came to the pack
    waiting: dict[str, str] = field(default_factory=dict)
    # volume -> when the scrub last read a pack on it
    volumes: dict[str, float] = field(default_factory=dict)

    def tier(self, name: str) -> TierState:
        return self.tiers.setdefault(name, TierState())

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScrubState:
        return cls(
            tiers={k: TierState(**v) for k, v in data.get("tiers", {}).items()},
            lost=dict(data.get("lost", {})),
            orphans={k: list(v) for k, v in data.get("orphans", {}).items()},
            waiting=dict(data.get("waiting", {})),
            volumes=dict(data.get("volumes", {})),
        )


def pass_sizes(instances: int, packs: dict[str, int]) -> dict[str, int]:
    """Roughly what a whole pass of each tier reads: every instance online;
    below, the tier's own packs (``packs``: how many each tier holds), not
    those of the other tiers or the mirror, which its pass skips."""
    return {
        "online": instances,
        "nearline": packs.get("nearline", 0),
        "offline": packs.get("offline", 0),
    }


def folder_of(data_dir: Path) -> Path:
    return data_dir / "scrub"


def load(folder: Path) -> ScrubState:
    """The saved state; a fresh one when there is none (or it is unreadable,
    which costs a pass from the start, nothing else)."""
    path = folder / STATE_FILE
    try:
        return ScrubState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return ScrubState()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("scrub state %s unreadable (%s); starting afresh", path, exc)
        return ScrubState()


def save(folder: Path, state: ScrubState) -> None:
    """Replace the saved state durably."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{STATE_FILE}.{os.getpid()}.tmp"
        temp.write_text(json.dumps(state.as_json(), indent=1, sort_keys=True))
        durable.move_into_place(temp, folder / STATE_FILE, folder)
    except OSError as exc:
        raise StorageError(f"cannot save the scrub state in {folder}: {exc}") from exc
