"""A folder made read only for a test, as a file system remounted read only
after an error would be: a bind mount of the folder over itself, then
remounted read only. A chmod would not do: it does not stop root, which the
suite may run as. Tests that need it skip where mounting is not allowed."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def need_root() -> None:
    """Skip the test unless mounting may be possible here."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` read only until the block ends, then writable again."""
    need_root()
    try:
        for command in (
            ["mount", "--bind", str(folder), str(folder)],
            ["mount", "-o", "remount,ro,bind", str(folder)],
        ):
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                pytest.skip(
                    f"cannot make a read-only mount here: {done.stderr.strip()}"
                )
        yield folder
    finally:
        # Lazy: a file the test left open must not keep the mount.
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
