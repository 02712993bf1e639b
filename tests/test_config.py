"""Configuration: defaults, every error reported with its key, the example."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.hsm.policy import AnyOf, Between, Rule

REPO = Path(__file__).resolve().parents[1]


def test_defaults_run_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = config.load()

    assert loaded.get("node.ae_title") == "APPLIANCE"
    assert loaded.get("node.port") == 11112
    assert loaded.get("node.bind_address") == "127.0.0.1"
    assert loaded.online_path == tmp_path / "appliance-data" / "online"
    assert loaded.catalog_path == tmp_path / "appliance-data" / "catalog"
    assert loaded.nearline_path == tmp_path / "appliance-data" / "nearline"
    assert loaded.workers >= 1


def test_migration_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = config.load()

    assert loaded.get("migration.enabled") is True
    assert loaded.get("migration.schedule") == "0 1 * * *"
    assert loaded.get("migration.min_copies") == 2
    assert loaded.get("migration.rate_mb_per_s") == 50.0
    assert loaded.get("online.capacity_bytes") == 0
    assert (
        loaded.get("online.high_watermark"),
        loaded.get("online.low_watermark"),
    ) == (
        85,
        75,
    )
    assert loaded.get("nearline.high_watermark") == 90
    assert [rule.name for rule in loaded.rules] == [
        "copy-to-nearline",
        "copy-to-offline",
        "release-online-unused",
    ]
    assert loaded.rules == config.default_rules()


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
    ("text", "key", "message"),
    [
        pytest.param(
            '[node]\nae_title = "   "\n',
            "node.ae_title",
            "must not be all spaces (got '   ')",
            id="ae-title-of-spaces",
        ),
        pytest.param(
            "[node]\nport = true\n",
            "node.port",
            "must be an integer from 1 to 65535 (got true)",
            id="boolean-as-toml",
        ),
        pytest.param(
            "[timeouts]\ndimse = true\n",
            "timeouts.dimse",
            "must be a number of seconds greater than 0 (got true)",
            id="boolean-as-seconds",
        ),
        pytest.param(
            '[[peers]]\nae_title = "WS1"\nhost = "h"\nport = false\n',
            "peers[0].port",
            "(got false)",
            id="peer-boolean-as-toml",
        ),
        pytest.param(
            "[access]\nstorage = [true]\n",
            "access.storage",
            "entry true ",
            id="boolean-in-a-list-as-toml",
        ),
    ],
)
def test_values_are_quoted_as_the_file_spells_them(tmp_path, text, key, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as raised:
        config.load(path)

    messages = dict(raised.value.problems)
    assert message in messages[key], messages


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


def test_configuration_doc_names_every_rule_key():
    for doc in ("configuration.md", "policies.md"):
        text = (REPO / "docs" / doc).read_text()
        for name in config.RULE_KEYS:
            assert f"`{name}`" in text, (doc, name)


def test_the_example_rules_are_the_defaults(tmp_path):
    path = tmp_path / "example.toml"
    path.write_text(config.example())
    assert config.load(path).rules == config.default_rules()


def load_text(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_rules_from_the_file_replace_the_defaults(tmp_path):
    loaded = load_text(
        tmp_path,
        """
[[rules]]
name = "ct-mr-to-tape"
action = "copy"
to = "offline"
min_study_age_days = 30
max_study_age_days = 3650
modalities = ["CT", "MR"]
exclude_calling_ae_titles = ["TEST_CT "]

