"""Configuration files an administrator may get wrong in ways TOML itself
does not catch: bytes that are not UTF-8, a path in the home folder of a
user this host does not know. Each is one line naming the file or the key,
from ``appliance config check`` and from every other command, never a
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def appliance(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("command", [("config", "check"), ("status", "--config")])
def test_a_file_that_is_not_utf8_is_named(tmp_path: Path, command) -> None:
    config = tmp_path / "appliance.toml"
    # Saved in Latin-1 by an editor: the comment's "é" is one byte, 0xE9.
    config.write_bytes("# réseau\n[node]\nport = 11112\n".encode("latin-1"))

    done = appliance(*command, str(config), cwd=tmp_path)

    assert done.returncode in (1, 2)
    assert "Traceback" not in done.stderr
    assert f"{config} is not UTF-8 text" in done.stderr
    assert "line 1" in done.stderr


def test_an_unknown_users_home_folder_is_named_with_its_key(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(
        '[storage]\ndata_dir = "~no-such-user-here/data"\n'
        '[volumes]\npath = "~no-such-user-here/volumes"\n'
    )

    checked = appliance("config", "check", str(config), cwd=tmp_path)
    status = appliance("status", "--config", str(config), cwd=tmp_path)

    assert checked.returncode == 1
    assert (
        "storage.data_dir: ~no-such-user-here is not a user of this host"
        in checked.stderr
    )
    assert (
        "volumes.path: ~no-such-user-here is not a user of this host" in checked.stderr
    )
    assert status.returncode == 2
    assert "Traceback" not in status.stderr
    assert "storage.data_dir" in status.stderr


def test_an_unknown_users_home_folder_on_the_command_line(tmp_path: Path) -> None:
    done = appliance("status", "--data-dir", "~no-such-user-here/x", cwd=tmp_path)

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert (
        "storage.data_dir: ~no-such-user-here is not a user of this host" in done.stderr
    )


def test_a_home_folder_that_exists_is_expanded(tmp_path: Path, monkeypatch) -> None:
    from appliance import config

    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = config.load(None, {"storage.data_dir": "~/archive"})

    assert loaded.data_dir == tmp_path / "archive"


def test_config_check_names_the_sftp_mirrors_missing_files(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(
        '[mirror]\nkind = "sftp"\nhost = "127.0.0.1"\nuser = "pacs"\n'
        f'key_file = "{tmp_path / "no-key"}"\n'
        f'known_hosts = "{tmp_path}"\n'
    )

    checked = appliance("config", "check", str(config), cwd=tmp_path)
    before_install = appliance(
        "config", "check", "--no-mirror-files", str(config), cwd=tmp_path
    )

    assert checked.returncode == 1
    assert f"mirror.key_file: {tmp_path / 'no-key'} does not exist" in checked.stderr
    assert f"mirror.known_hosts: {tmp_path} is not a file" in checked.stderr
    assert "2 error(s)" in checked.stderr
    # The ansible role checks the file before it installs the key.
    assert before_install.returncode == 0, before_install.stderr


def test_a_directory_mirrors_folder_must_exist(tmp_path: Path, monkeypatch) -> None:
    from appliance import config

    monkeypatch.chdir(tmp_path)
    missing = config.load(None, {"mirror.path": "mirror-disk"})
    a_file = config.load(None, {"mirror.path": "appliance.toml"})
    (tmp_path / "appliance.toml").write_text("")

    assert config.mirror_file_problems(missing) == [
        (
            "mirror.path",
            f"{tmp_path / 'mirror-disk'} does not exist: create it, or mount the "
            "mirror disk there",
        )
    ]
    assert config.mirror_file_problems(a_file) == [
        ("mirror.path", f"{tmp_path / 'appliance.toml'} is not a folder")
    ]
    (tmp_path / "mirror-disk").mkdir()
    assert config.mirror_file_problems(missing) == []


def test_mirror_files_not_in_use_are_not_checked(tmp_path: Path, monkeypatch) -> None:
    from appliance import config

    monkeypatch.chdir(tmp_path)
    # The default mirror, DATA_DIR/mirror, is made on first use.
    default = config.load()
    paused = config.load(
        None, {"replication.enabled": False, "mirror.path": "mirror-disk"}
    )
    sftp_only = config.load(None, {"mirror.key_file": "no-key"})

    assert not (tmp_path / "appliance-data" / "mirror").exists()
    assert config.mirror_file_problems(default) == []
    assert config.mirror_file_problems(paused) == []
    assert config.mirror_file_problems(sftp_only) == []
