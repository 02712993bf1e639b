"""Ctrl-C (SIGINT) while a restore rebuilds the catalog: it says that it
stopped and what to do, puts nothing in place, and the next run
completes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.restore.progress import is_pending
from tests.restore_site import Restored, appliance, interrupted_summary
from tests.sigint_in_exec import SENT
from tests.signal_on_open import SENT as SENT_ANY

_COMMAND = (sys.executable, "-m", "appliance")
_REPOSITORY = Path(__file__).resolve().parents[1]


def test_ctrl_c_in_the_catalog_phase_says_to_run_it_again(disaster, site) -> None:
    restored, mirror = site
    process = subprocess.Popen(
        [*_COMMAND, *_slow_restore(restored, mirror)],
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

    _assert_stopped_then_completes(disaster, restored, process.returncode, err)


# The pending mark is written just before the catalog phase imports most
# of its modules; the snapshot is the first file it reads from the mirror.
@pytest.mark.parametrize("opened", [".pending.tmp", ".sealed.download.part"])
def test_ctrl_c_inside_an_exec_of_the_catalog_phase_still_exits_1(
    disaster, site, opened: str
) -> None:
    # CPython, running a module (-m), ends with SIGINT (-2) after a
    # KeyboardInterrupt that left a string exec, even a handled one.
    restored, mirror = site
    stopped = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.sigint_in_exec",
            opened,
            *_slow_restore(restored, mirror),
        ],
        cwd=_REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert SENT in stopped.stderr, stopped.stderr
    _assert_stopped_then_completes(
        disaster, restored, stopped.returncode, stopped.stderr
    )


def _slow_restore(restored: Restored, mirror: Path) -> list[str]:
    """Slow enough that the catalog phase is still reading when stopped."""
    rate = sum(path.stat().st_size for path in mirror.rglob("*") if path.is_file())
    return [
        "restore",
        "--from",
        "mirror",
        "--rate",
        f"{rate / 20_000:.3f}KB",
        "--config",
        str(restored.config_path),
    ]


def _assert_stopped_then_completes(
    disaster, restored: Restored, returncode: int, err: str
) -> None:
    assert returncode == 1, err
    assert "Aborted" not in err and "Traceback" not in err
    assert err.count("run the same command again") == 1, err
    assert not restored.config.catalog_path.exists() or not any(
        restored.config.catalog_path.iterdir()
    )
    again = restored.restore()
    assert again.returncode == 0, again.stderr
    assert restored.held() == (disaster[1], disaster[2])


# Each instance of the data phase is extracted to a temporary name, in a
# worker thread.
_EXTRACTED = r"^open .*/online/objects/[0-9a-f]{2}/\.[^/]+\.tmp$"


@pytest.mark.parametrize("signals", ["INT", "TERM", "INT,INT"])
def test_stopped_in_the_data_phase_says_one_line(disaster, site, signals) -> None:
    """Signalled as the first study's first instance is extracted: that
    study is finished and counted; one line says what is done, one what
    to do, exit 1; the next run restores the rest."""
    restored, _mirror = site
    command = [sys.executable, "-m", "tests.signal_on_open", "--any-thread"]
    command += [_EXTRACTED, signals, "restore", "--from", "mirror"]
    command += ["--config", str(restored.config_path)]

    stopped = subprocess.run(
        command, cwd=_REPOSITORY, capture_output=True, text=True, timeout=120
    )

    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "Aborted" not in stopped.stderr and "Traceback" not in stopped.stderr
    said = [line for line in stopped.stderr.splitlines() if SENT_ANY not in line]
    done, waiting = interrupted_summary(said)
    assert stopped.stderr.count("not tried yet") == 1, stopped.stderr
    held = disaster[1]
    assert 0 < done < len(held) and done + waiting == len(held)
    assert len(restored.object_files()) == done
    assert restored.held()[0] == {u: held[u] for u in restored.held()[0]}
    # The data phase stays to do, and the status says how it goes on.
    assert is_pending(restored.data_dir / "restore")
    status = appliance("restore", "status", config=restored.config_path).stdout
    assert "restore (command): stopped," in status, status
    assert "run the restore again to continue" in status, status

    again = restored.restore()

    assert again.returncode == 0, again.stderr
    assert restored.held() == (disaster[1], disaster[2])
    assert len(restored.object_files()) == len(held)
    assert not is_pending(restored.data_dir / "restore")


def test_stopped_in_the_last_study_is_a_finished_restore(disaster, site) -> None:
    """Signalled as the last study's first instance is extracted: that
    study is finished, and with it every study, so the restore is over:
    the full report, exit 0, and nothing left marked for the service to
    restore."""
    restored, _mirror = site
    _folder, held, _found, studies = disaster
    # Studies come back newest first: the oldest one is the last.
    before_last = len(held) - len(set(studies["ct-old"]))
    signals = ",".join(["-"] * before_last + ["INT"])
    command = [sys.executable, "-m", "tests.signal_on_open", "--any-thread"]
    command += [_EXTRACTED, signals, "restore", "--from", "mirror"]
    command += ["--config", str(restored.config_path)]

    stopped = subprocess.run(
        command, cwd=_REPOSITORY, capture_output=True, text=True, timeout=120
    )

    assert f"{SENT_ANY} SIGINT" in stopped.stderr, stopped.stderr
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "interrupted" not in stopped.stderr, stopped.stderr
    assert f"restored and verified: {len(held)} instance(s)" in stopped.stdout
    assert restored.held() == (disaster[1], disaster[2])
    assert not is_pending(restored.data_dir / "restore")
    status = appliance("restore", "status", config=restored.config_path).stdout
    assert status.startswith("restore: finished"), status
