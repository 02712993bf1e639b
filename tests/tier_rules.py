"""What the tests of migration, recall and volumes share: a rule that moves
every study from the online tier to a lower one, and the command line run
as an administrator runs it, or with a patch applied first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def move_everything_to(tier: str) -> str:
    """A [[rules]] entry, to append to a configuration, that moves every
    study from the online tier to ``tier`` at the next migration."""
    return (
        "\n[[rules]]\n"
        f'name = "all-to-{tier}"\n'
        'action = "move"\n'
        'from = "online"\n'
        f'to = "{tier}"\n'
    )


MOVE_TO_NEARLINE = move_everything_to("nearline")
MOVE_TO_OFFLINE = move_everything_to("offline")


def run(config: Path, *args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """``appliance ARGS --config CONFIG``; with ``code``, that Python source
    runs instead of ``-m appliance`` (it patches, then calls the CLI)."""
    start = ["-c", code] if code else ["-m", "appliance"]
    command = [sys.executable, *start, *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)
