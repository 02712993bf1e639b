"""``python -m tests.sigint_in_exec NAME ARGUMENT...``: the ``appliance``
command with those arguments, sent SIGINT from inside a string ``exec``
in its main thread the first time it opens a file called NAME.

``dataclasses`` and ``namedtuple`` make each class with such an ``exec``,
so a command that imports modules as it goes is often inside one when
Ctrl-C comes. Sent from there, the signal's Python handler runs inside
the ``exec``, as it then would. Run from the repository's folder, with
``-m`` as the tests run the command: CPython treats a KeyboardInterrupt
that left an ``exec`` differently when it runs a module.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
from pathlib import Path
from typing import Any

# Written to stderr when the signal is sent: a test checks it was.
SENT = "sigint_in_exec: SIGINT sent"


def main() -> None:
    name = sys.argv[1]
    sent = False

    def opened(event: str, args: tuple[Any, ...]) -> None:
        nonlocal sent
        if sent or event != "open" or not isinstance(args[0], str | bytes):
            return
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and Path(os.fsdecode(args[0])).name == name:
            sent = True
            print(SENT, file=sys.stderr, flush=True)
            exec("os.kill(os.getpid(), signal.SIGINT)", {"os": os, "signal": signal})

    sys.addaudithook(opened)
    sys.argv = ["appliance", *sys.argv[2:]]
    runpy.run_module("appliance", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
