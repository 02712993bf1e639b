"""The ansible role in ansible/ run into one scratch root: a play that
installs a working appliance and changes nothing when run again, then
changes of code and configuration played over it.

The plays and their scratch root are in tests/ansible_site.py. The lint and
the plays that stop before the host changes are in test_ansible_inputs.py,
so that the two files can run side by side.
"""

from __future__ import annotations

import getpass
import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.ansible_site import (
    MIRROR_HOST_KEY,
    REPOSITORY,
    Play,
    Site,
    facts_gathered_once,  # noqa: F401  (autouse)
    snapshot,
)


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

    # Under the scratch root the mirror's key and known_hosts file are not
    # where the file names them (/etc/pacs-appliance/...): left unchecked.
    checked = subprocess.run(
        [str(program), "config", "check", "--no-mirror-files", str(config)],
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
