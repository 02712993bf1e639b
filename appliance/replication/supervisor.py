"""Keeping the replication process running beside the service.

The listener runs one :class:`Supervisor`: the replication child process,
started again whenever it exits and stopped with the service.
"""

from __future__ import annotations

from appliance.children import ChildSupervisor
from appliance.config import Config
from appliance.replication.process import run_replication

# Replication finishes its current step (an upload block, a commit) first.
_STOP_GRACE = 30.0


class Supervisor(ChildSupervisor):
    """Runs the replication child process until :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        super().__init__(
            run_replication, (config,), "replication", _STOP_GRACE, background=True
        )
