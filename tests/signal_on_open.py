"""``python -m tests.signal_on_open [--any-thread] PATTERN SIGNALS
ARGUMENT...``: the ``appliance`` command with those arguments, sent a
signal from its main thread (or, with ``--any-thread``, from any) as it
opens or removes a file: the regular expression PATTERN is searched in
``open PATH`` or ``remove PATH``, and the Nth match sends the Nth of
SIGNALS, a comma-separated list of signal names without ``SIG`` (``-``
for none), e.g. ``-,INT,INT``. Sent from another thread, the signal's
handler runs in the main thread at its next step, before the work in
that thread can be counted (the main thread counts it).

This is an operator's Ctrl-C (or ``kill``) landing at a point the test
chooses, with no timing in it: the handler runs as the open or removal
begins, as it would for a signal that came just then. Run from the
repository's folder.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys
import threading
from typing import Any

# Written to stderr as each signal is sent: a test checks it was.
SENT = "signal_on_open: sent"
_EVENTS = {"open": "open", "os.remove": "remove"}


def main() -> None:
    arguments = sys.argv[1:]
    any_thread = arguments[0] == "--any-thread"
    if any_thread:
        arguments.pop(0)
    pattern = re.compile(arguments[0])
    signals = [
        None if name == "-" else signal.Signals[f"SIG{name}"]
        for name in arguments[1].split(",")
    ]
    lock = threading.Lock()
    matched = 0

    def opened(event: str, args: tuple[Any, ...]) -> None:
        nonlocal matched
        if event not in _EVENTS or matched >= len(signals):
            return
        if not isinstance(args[0], str | bytes):
            return
        main_thread = threading.current_thread() is threading.main_thread()
        if not (main_thread or any_thread):
            return
        if not pattern.search(f"{_EVENTS[event]} {os.fsdecode(args[0])}"):
            return
        with lock:
            if matched >= len(signals):
                return
            number = signals[matched]
            matched += 1
        if number is not None:
            print(f"{SENT} {number.name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), number)

    sys.addaudithook(opened)
    sys.argv = ["appliance", *arguments[2:]]
    runpy.run_module("appliance", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
