"""What every child process of the service does first."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

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
