"""The ansible role's plays run into a scratch root, for the ansible tests.

The play runs against localhost over the local connection with
``appliance_root`` set to a scratch folder, as the current user: no system
user is created, no Debian package installed, the units are enabled with
``systemctl --root`` and nothing is started. Results are read from ansible's
JSON output rather than its screen text.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).parents[1]
PLAYBOOK = REPOSITORY / "ansible" / "site.yml"
BIN = Path(sys.executable).parent
ROLE_ENTRIES = (
    "README.md",
    "pyproject.toml",
    "appliance",
    "docs",
    "examples",
    "hardware",
    "systemd",
)
# Made up for the test: no such mirror exists.
MIRROR_HOST_KEY = (
    "[mirror.example.invalid]:2222 ssh-ed25519 "
    "AAAAC3NzaC1lZDI1NTE5AAAAIHY0ZXN0LWtleS1ub3QtcmVhbC1hdC1hbGwtZm9yLXRlc3Q="
)


def tool(name: str) -> str:
    found = BIN / name
    if not found.exists():
        pytest.fail(f"{name} missing from {BIN}: run scripts/setup --test")
    return str(found)


def environment(home: Path) -> dict[str, str]:
    """Ansible's state and temporary files in ``home``; machine-readable
    output; the virtual environment's tools first on the PATH."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "tmp"),
        "ANSIBLE_CALLBACK_PLUGINS": str(Path(__file__).parent / "ansible_callbacks"),
        "ANSIBLE_CALLBACKS_ENABLED": "record_results",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        # Each task's module is piped to the local Python instead of being
        # written to a temporary file first: the same module runs, sooner.
        "ANSIBLE_PIPELINING": "1",
        # The host's facts are gathered by the first play of the session
        # and read from the cache (see facts_gathered_once) by the others.
        "ANSIBLE_GATHERING": "smart",
        "ANSIBLE_CACHE_PLUGIN": "jsonfile",
    }


@dataclass
class Result:
    task: str
    status: str
    msg: str


@dataclass
class Play:
    returncode: int
    results: list[Result]
    text: str

    @property
    def changed(self) -> int:
        return sum(result.status == "changed" for result in self.results)

    def task(self, name: str) -> Result:
        """The result of the last task run with this name."""
        found = [result for result in self.results if result.task == name]
        assert found, f"task {name!r} did not run:\n{self.text[-3000:]}"
        return found[-1]

    def changed_tasks(self) -> list[str]:
        return [result.task for result in self.results if result.status == "changed"]

    def failure(self) -> str:
        """Every failure message of the play, one per line."""
        return "\n".join(
            result.msg for result in self.results if result.status == "failed"
        )


class Site:
    """A scratch root, an inventory of localhost and the play's variables."""

    def __init__(self, folder: Path, source: Path) -> None:
        self.folder = folder
        self.root = folder / "root"
        self.home = folder / "ansible-home"
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        self.inventory = folder / "inventory.ini"
        self.inventory.write_text(
            "[archive]\n"
            f"localhost ansible_connection=local "
            f"ansible_python_interpreter={sys.executable}\n"
        )
        self.variables: dict[str, Any] = {
            "appliance_root": str(self.root),
            "appliance_source": str(source),
            "appliance_python": sys.executable,
            "appliance_user": getpass.getuser(),
            "appliance_group": grp.getgrgid(os.getgid()).gr_name,
            "appliance_ae_title": "SCRATCH_PACS",
            "appliance_port": 11112,
            "appliance_mounts": ["/srv/pacs"],
            "appliance_online_path": "/srv/pacs/online",
            "appliance_nearline_path": "/srv/pacs/nearline",
            "appliance_peers": [
                {"ae_title": "READING1", "host": "127.0.0.1", "port": 11113}
            ],
            "appliance_mirror_kind": "sftp",
            "appliance_mirror_host": "mirror.example.invalid",
            "appliance_mirror_port": 2222,
            "appliance_mirror_user": "pacs-mirror",
            "appliance_mirror_private_key": made_up_private_key(folder),
            "appliance_mirror_known_hosts": MIRROR_HOST_KEY,
            "appliance_settings": {"replication": {"timetable": "off"}},
            "appliance_rules": [
                {
                    "name": "copy-to-nearline",
                    "action": "copy",
                    "to": "nearline",
                    "min_days_since_received": 1,
                }
            ],
        }

    def play(self, *options: str, **changes: Any) -> Play:
        variables = self.folder / "variables.json"
        variables.write_text(json.dumps({**self.variables, **changes}))
        recorded = self.folder / "results.jsonl"
        recorded.unlink(missing_ok=True)
        completed = subprocess.run(
            [
                tool("ansible-playbook"),
                "--inventory",
                str(self.inventory),
                "--extra-vars",
                f"@{variables}",
                *options,
                str(PLAYBOOK),
            ],
            capture_output=True,
            text=True,
            env={**environment(self.home), "PACS_ANSIBLE_RESULTS": str(recorded)},
            timeout=600,
            check=False,
        )
        text = completed.stdout + completed.stderr
        if not recorded.exists():
            pytest.fail(f"ansible recorded no result:\n{text}")
        results = []
        for line in recorded.read_text().splitlines():
            entry = json.loads(line)
            messages = [entry["msg"], *entry["failed_items"]]
            message = "\n".join(part for part in messages if part)
            # "appliance : Write the configuration" -> "Write the configuration"
            task = entry["task"].split(" : ", 1)[-1]
            results.append(Result(task, entry["status"], message))
        return Play(completed.returncode, results, text)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def snapshot(folder: Path) -> Path:
    """A copy of what the role installs from the checkout, so that edits
    made to the checkout while the tests run do not count as new code."""
    for entry in ROLE_ENTRIES:
        original = REPOSITORY / entry
        if original.is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(original, folder / entry, ignore=ignore)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(original, folder / entry)
    return folder


def made_up_private_key(folder: Path) -> str:
    key = folder / "mirror-key"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            timeout=30,
        )
    return key.read_text()


@pytest.fixture(scope="module", autouse=True)
def facts_gathered_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """One fact cache for the module's plays: all run on the same host, and
    gathering its facts takes seconds per play."""
    cache = tmp_path_factory.mktemp("ansible-facts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANSIBLE_CACHE_PLUGIN_CONNECTION", str(cache))
        yield
