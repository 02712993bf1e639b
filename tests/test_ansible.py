"""The ansible role in ansible/: lint-clean for production, and a play that
installs a working appliance into a scratch root and changes nothing when
run again.

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
import stat
import subprocess
import sys
import tomllib
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


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Site, Play, Play]:
    """The play run twice into one scratch root."""
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl missing; apt-get install systemd")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen missing; apt-get install openssh-client")
    folder = tmp_path_factory.mktemp("ansible")
    site = Site(folder, snapshot(folder / "checkout"))
    first = site.play()
    second = site.play()
    return site, first, second


def test_role_passes_ansible_lint_production_profile() -> None:
    completed = subprocess.run(
        [
            tool("ansible-lint"),
            "--offline",
            "--profile",
            "production",
            "--nocolor",
            str(PLAYBOOK.parent),
        ],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=environment(REPOSITORY / ".pytest_cache" / "ansible-lint"),
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Profile 'production' was required, and it passed" in (
        completed.stdout + completed.stderr
    )


def test_first_run_installs_second_run_changes_nothing(
    installed: tuple[Site, Play, Play],
) -> None:
    _, first, second = installed

    assert first.returncode == 0, first.failure() or first.text
    assert first.changed > 0
    assert second.returncode == 0, second.failure() or second.text
    assert second.changed == 0, f"changed on the second run: {second.changed_tasks()}"


def test_installed_appliance_runs_and_accepts_its_configuration(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed
    program = site.path("/opt/pacs-appliance/.venv/bin/appliance")
    config = site.path("/etc/pacs-appliance/appliance.toml")
    # As on the host: not the checkout a test run may have on its PYTHONPATH.
    host = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    checked = subprocess.run(
        [str(program), "config", "check", str(config)],
        capture_output=True,
        text=True,
        cwd=site.folder,
        env=host,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    rendered = tomllib.loads(config.read_text())
    assert rendered["node"]["ae_title"] == "SCRATCH_PACS"
    assert rendered["storage"]["online_path"] == "/srv/pacs/online"
    assert rendered["mirror"]["key_file"] == "/etc/pacs-appliance/mirror_key"
    assert rendered["peers"] == [
        {"ae_title": "READING1", "host": "127.0.0.1", "port": 11113}
    ]
    assert [rule["name"] for rule in rendered["rules"]] == ["copy-to-nearline"]
    # The installed code is a copy: the checkout is not on its path.
    where = subprocess.run(
        [
            str(program.with_name("python")),
            "-c",
            "import appliance; print(appliance.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=site.folder,
        env=host,
        timeout=60,
        check=True,
    )
    assert where.stdout.startswith(str(site.root))
    # The hardware profiles installed beside the virtual environment.
    profiles = subprocess.run(
        [str(program), "hardware", "profiles"],
        capture_output=True,
        text=True,
        cwd=site.folder,
        env=host,
        timeout=60,
        check=True,
    )
    installed_profiles = str(
        site.path("/opt/pacs-appliance/hardware/small-clinic.toml")
    )
    assert installed_profiles in profiles.stdout


def test_files_have_the_owners_and_modes_the_service_expects(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed

    def mode(absolute: str) -> int:
        return stat.S_IMODE(site.path(absolute).stat().st_mode)

    assert mode("/etc/pacs-appliance/appliance.toml") == 0o640
    assert mode("/etc/pacs-appliance/mirror_key") == 0o640
    assert mode("/etc/pacs-appliance/mirror_known_hosts") == 0o644
    assert mode("/var/lib/pacs-appliance") == 0o750
    assert mode("/srv/pacs/online") == 0o750
    assert mode("/srv/pacs/nearline") == 0o750
    key = site.path("/etc/pacs-appliance/mirror_key").read_text()
    assert key == site.variables["appliance_mirror_private_key"].strip() + "\n"
    pinned = site.path("/etc/pacs-appliance/mirror_known_hosts").read_text()
    assert pinned == MIRROR_HOST_KEY + "\n"
    for folder in ("/var/lib/pacs-appliance", "/srv/pacs/online"):
        assert site.path(folder).stat().st_uid == os.getuid()


def test_units_are_installed_enabled_and_given_the_site_paths(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed
    units = site.path("/etc/systemd/system")

    for unit in (
        "pacs-appliance.service",
        "pacs-appliance-verify.service",
        "pacs-appliance-verify.timer",
    ):
        shipped = (REPOSITORY / "systemd" / unit).read_bytes()
        assert (units / unit).read_bytes() == shipped
    wants = units / "multi-user.target.wants" / "pacs-appliance.service"
    assert os.readlink(wants) == "/etc/systemd/system/pacs-appliance.service"
    assert (units / "timers.target.wants" / "pacs-appliance-verify.timer").is_symlink()
    for service in ("pacs-appliance.service", "pacs-appliance-verify.service"):
        drop_in = (units / f"{service}.d" / "site.conf").read_text().splitlines()
        assert f"User={getpass.getuser()}" in drop_in
        assert "ReadWritePaths=/srv/pacs/online" in drop_in
        assert "ReadWritePaths=/srv/pacs/nearline" in drop_in
        assert "RequiresMountsFor=/srv/pacs/nearline" in drop_in


def test_changed_code_is_installed_again_and_restarts_the_service(
    installed: tuple[Site, Play, Play], tmp_path: Path
) -> None:
    site, _, _ = installed
    source = snapshot(tmp_path / "checkout")
    notes = source / "docs" / "operations.md"
    notes.write_text(notes.read_text() + "\nA line this site added.\n")

    changed = site.play(appliance_source=str(source))
    installed_notes = site.path("/opt/pacs-appliance/docs/operations.md").read_text()
    again = site.play()  # the fixture's snapshot, as installed before

    assert changed.returncode == 0, changed.failure() or changed.text
    install = changed.task("Install the appliance into the virtual environment")
    assert install.status == "changed"
    # Notified; it runs only on a real host (appliance_root "/").
    assert changed.task("Restart pacs-appliance").status == "skipped"
    assert installed_notes.endswith("A line this site added.\n")
    assert again.returncode == 0 and again.changed > 0
    assert (
        "A line this site added."
        not in site.path("/opt/pacs-appliance/docs/operations.md").read_text()
    )


def test_changed_configuration_restarts_the_service(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed

    changed = site.play(appliance_ae_title="RENAMED_PACS")
    restored = site.play()

    assert changed.returncode == 0, changed.failure() or changed.text
    assert changed.task("Write the configuration").status == "changed"
    assert changed.task("Restart pacs-appliance").status == "skipped"
    assert changed.changed_tasks() == ["Write the configuration"]
    assert restored.returncode == 0 and restored.changed_tasks() == [
        "Write the configuration"
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"appliance_nearline_path": "srv/nearline"}, "must be an absolute path"),
        (
            {"appliance_online_path": "/srv/pacs/online/../../../etc"},
            'without ".."',
        ),
        (
            {"appliance_mounts": ["/"], "appliance_nearline_path": "/etc/pacs"},
            "is or lies in a system folder",
        ),
        (
            {"appliance_mounts": ["/"], "appliance_online_path": "/"},
            "is or lies in a system folder",
        ),
        (
            {"appliance_nearline_path": "/data/nearline"},
            "/data/nearline is not under any of appliance_mounts",
        ),
        ({"appliance_mirror_known_hosts": "not a host key"}, "known_hosts line"),
        (
            {
                "appliance_mirror_known_hosts": MIRROR_HOST_KEY.replace(
                    "mirror.", "other."
                )
            },
            "known_hosts line for [mirror.example.invalid]:2222",
        ),
        (
            {"appliance_mirror_private_key": "ssh-ed25519 AAAA public"},
            "is not a private key",
        ),
        ({"appliance_mirror_user": ""}, "appliance_mirror_user must be set"),
        (
            {"appliance_settings": {"node": {"port": 4242}}},
            "node.port (set appliance_port instead)",
        ),
        ({"appliance_settings": {"logging": "json"}}, "must be a table of keys"),
        ({"appliance_settings": {"peers": {"x": 1}}}, "must be a table of keys"),
        ({"appliance_volumes_kind": "floppy"}, "floppy"),
        ({"appliance_ae_title": "SEVENTEEN_LETTERS"}, "1 to 16"),
        ({"appliance_ae_title": "BACK\\SLASH"}, "without a backslash"),
        ({"appliance_port": 70000}, "appliance_port must be a TCP port"),
        (
            {"appliance_peers": [{"ae_title": "CT1", "host": "ct1.example"}]},
            "port",
        ),
        ({"appliance_root": "staging"}, "appliance_root"),
        ({"appliance_hardware_profile": "no-such-profile"}, "no hardware profile"),
    ],
    ids=[
        "relative",
        "dot-dot",
        "system-folder",
        "root-folder",
        "outside-mounts",
        "host-key",
        "host-key-of-another-host",
        "public-key",
        "sftp-user",
        "owned-key",
        "section-not-a-table",
        "peers-in-settings",
        "kind",
        "long-ae-title",
        "backslash-ae-title",
        "port-range",
        "peer-without-port",
        "relative-root",
        "hardware-profile",
    ],
)
def test_bad_inputs_stop_the_play_before_the_host_changes(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    site = Site(tmp_path, REPOSITORY)

    play = site.play(**changes)

    assert play.returncode != 0
    assert message in play.failure() + play.text, play.failure() or play.text
    assert not site.root.exists()


def test_a_configuration_the_appliance_refuses_is_never_put_in_place(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed
    config = site.path("/etc/pacs-appliance/appliance.toml")
    before = config.read_bytes()

    play = site.play(appliance_settings={"replication": {"batch_bytes": -5}})

    assert play.returncode != 0
    assert "batch_bytes" in play.failure()
    assert config.read_bytes() == before


def test_a_refused_configuration_stops_a_first_install_before_folders(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path, snapshot(tmp_path / "checkout"))

    play = site.play(appliance_settings={"replication": {"batch_bytes": -5}})

    assert play.returncode != 0
    assert "The appliance refuses the configuration" in play.failure()
    assert "replication.batch_bytes" in play.failure()
    assert site.path("/opt/pacs-appliance/.venv/bin/appliance").exists()
    for never in ("/etc/pacs-appliance", "/var/lib/pacs-appliance", "/srv/pacs"):
        assert not site.path(never).exists(), never


def test_values_cannot_add_keys_and_any_unicode_survives(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed
    sneaky = {"timeouts": {"connect = 10.0\n[[peers]]\nae_title": "SNEAKY"}}

    refused = site.play(appliance_settings=sneaky)
    accepted = site.play(appliance_mirror_remote_path='archive/\U0001f600 "x"\n')
    text = site.path("/etc/pacs-appliance/appliance.toml").read_text()
    restored = site.play()

    assert refused.returncode != 0
    assert "unknown key" in refused.failure()
    assert accepted.returncode == 0, accepted.failure() or accepted.text
    assert tomllib.loads(text)["mirror"]["remote_path"] == 'archive/\U0001f600 "x"\n'
    assert restored.returncode == 0


def test_a_failed_run_still_restarts_onto_new_code(
    installed: tuple[Site, Play, Play], tmp_path: Path
) -> None:
    site, _, _ = installed
    source = snapshot(tmp_path / "checkout")
    notes = source / "docs" / "operations.md"
    notes.write_text(notes.read_text() + "\nAnother line.\n")

    failed = site.play(
        appliance_source=str(source),
        appliance_settings={"replication": {"batch_bytes": -5}},
    )
    site.play()  # back to the fixture's code and settings

    assert failed.returncode != 0
    assert failed.task("Install the appliance into the virtual environment").status == (
        "changed"
    )
    # The handler ran although the play failed (it skips in staging only).
    assert failed.task("Restart pacs-appliance").status == "skipped"


def test_check_mode_previews_a_change_without_making_it(
    installed: tuple[Site, Play, Play],
) -> None:
    site, _, _ = installed
    config = site.path("/etc/pacs-appliance/appliance.toml")
    before = config.read_bytes()

    preview = site.play("--check", "--diff", appliance_ae_title="PREVIEW_PACS")

    assert preview.returncode == 0, preview.failure() or preview.text
    assert preview.changed_tasks() == ["Write the configuration"]
    assert config.read_bytes() == before


def test_tape_volumes_load_the_tape_drivers_at_boot(
    installed: tuple[Site, Play, Play],
) -> None:
    # The installed site has no modules-load folder yet (its volumes are not
    # tape), so the play creates it as on a fresh host.
    site, _, _ = installed
    loads = site.path("/etc/modules-load.d/pacs-appliance.conf")
    assert not loads.parent.exists()

    play = site.play(
        appliance_volumes_kind="tape",
        appliance_settings={"volumes": {"device": "/dev/nst0"}},
    )
    loaded = loads.read_text() if loads.exists() else ""
    # Back to the fixture's volumes; the role leaves the drivers file, which
    # goes by hand so that the site is as the other tests expect it.
    restored = site.play()
    shutil.rmtree(loads.parent, ignore_errors=True)

    assert play.returncode == 0, play.failure() or play.text
    assert restored.returncode == 0, restored.failure() or restored.text
    assert [line for line in loaded.splitlines() if not line.startswith("#")] == [
        "st",
        "sg",
    ]
