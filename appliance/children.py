"""What every child process of the service does first."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Replication, migration, restore and the other background work yield the
# CPU to receiving and serving: a modality waiting for its C-STORE response
# or a workstation waiting for images goes first.
BACKGROUND_NICENESS = 10


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


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_in_background(target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """``target(*args)`` at the background work's lower CPU priority."""
    try:
        os.nice(BACKGROUND_NICENESS)
    except OSError as exc:
        logger.debug("cannot lower this process's priority: %s", exc)
    target(*args)


def run_child(
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
    background: bool = False,
) -> int:
    """Run ``target(*args)`` in a fresh child process (spawned: nothing of
    the listener's state is shared) and wait for it; its exit code, logged
    when not 0. ``background``: at the lower priority of background work."""
    if background:
        target, args = run_in_background, (target, args)
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=target, args=args, name=name, daemon=True)
    child.start()
    child.join()
    if child.exitcode:
        logger.error("%s run ended with exit code %s", name, child.exitcode)
    return child.exitcode or 0


class ChildSupervisor:
    """Keeps one child process running beside the service: a thread starts
    it, starts it again whenever it exits (after a pause if it died young,
    so that a child that cannot start does not spin), and stops it with the
    service: SIGTERM, ``stop_grace`` seconds, then SIGKILL."""

    # A child that dies sooner than this after its start waits before the next.
    young = 10.0
    # Seconds a child ended by SIGTERM waits for the service's own stop (the
    # service stops its children one after another) before its end is taken
    # for a failure.
    stop_follows = 10.0

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple[Any, ...],
        name: str,
        stop_grace: float = 30.0,
        until_success: bool = False,
        background: bool = False,
    ) -> None:
        """With ``until_success``, a child that exits with status 0 has done
        its work and is not started again; ``background``: the child runs at
        the lower priority of background work."""
        if background:
            target, args = run_in_background, (target, args)
        self.target = target
        self.until_success = until_success
        self.args = args
        self.name = name
        self.stop_grace = stop_grace
        self._stop = threading.Event()
        # Held while a child is made and started: a stop then finds either
        # no child (and none starts after it) or a started one, never a
        # process object that has no process yet.
        self._starting = threading.Lock()
        self._child: Any = None
        self._thread = threading.Thread(
            target=self._run, name=f"{name}-supervisor", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the child to finish its current step, then wait for it.

        Only the supervisor thread waits for the child: a second waiter
        could find it reaped already and take it for alive."""
        with self._starting:
            self._stop.set()
            child = self._child
        if child is not None:
            with contextlib.suppress(OSError, ValueError):
                child.terminate()
        self._thread.join(self.stop_grace)
        if self._thread.is_alive():
            # The child the thread waits for now (one started just as the
            # stop came, perhaps): killed.
            logger.warning(
                "%s did not stop in %d s; killed", self.name, self.stop_grace
            )
            with contextlib.suppress(OSError, ValueError, AttributeError):
                self._child.kill()
            self._thread.join()

    def _run(self) -> None:
        context = multiprocessing.get_context("spawn")
        while True:
            with self._starting:
                if self._stop.is_set():
                    return
                started = time.monotonic()
                child = context.Process(
                    target=self.target, args=self.args, name=self.name
                )
                child.start()
                self._child = child
            self._child.join()
            if self._stop.is_set():
                return
            if self.until_success and self._child.exitcode == 0:
                logger.info("%s process finished its work", self.name)
                return
            # Killed by SIGTERM, or (children that catch it) finished the
            # step and exited 0.
            stopped = self._child.exitcode in (0, -signal.SIGTERM)
            if stopped and self._stop.wait(self.stop_follows):
                # The whole service was sent SIGTERM (kill on the process
                # group): the child heard it first, the stop is under way.
                return
            logger.error(
                "%s process ended (exit code %s); starting it again",
                self.name,
                self._child.exitcode,
            )
            if time.monotonic() - started < self.young:
                self._stop.wait(self.young)
