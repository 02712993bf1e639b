"""The durable-writing helpers: a large file is flushed while it is written."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from unittest import mock

from appliance.storage import durable


def test_a_file_growing_past_a_step_is_flushed_while_it_is_written(
    tmp_path: Path,
) -> None:
    flushed_sizes: list[int] = []
    real_fdatasync = os.fdatasync
    piece = bytes(1 << 20)

    def fdatasync(fd: int) -> None:
        flushed_sizes.append(os.fstat(fd).st_size)
        real_fdatasync(fd)

    with (
        mock.patch.object(durable.os, "fdatasync", fdatasync),
        open(tmp_path / "big", "wb", buffering=0) as out,
        durable.flushed_ahead(out.fileno()),
    ):
        for _ in range(3 * 8):
            out.write(piece)
        deadline = time.monotonic() + 10
        while not flushed_sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        during = list(flushed_sizes)

    assert during and during[0] >= 8 << 20
    assert not any(t.name == "flush-ahead" for t in threading.enumerate())


def test_a_small_file_is_left_to_its_own_fsync(tmp_path: Path) -> None:
    with (
        mock.patch.object(durable.os, "fdatasync") as fdatasync,
        open(tmp_path / "small", "wb", buffering=0) as out,
        durable.flushed_ahead(out.fileno()),
    ):
        out.write(bytes(1 << 20))
        time.sleep(0.2)

    fdatasync.assert_not_called()