[[rules]]
name = "mammo-off-nearline"
action = "move"
from = "nearline"
to = "offline"
min_days_since_access = 730
min_study_size_mb = 0.5
""",
    )
    assert loaded.rules == (
        Rule(
            "ct-mr-to-tape",
            "copy",
            None,
            "offline",
            (
                Between("study_age_days", 30, 3650),
                AnyOf("modalities", frozenset({"CT", "MR"})),
                AnyOf("calling_ae_titles", frozenset({"TEST_CT"}), exclude=True),
            ),
        ),
        Rule(
            "mammo-off-nearline",
            "move",
            "nearline",
            "offline",
            (
                Between("days_since_access", at_least=730),
                Between("study_size_mb", at_least=0.5),
            ),
        ),
    )


def test_an_empty_rule_list_turns_the_rules_off(tmp_path):
    assert load_text(tmp_path, "rules = []\n[migration]\nmin_copies = 3\n").rules == ()


def test_watermarks_may_be_fractions_of_a_percent(tmp_path):
    loaded = load_text(
        tmp_path, "[online]\nhigh_watermark = 92.5\nlow_watermark = 90\n"
    )
    assert loaded.get("online.high_watermark") == 92.5


RULE = '[[rules]]\nname = "r"\n'
COPY = RULE + 'action = "copy"\nto = "nearline"\n'
RELEASE = RULE + 'action = "release"\nfrom = "online"\n'


@pytest.mark.parametrize(
    ("text", "key", "said"),
    [
        ("[online]\nhigh_watermark = 120\n", "online.high_watermark", "1 to 100"),
        ("[online]\nhigh_watermark = 0.85\n", "online.high_watermark", "1 to 100"),
        ("[online]\nlow_watermark = 85\n", "online.low_watermark", "below"),
        (
            "[nearline]\nhigh_watermark = 70\n",
            "nearline.low_watermark",
            "must be below nearline.high_watermark (70)",
        ),
        ('[online]\nlow_watermark = "75%"\n', "online.low_watermark", "number"),
        ("[nearline]\ncapacity_bytes = -1\n", "nearline.capacity_bytes", "integer"),
        ("[offline]\ncapacity_bytes = 1\n", "offline", "unknown section"),
        ("[storage]\nnearline_path = 3\n", "storage.nearline_path", "string"),
        ('[migration]\nschedule = "0 1 * *"\n', "migration.schedule", "fields"),
        ('[migration]\nschedule = "0 25 * * *"\n', "migration.schedule", "25"),
        ('[migration]\nschedule = "@daily"\n', "migration.schedule", "crontab"),
        ("[migration]\nschedule = 1\n", "migration.schedule", "crontab"),
        ('[migration]\nschedule = "0 1 * * 0"\n', "migration.schedule", "name"),
        ("[migration]\nmin_copies = 0\n", "migration.min_copies", "1 to 9"),
        ("[migration]\nmin_copies = 2.0\n", "migration.min_copies", "integer"),
        ("[migration]\nrate_mb_per_s = -5\n", "migration.rate_mb_per_s", "number"),
        ('[migration]\nenabled = "yes"\n', "migration.enabled", "true or false"),
        ("[migration]\nwatermark_interval = 0\n", "migration.watermark_interval", ""),
        ("rules = 3\n", "rules", "array of tables"),
        ("rules = [1]\n", "rules[0]", "table"),
        ('[[rules]]\naction = "copy"\nto = "nearline"\n', "rules[0].name", "required"),
        ('[[rules]]\nname = "r"\nto = "nearline"\n', "rules[0].action", "required"),
        (COPY.replace('"r"', '"no spaces"'), "rules[0].name", "letters, digits"),
        (COPY.replace('"copy"', '"delete"'), "rules[0].action", "'copy', 'move'"),
        (RULE + 'action = "copy"\n', "rules[0].to", "required by action 'copy'"),
        (COPY + 'from = "online"\n', "rules[0].from", "not used by action 'copy'"),
        (
            COPY.replace('"nearline"', '"online"'),
            "rules[0].to",
            "'nearline', 'offline'",
        ),
        (RELEASE + 'to = "offline"\n', "rules[0].to", "not used"),
        (
            RELEASE.replace('"online"', '"offline"'),
            "rules[0].from",
            "'online', 'nearline'",
        ),
        (RULE + 'action = "move"\nto = "offline"\n', "rules[0].from", "required"),
        (
            RULE + 'action = "move"\nfrom = "nearline"\nto = "nearline"\n',
            "rules[0].to",
            "differ",
        ),
        (COPY + "min_study_age_days = -1\n", "rules[0].min_study_age_days", "0 to"),
        (
            COPY + 'min_study_age_days = "30"\n',
            "rules[0].min_study_age_days",
            "integer",
        ),
        (COPY + "max_days_since_access = 1.5\n", "rules[0].max_days_since_access", ""),
        (
            COPY + "min_days_since_received = true\n",
            "rules[0].min_days_since_received",
            "",
        ),
        (COPY + "min_study_size_mb = true\n", "rules[0].min_study_size_mb", "number"),
        (
            COPY + "min_study_age_days = 30\nmax_study_age_days = 7\n",
            "rules[0].max_study_age_days",
            "at least min_study_age_days (30)",
        ),
        (COPY + "modalities = []\n", "rules[0].modalities", "non-empty"),
        (COPY + 'modalities = ["ct"]\n', "rules[0].modalities", "capitals"),
        (COPY + 'modalities = "CT"\n', "rules[0].modalities", "list"),
        (COPY + 'exclude_modalities = ["C T"]\n', "rules[0].exclude_modalities", ""),
        (COPY + "calling_ae_titles = []\n", "rules[0].calling_ae_titles", "at least"),
        (
            COPY + 'exclude_calling_ae_titles = ["A_TITLE_FAR_TOO_LONG"]\n',
            "rules[0].exclude_calling_ae_titles",
            "1 to 16",
        ),
        (
            COPY + 'calling_ae_titles = ["CT1"]\nexclude_calling_ae_titles = ["CT1"]\n',
            "rules[0].exclude_calling_ae_titles",
            "can match no study",
        ),
        (
            COPY + 'modalities = ["CT"]\nexclude_modalities = ["CT", "MR"]\n',
            "rules[0].exclude_modalities",
            "excludes every value of modalities",
        ),
        (COPY + "study_age_days = 30\n", "rules[0].study_age_days", "unknown key"),
        (COPY + COPY.replace("nearline", "offline"), "rules[1].name", "rules[0]"),
    ],
)
def test_migration_problems_name_their_key(tmp_path, text, key, said):
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    messages = dict(raised.value.problems)
    assert key in messages, raised.value.problems
    assert said in messages[key]


def test_every_rule_problem_is_reported_at_once(tmp_path):
    text = (
        '[[rules]]\nname = "a"\naction = "copy"\n'
        '[[rules]]\nname = "b"\naction = "release"\nfrom = "tape"\n'
        '[[rules]]\nname = "c"\naction = "copy"\nto = "offline"\ncolour = 1\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    keys = {key for key, _message in raised.value.problems}
    assert keys == {"rules[0].to", "rules[1].from", "rules[2].colour"}


@pytest.mark.parametrize("doc", ["policies.md", "configuration.md"])
def test_the_rule_examples_in_the_docs_load(tmp_path, doc):
    text = (REPO / "docs" / doc).read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```toml\n")[1:]]
    examples = [block for block in blocks if "[[rules]]" in block]
    assert examples
    loaded = [load_text(tmp_path, block).rules for block in examples]
    assert all(loaded)
    if doc == "policies.md":
        assert config.default_rules() in loaded, "the defaults shown are current"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "key", ["migration.watermark_interval", "timeouts.dimse", "volumes.load_timeout"]
)
def test_seconds_must_be_finite(tmp_path, key: str, value: str) -> None:
    section, name = key.split(".")
    path = tmp_path / "appliance.toml"
    path.write_text(f"[{section}]\n{name} = {value}\n")

    with pytest.raises(ConfigError) as raised:
        config.load(path)

    assert key in str(raised.value)


def test_watermark_checks_are_at_least_a_second_apart(tmp_path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text("[migration]\nwatermark_interval = 1e-9\n")

    with pytest.raises(ConfigError, match=r"migration\.watermark_interval"):
        config.load(path)


def test_the_hl7_port_must_differ_from_the_dicom_port(tmp_path: Path) -> None:
    path = tmp_path / "clash.toml"
    path.write_text("[node]\nport = 2575\n[hl7]\nenabled = true\n")

    with pytest.raises(ConfigError) as raised:
        config.load(path)

    assert ("hl7.port", "must differ from node.port (2575)") in raised.value.problems
