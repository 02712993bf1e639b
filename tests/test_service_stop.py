"""Stopping the service by signalling its whole process group (``kill --
-PGID``, ``timeout``, a container's stop): every child hears SIGTERM at
the same moment as the listener. That is a stop, not a failure: no child
is reported ended nor started again."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import Appliance


def test_sigterm_to_the_process_group_logs_no_failure(appliance_factory) -> None:
    appliance: Appliance = appliance_factory().start()
    assert appliance.process is not None
    # Replication says so once it handles SIGTERM itself (and exits 0 on it).
    deadline = time.monotonic() + 60
    while "replication to the directory mirror started" not in appliance.log():
        assert time.monotonic() < deadline, appliance.log()
        time.sleep(0.1)

    os.killpg(appliance.process.pid, signal.SIGTERM)
    appliance.process.wait(timeout=60)

    log = appliance.log()
    assert "appliance stopped" in log
    assert " ERROR " not in log, log
    assert "starting it again" not in log
