"""Ctrl-C (SIGINT) while a restore rebuilds the catalog: it says that it
stopped and what to do, puts nothing in place, and the next run
completes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from appliance.restore.progress import is_pending

_COMMAND = (sys.executable, "-m", "appliance")


def test_ctrl_c_in_the_catalog_phase_says_to_run_it_again(disaster, site) -> None:
    restored, mirror = site
    # Slow enough that the catalog phase is still reading when stopped.
    rate = sum(path.stat().st_size for path in mirror.rglob("*") if path.is_file())
    process = subprocess.Popen(
        [
            *_COMMAND,
            "restore",
            "--from",
            "mirror",
            "--rate",
            f"{rate / 20_000:.3f}KB",
            "--config",
            str(restored.config_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not is_pending(restored.data_dir / "restore"):
            assert time.monotonic() < deadline, "the catalog phase never began"
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 1, err
    assert "Aborted" not in err and "Traceback" not in err
    assert "run the same command again" in err
    assert not restored.config.catalog_path.exists() or not any(
        restored.config.catalog_path.iterdir()
    )
    again = restored.restore()
    assert again.returncode == 0, again.stderr
    assert restored.held() == (disaster[1], disaster[2])
