"""Steps that a stop at once (a second Ctrl-C, SIGTERM: see
:mod:`appliance.cli_interrupt`) must not cut in two.

A command stops at once by raising KeyboardInterrupt in its main thread,
wherever that thread is. Most of a recall may be cut so: the files it
wrote are removed as the exception passes. Once its copies are being
counted, the rest (the copies' transaction, the volume requests, the
copies of damaged packs no longer counted as verified, the audit record)
must run to its end. The command's handler asks :func:`may_cut` first;
when it may not, the stop is only noted, and the command stops after the
item in flight, a few milliseconds later.

Signal handlers run in the main thread, so only its steps are marked (a
service's threads recall side by side, and no handler asks there).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_cuttable = True


def may_cut() -> bool:
    """Whether a stop at once may raise KeyboardInterrupt here."""
    return _cuttable


@contextmanager
def whole() -> Iterator[None]:
    """A step that a stop at once must not cut (but see :func:`cuttable`)."""
    with _set(False):
        yield


@contextmanager
def cuttable() -> Iterator[None]:
    """Inside a :func:`whole` step, a part that may be cut: the step's own
    handling of KeyboardInterrupt surrounds it."""
    with _set(True):
        yield


@contextmanager
def _set(value: bool) -> Iterator[None]:
    global _cuttable
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, _cuttable = _cuttable, value
    try:
        yield
    finally:
        _cuttable = previous
