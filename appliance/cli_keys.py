"""Command line for the master keys: ``appliance keys init | export |
import | rotate``."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any

import click

from appliance.cli_shared import Loader, config_option, data_dir_option
from appliance.config import Config
from appliance.errors import ApplianceError, KeyStoreError

# The largest escrow file read: tens of thousands of keys.
_ESCROW_MOST = 4 << 20


def register(main: click.Group, load: Loader) -> None:
    """Add the ``keys`` commands to ``main``."""

    @main.group()
    def keys() -> None:
        """The master keys that packs are encrypted under: export for the
        escrow, import on a new appliance, rotate."""

    @keys.command()
    @config_option
    @data_dir_option
    def init(config_file: Path | None, data_dir: str | None) -> None:
        """Make the master key (if there is none) and say how to escrow it."""
        from appliance.storage.keys import KeyStore, key_store_path

        config = load(config_file, {"storage.data_dir": data_dir})
        path = key_store_path(config.data_dir)
        existed = path.exists()
        try:
            # It says so itself, at more length than the log line.
            store = KeyStore.create_if_missing(path, announce=False)
        except ApplianceError as exc:
            click.echo(f"cannot make the key store: {exc}", err=True)
            sys.exit(1)
        state = "already there" if existed else "made"
        click.echo(
            f"master key {store.current.key_id} {state} in {path} (mode 0600).\n"
            "Every pack on the volumes and on the mirror is encrypted under it:\n"
            "without a copy of it, they cannot be read after a disaster.\n"
            "Now: appliance keys export > escrow.txt, print it or write it to\n"
            "removable media, store it away from the appliance and its volumes\n"
            "(a safe, the key escrow of your IT security office), then delete\n"
            "escrow.txt. Export again after every appliance keys rotate."
        )

    @keys.command(name="export")
    @config_option
    @data_dir_option
    def export_keys(config_file: Path | None, data_dir: str | None) -> None:
        """Print every master key in escrow form (keep it offline, safe)."""
        store = _key_store(load(config_file, {"storage.data_dir": data_dir}))
        _write_escrow(store.export_escrow())

    @keys.command(name="import")
    @config_option
    @data_dir_option
    @click.argument("escrow_file", type=click.Path(path_type=Path, dir_okay=False))
    def import_keys(
        config_file: Path | None, data_dir: str | None, escrow_file: Path
    ) -> None:
        """Add the master keys of an escrow file (disaster recovery)."""
        from appliance.storage.keys import (
            import_escrow,
            key_store_path,
            parse_escrow,
        )

        config = load(config_file, {"storage.data_dir": data_dir})
        try:
            text = _read_escrow(escrow_file)
            store = import_escrow(key_store_path(config.data_dir), text)
        except UnicodeDecodeError:
            click.echo(f"cannot import {escrow_file}: not an escrow text", err=True)
            sys.exit(1)
        except OSError as exc:
            click.echo(f"cannot import {escrow_file}: {exc.strerror}", err=True)
            sys.exit(1)
        except ApplianceError as exc:
            click.echo(f"cannot import {escrow_file}: {exc}", err=True)
            sys.exit(1)
        click.echo(f"{len(store.keys)} master key(s); current {store.current_id}")
        escrowed = {key.key_id for key in parse_escrow(text)[0]}
        if store.current_id not in escrowed:
            # Started before the import (it made a key), or another escrow
            # came first: new packs would go under a key no escrow holds.
            click.echo(
                f"the current key stays {store.current_id}, which {escrow_file} "
                "does not hold: new packs and catalog snapshots are encrypted "
                "under it. Export the keys again (appliance keys export) and "
                f"keep that text in the escrow in place of {escrow_file}.",
                err=True,
            )

    @keys.command()
    @config_option
    @data_dir_option
    def rotate(config_file: Path | None, data_dir: str | None) -> None:
        """Make a new current master key; older ones still read old packs."""
        store = _key_store(load(config_file, {"storage.data_dir": data_dir}))
        try:
            new = store.rotate()
        except ApplianceError as exc:
            click.echo(f"cannot rotate the master key: {exc}", err=True)
            sys.exit(1)
        click.echo(f"new current master key {new.key_id}: export it to the escrow")


def _read_escrow(path: Path) -> str:
    """The text of an escrow file, read up to a bound: a device (/dev/zero)
    or a large file given by mistake must not fill the memory."""
    with open(path, "rb") as handle:
        data = handle.read(_ESCROW_MOST + 1)
    if len(data) > _ESCROW_MOST:
        raise KeyStoreError(
            f"not an escrow text: larger than {_ESCROW_MOST >> 20} MiB (an "
            "escrow text holds about 100 bytes per master key)"
        )
    return data.decode("utf-8")


def _write_escrow(text: str) -> None:
    """Print the escrow text; a failed write (a full disk, standard output
    closed) ends the command with one line and exit status 1, since an
    escrow copy cut short could not rebuild the archive."""
    out = sys.stdout
    try:
        if out is None:
            raise OSError(errno.EBADF, "standard output is closed")
        _keep_private(out.fileno())
        out.write(text)
        out.flush()
    except OSError as exc:
        if out is not None:
            # What stays buffered would fail again, with a traceback, at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
        reason = exc.strerror or str(exc)
        click.echo(
            f"cannot write the escrow text: {reason}; what was written is "
            "incomplete, do not keep it as the escrow copy",
            err=True,
        )
        sys.exit(1)


def _keep_private(fd: int) -> None:
    """``keys export > escrow.txt`` makes a file other users may read (the
    usual umask 022): the output file is made owner-only before any key
    is written to it, and the operator is told."""
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or not found.st_mode & 0o077:
        return
    try:
        os.fchmod(fd, 0o600)
    except OSError as exc:
        raise OSError(
            exc.errno, f"the output file is open to other users: {exc.strerror}"
        ) from exc
    click.echo(
        f"the output file was open to other users (mode "
        f"{stat.S_IMODE(found.st_mode):04o}): made 0600",
        err=True,
    )


def _key_store(config: Config) -> Any:
    from appliance.storage.keys import KeyStore, key_store_path

    path = key_store_path(config.data_dir)
    if not path.exists():
        click.echo(
            f"no key store at {path}: the appliance makes one when it first "
            "starts (or run appliance keys init); after a disaster, import "
            "the escrow copy with appliance keys import",
            err=True,
        )
        sys.exit(1)
    try:
        return KeyStore.load(path)
    except ApplianceError as exc:
        click.echo(f"cannot open the key store: {exc}", err=True)
        sys.exit(1)
