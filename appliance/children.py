"""What every child process of the service does first."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when the listener dies, so
    that no worker, migration or replication outlives a killed service."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        logger.debug("prctl is not available; children outlive a killed listener")
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def run_child(target: Callable[..., None], args: tuple[Any, ...], name: str) -> int:
    """Run ``target(*args)`` in a fresh child process (spawned: nothing of
    the listener's state is shared) and wait for it; its exit code, logged
    when not 0."""
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=target, args=args, name=name, daemon=True)
    child.start()
    child.join()
    if child.exitcode:
        logger.error("%s run ended with exit code %s", name, child.exitcode)
    return child.exitcode or 0
