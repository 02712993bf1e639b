"""Command-line options that stand for configuration keys (``serve --port``,
``--workers``, ``--ae-title``, ``--bind``, ``--web-port``; ``--data-dir``
everywhere) are
checked like the same keys in the file: a bad value is one line naming the
key, exit 2, and nothing starts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import config_text, free_port
from tests.ports import held_port


def serve(folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``appliance serve`` with ``options``; fails the test if it starts."""
    config = folder / "appliance.toml"
    settings = {
        "node": {"port": free_port()},
        "web": {"port": free_port(), "enabled": False},
        "storage": {"data_dir": str(folder / "data")},
    }
    config.write_text(config_text(settings, []))
    command = [sys.executable, "-m", "appliance", "serve", "--config", str(config)]
    process = subprocess.Popen(
        [*command, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"serve {options} started") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--port", "70000"), "node.port: must be an integer from 1 to 65535"),
        (("--workers", "-3"), "node.workers: must be an integer from 0 to 64"),
        (("--ae-title", ""), "node.ae_title: must be 1 to 16 characters"),
        (("--ae-title", "A" * 17), "node.ae_title: must be 1 to 16 characters"),
        (("--bind", "999.1.1.1"), "node.bind_address: must be an IPv4 or IPv6"),
        (("--data-dir", ""), "storage.data_dir: must be a path"),
        (("--web-port", "0"), "web.port: must be an integer from 1 to 65535"),
    ],
)
def test_a_bad_serve_option_names_its_key(
    tmp_path: Path, options: tuple[str, str], message: str
) -> None:
    done = serve(tmp_path, *options)

    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_web_port_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    settings = {
        "node": {"port": free_port()},
        "web": {"port": free_port()},
        "storage": {"data_dir": str(tmp_path / "data")},
    }
    config.write_text(config_text(settings, []))
    # Held until the test ends: what answers there can only be this
    # appliance, not another test run's.
    chosen = held_port()
    command = [sys.executable, "-m", "appliance", "serve", "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--web-port", str(chosen.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no HTTP on the --web-port"
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{chosen.port}/health"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    assert answer.status == 200
                    break
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        chosen.release()
