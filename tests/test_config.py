"""Configuration: defaults, every error reported with its key, the example."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_run_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = config.load()

    assert loaded.get("node.ae_title") == "APPLIANCE"
    assert loaded.get("node.port") == 11112
    assert loaded.get("node.bind_address") == "127.0.0.1"
    assert loaded.online_path == tmp_path / "appliance-data" / "online"
    assert loaded.catalog_path == tmp_path / "appliance-data" / "catalog"
    assert loaded.workers >= 1


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        "[node]\n"
        'ae_title = "THIS TITLE IS FAR TOO LONG"\n'
        "port = 70000\n"
        "colour = 3\n"
        "[timeouts]\n"
        "dimse = -1\n"
        "[storage]\n"
        'duplicate_policy = "overwrite"\n'
        "[access]\n"
        'storage = ["NOBODY"]\n'
        "[[peers]]\n"
        'ae_title = "WS1"\n'
        "port = 104\n"
        "[mystery]\n"
    )
    with pytest.raises(ConfigError) as raised:
        config.load(path)

    keys = {key for key, _message in raised.value.problems}
    assert keys == {
        "node.ae_title",
        "node.port",
        "node.colour",
        "timeouts.dimse",
        "storage.duplicate_policy",
        "access.storage",
        "peers[0].host",
        "mystery",
    }
    messages = dict(raised.value.problems)
    assert "1 to 16 characters" in messages["node.ae_title"]
    assert "from 1 to 65535" in messages["node.port"]
    assert "'refuse', 'keep_first', 'replace'" in messages["storage.duplicate_policy"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node\n", "(file)"),
        ('[node]\nbind_address = "localhost"\n', "node.bind_address"),
        ("[node]\nworkers = true\n", "node.workers"),
        (
            '[[peers]]\nae_title = "A"\nhost = "h"\nport = 1\n'
            '[[peers]]\nae_title = "A"\nhost = "h"\nport = 2\n',
            "peers",
        ),
        (
            '[node]\nae_title = "WS"\n'
            '[[peers]]\nae_title = "WS"\nhost = "h"\nport = 1\n',
            "node.ae_title",
        ),
    ],
)
def test_single_problems(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    assert key in {k for k, _m in raised.value.problems}


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_example_lists_every_key_and_loads(tmp_path):
    text = config.example()
    document = tomllib.loads(text)
    for key in config.KEYS:
        assert document[key.section][key.name] == key.default
        assert f"{key.name} = " in text
    path = tmp_path / "example.toml"
    path.write_text(text)
    config.load(path)


def test_shipped_example_is_current():
    shipped = (REPO / "examples" / "appliance.toml").read_text()
    assert shipped == config.example(), (
        "run: appliance config example > examples/appliance.toml"
    )


def test_configuration_doc_names_every_key():
    doc = (REPO / "docs" / "configuration.md").read_text()
    for key in config.KEYS:
        assert f"`{key.path}`" in doc, key.path


def test_config_check_command(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 0\nmax_associations = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "node.port: must be an integer from 1 to 65535 (got 0)" in result.stderr
    assert "node.max_associations" in result.stderr
    assert "2 error(s)" in result.stderr

    good = tmp_path / "good.toml"
    good.write_text("[node]\nport = 11113\n")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
