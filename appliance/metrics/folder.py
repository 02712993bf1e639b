"""Where the processes of a running service write their counters.

prometheus_client's multiprocess mode keeps each process's counters and
histograms in memory-mapped files in one folder, named by the process ID,
and a scrape adds them up. The service empties ``DATA_DIR/run/metrics`` at
its start and names it in ``PROMETHEUS_MULTIPROC_DIR`` before it starts any
child, so that every child (started with the spawn context, a fresh
interpreter) sees the variable before it first imports prometheus_client,
which is when the library chooses its multiprocess mode.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from appliance.errors import StorageError

logger = logging.getLogger(__name__)

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"


def folder_of(data_dir: Path) -> Path:
    return data_dir / "run" / "metrics"


def prepare(data_dir: Path) -> Path:
    """Empty the folder (a new service counts from zero, as Prometheus
    expects of a restarted target) and point this process's children at it."""
    folder = folder_of(data_dir)
    try:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    except OSError as exc:
        raise StorageError(
            f"cannot prepare the metrics folder {folder}: {exc}"
        ) from exc
    os.environ[ENVIRONMENT] = str(folder)
    return folder


def process_died(pid: int) -> None:
    """Forget what a dead process reported as live gauges (open
    associations); its counters and histograms stay and keep counting."""
    folder = os.environ.get(ENVIRONMENT)
    if not folder or not os.path.isdir(folder):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)
