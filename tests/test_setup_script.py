"""scripts/setup on a machine whose Python cannot make a virtual environment
(Debian's without python3-venv): a clear error, and no half-made .venv that
the next run would take for a finished one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]

# Debian's `python3 -m venv` without python3-venv: the folder and its
# interpreter are made, then ensurepip is missing and it exits 1.
HALF_VENV = """#!/bin/sh
mkdir -p "$3/bin"
printf '#!/bin/sh\\nexit 1\\n' > "$3/bin/python"
chmod +x "$3/bin/python"
echo "The virtual environment was not created successfully" >&2
exit 1
"""


def _checkout(tmp_path: Path) -> Path:
    """A copy of what scripts/setup reads: itself and pyproject.toml."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup", checkout / "scripts" / "setup")
    shutil.copy2(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    return checkout


def _fake_python(tmp_path: Path) -> Path:
    python = tmp_path / "python-without-venv"
    python.write_text(HALF_VENV)
    python.chmod(0o755)
    return python


def _setup(checkout: Path, python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "setup")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_venv_that_fails_half_way_is_removed_and_explained(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)
    result = _setup(checkout, _fake_python(tmp_path))
    assert result.returncode == 1
    assert "python3-venv" in result.stderr
    assert "could not make the virtual environment" in result.stderr
    assert not (checkout / ".venv").exists()


def test_a_venv_without_pip_left_by_an_earlier_run_stops_setup(
    tmp_path: Path,
) -> None:
    checkout = _checkout(tmp_path)
    python = _fake_python(tmp_path)
    subprocess.run(
        [str(python), "-m", "venv", str(checkout / ".venv")],
        capture_output=True,
        check=False,
    )
    result = _setup(checkout, python)
    assert result.returncode == 1
    assert ".venv has no pip" in result.stderr
    assert "rm -rf .venv" in result.stderr
    # Not removed behind the administrator's back: it may be theirs.
    assert (checkout / ".venv" / "bin" / "python").exists()
