"""The README's command table: each row names commands that exist, and
alternatives (``a \\| b``) cannot be misread as one command's arguments."""

from __future__ import annotations

import re
from pathlib import Path

import click

from appliance.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `(appliance [^`]*)` \|", re.MULTILINE)


def _rows() -> list[str]:
    rows = ROW.findall(README.read_text())
    assert rows, "no command table in README.md"
    return rows


def _command_words(text: str) -> list[str]:
    """The subcommand names at the start of ``text``, before any option,
    argument or placeholder."""
    words = []
    for word in text.split():
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        words.append(word)
    return words


def _resolves(words: list[str]) -> bool:
    command: click.Command | None = main
    context = click.Context(main)
    for word in words:
        if not isinstance(command, click.Group):
            return False
        command = command.get_command(context, word)
        if command is None:
            return False
    return True


def test_an_alternative_follows_only_a_bare_name_or_flag() -> None:
    # "drill [--studies N] \\| report" reads as "drill report": only a
    # subcommand name or a flag may stand right before an alternative.
    for row in _rows():
        for part in row.split(" \\| ")[:-1]:
            last = part.split()[-1]
            assert re.fullmatch(r"(--)?[a-z][a-z-]*", last), row


def test_every_row_names_commands_that_exist() -> None:
    for row in _rows():
        first, *others = row.split(" \\| ")
        path = _command_words(first)[1:]
        assert _resolves(path), row
        for other in others:
            if other.startswith("--"):
                continue
            # An alternative subcommand stands for the row's last one.
            assert _resolves(path[:-1] + _command_words(other)), (row, other)
