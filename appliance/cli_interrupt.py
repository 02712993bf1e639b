"""Ctrl-C and SIGTERM in the commands that work through a list (``recall``,
``import``, ``volumes loaded``, ``migrate --now``): what each one stops,
and the line and exit status the command ends with.

- The first Ctrl-C lets the item in flight finish, then the loop stops.
- A second Ctrl-C, or SIGTERM, stops at once where the loop allows it
  (``at_once``): a KeyboardInterrupt is raised in the main thread, the
  work in flight cleans up after itself as it unwinds (a recall removes
  the files it wrote and had not counted), and the block ends there.
  Where stopping inside an item could leave something half done that
  nothing cleans up, it is only noted, as the first was: in a loop that
  says so, or in a step marked whole (:mod:`appliance.whole_steps`).
- Any signal after that is only noted: nothing may cut the clean-up short.

The command then says in one line how far it got, and exits 130 (128 +
SIGINT) or 143 (128 + SIGTERM). Interrupted during its last item, a
command that still finished that item ends as it would have.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from appliance import whole_steps

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interruption:
    """Whether, and by which signal, a command was asked to stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.number = 0
        # A KeyboardInterrupt was raised to stop at once.
        self.stopping_now = False

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, number: int = signal.SIGINT) -> None:
        """Note a stop (the first signal's number is the one exited with)."""
        if not self.number:
            self.number = number
        self._event.set()

    @property
    def status(self) -> int:
        """The exit status of a command this stopped: 128 + the signal."""
        return 128 + (self.number or signal.SIGINT)


@contextmanager
def interruptible(at_once: bool = True) -> Iterator[Interruption]:
    """An :class:`Interruption` that Ctrl-C and SIGTERM set, for a loop to
    stop after the item in flight (see the module for what a second Ctrl-C
    does). A KeyboardInterrupt raised to stop at once ends the block."""
    interruption = Interruption()
    previous = {number: signal.getsignal(number) for number in _SIGNALS}

    def handle(number: int, _frame: Any) -> None:
        first = not interruption.is_set()
        interruption.set(number)
        if first and number == signal.SIGINT:
            return
        # In a step that must stay whole, only noted: the loop stops after
        # the item, which that step ends.
        if at_once and not interruption.stopping_now and whole_steps.may_cut():
            interruption.stopping_now = True
            raise KeyboardInterrupt

    for number in _SIGNALS:
        signal.signal(number, handle)
    try:
        yield interruption
    except KeyboardInterrupt:
        # Raised by the handler to stop at once: the block ends here, and
        # the command says how far it got.
        interruption.set()
    finally:
        if not interruption.is_set():
            for number, handler in previous.items():
                signal.signal(number, handler)
        # Interrupted, the handler stays until the command exits: only
        # what the block left to close runs before that, and nothing may
        # cut it short.


def exit_if_interrupted(
    interrupted: Interruption, done: int, total: int, items: str
) -> None:
    """If a signal stopped a loop before its last item, say how far it got
    and exit with :attr:`Interruption.status`; one that came during the
    last item, which was then finished, stopped nothing, and the command
    ends as it would have."""
    if interrupted.is_set() and done < total:
        exit_interrupted(done, total, items, interrupted.status)


def exit_interrupted(done: int, total: int, items: str, status: int = 130) -> NoReturn:
    """Say how far a loop that a signal stopped got; exit with ``status``."""
    click.echo(
        f"interrupted: {done} of {total} {items} done; run the same command "
        "again for the rest",
        err=True,
    )
    sys.exit(status)


class Group(click.Group):
    """The ``appliance`` command group: Ctrl-C in a command that does not
    handle it ends the command with one line and exit 130, rather than
    with click's "Aborted!" and exit 1 (the status of a failure)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
