"""``appliance web``: make the password and token hashes for web accounts."""

from __future__ import annotations

import sys

import click

from appliance.cli_shared import Loader
from appliance.web.accounts import hash_password, new_token


def register(main: click.Group, load: Loader) -> None:
    """Add the ``web`` commands to ``main``."""

    @main.group()
    def web() -> None:
        """Accounts of the HTTP server (DICOMweb): password and token hashes."""

    @web.command(name="hash-password")
    def hash_password_command() -> None:
        """Ask for a password and print the password_hash line to paste into
        a [[web.accounts]] table (from a pipe: the first line of stdin)."""
        if sys.stdin.isatty():
            password = click.prompt(
                "Password", hide_input=True, confirmation_prompt=True
            )
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            click.echo("an empty password is not accepted", err=True)
            sys.exit(1)
        click.echo(f'password_hash = "{hash_password(password)}"')

    @web.command(name="new-token")
    def new_token_command() -> None:
        """Make a bearer token: give the token to the client, paste the
        token_hash line into its [[web.accounts]] table."""
        token, digest = new_token()
        click.echo(f"token (give it to the client, it is shown once): {token}")
        click.echo(f'token_hash = "{digest}"')
