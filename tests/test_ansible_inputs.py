"""The ansible role in ansible/: lint-clean for production, and inputs that
stop the play before the host changes.

Apart from test_ansible.py, whose tests share one installed scratch root,
so that the two files can run side by side.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.ansible_site import (
    MIRROR_HOST_KEY,
    PLAYBOOK,
    REPOSITORY,
    Site,
    environment,
    facts_gathered_once,  # noqa: F401  (autouse)
    snapshot,
    tool,
)


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
