"""``appliance replication verify`` looks at the mirror's identity before it
reads anything: a wrong ``[mirror]`` setting (a mistyped path, an
unmounted folder, another archive's mirror) is refused and changes
nothing, a new, empty mirror is taken only when asked for
(``--new-mirror``), and a pack lost on this archive's own mirror is still
queued again.

The archive is built in this process (stored and replicated to a
directory mirror); the command runs as the administrator runs it. A new
mirror is also an SFTP one, served by OpenSSH's sshd on loopback, through
both SFTP clients.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner

from appliance import config as configuration
from appliance.catalog import replication
from appliance.catalog.store import Catalog
from appliance.cli import main
from appliance.hsm.tiers import Tiers
from appliance.replication import audit
from appliance.replication.process import open_mirror
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports.directory import DirectoryTransport
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.online import OnlineTier
from tests.restore_site import Origin, appliance, write_config
from tests.sshd import Sshd
from tests.test_replicator import mirror_of_another_archive
from tests.test_transports import sftp_settings


@dataclass
class Archive:
    """An archive that sent two packs (two instances each) to ``mirror``."""

    folder: Path
    mirror: Path
    catalog_path: Path
    data_dir: Path

    def verify(self, mirror: Path, *options: str) -> subprocess.CompletedProcess[str]:
        """``appliance replication verify`` with ``[mirror]`` set to ``mirror``."""
        return self.verify_at({"kind": "directory", "path": str(mirror)}, *options)

    def verify_at(
        self, settings: dict[str, object], *options: str
    ) -> subprocess.CompletedProcess[str]:
        """``appliance replication verify`` with ``[mirror]`` set so."""
        config = self.config_for(settings)
        return appliance("replication", "verify", *options, config=config)

    def config_for(self, settings: dict[str, object]) -> Path:
        """A configuration file of this archive with ``[mirror]`` set so."""
        return write_config(self.folder / "verify.toml", self.data_dir, settings)

    def offsite(self) -> tuple[list[str], int]:
        """The packs recorded on the mirror, and how many instances wait."""
        catalog = Catalog(self.catalog_path, 2**26)
        try:
            packs = sorted(p.pack_id for p in replication.offsite_packs(catalog))
            return packs, replication.queue_state(catalog).instances
        finally:
            catalog.close()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    origin = Origin(
        tmp_path, DirectoryTransport(mirror), {"kind": "directory", "path": str(mirror)}
    )
    for label in ("first", "second"):
        origin.store(label, 2)
        origin.replicate()
    origin.lose()  # closes the catalog: the command opens it
    yield Archive(tmp_path, mirror, origin.config.catalog_path, origin.config.data_dir)


def test_an_empty_folder_is_not_taken_for_a_mirror_that_lost_everything(
    archive: Archive, tmp_path: Path
) -> None:
    empty = tmp_path / "mistyped"
    empty.mkdir()
    before = archive.offsite()

    refused = archive.verify(empty, "--all")

    assert refused.returncode != 0
    assert "not the mirror replicated to so far" in refused.stderr
    assert "appliance replication verify --all --new-mirror" in refused.stderr
    assert "pack(s) read back" not in refused.stdout
    assert archive.offsite() == before
    assert before == (["p-000000001", "p-000000002"], 0)
    assert not any(empty.iterdir())


def test_a_new_mirror_asked_for_gets_the_whole_archive_queued(
    archive: Archive, tmp_path: Path
) -> None:
    new = tmp_path / "new-mirror"
    new.mkdir()

    moved = archive.verify(new, "--all", "--new-mirror")

    assert moved.returncode == 1, moved.stderr
    assert "2 damaged or missing; 4 instance(s) queued" in moved.stdout
    assert archive.offsite() == ([], 4)
    # Marked by the next replication, not by verify.
    assert not any(new.iterdir())


def test_a_new_mirror_is_not_taken_while_the_service_runs(
    archive: Archive, tmp_path: Path
) -> None:
    new = tmp_path / "new-mirror"
    new.mkdir()
    online = archive.data_dir / "online"
    assert online.is_dir()
    # What the listener holds for its whole life.
    with open(online / "serve.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        refused = archive.verify(new, "--all", "--new-mirror")

    assert refused.returncode == 1
    assert "the service is running: stop it first" in refused.stderr
    assert archive.offsite() == (["p-000000001", "p-000000002"], 0)


def test_a_new_mirror_is_moved_to_with_every_pack_checked(archive: Archive) -> None:
    # Part of the archive queued again, the rest still recorded there: the
    # replicator would refuse the new mirror all the same.
    refused = archive.verify(archive.folder / "new", "--sample", "1", "--new-mirror")

    assert refused.returncode == 2
    assert "--new-mirror goes with --all" in refused.stderr
    assert archive.offsite() == (["p-000000001", "p-000000002"], 0)


@pytest.mark.parametrize(
    ("keys", "reason"),
    [("their own", "another master key"), ("ours", "holds another archive")],
)
def test_another_archives_mirror_is_refused_even_as_a_new_one(
    archive: Archive, tmp_path: Path, keys: str, reason: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "mirror").mkdir(parents=True)
    ours = KeyStore.load(key_store_path(archive.data_dir))
    mirror_of_another_archive(elsewhere, ours if keys == "ours" else None)
    before = archive.offsite()

    refused = archive.verify(elsewhere / "mirror", "--all", "--new-mirror")

    assert refused.returncode == 1
    assert reason in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert "pack(s) read back" not in refused.stdout
    assert archive.offsite() == before


def test_a_pack_lost_on_our_mirror_is_queued_again_and_a_wrong_path_blames_none(
    archive: Archive, tmp_path: Path
) -> None:
    [lost] = archive.mirror.glob("packs/*/p-000000001.pack")
    lost.unlink()
    wrong = tmp_path / "not-mounted"
    wrong.mkdir()

    refused = archive.verify(wrong)  # the default sample
    found = archive.verify(archive.mirror, "--all")

    assert refused.returncode == 1
    assert "not the mirror replicated to so far" in refused.stderr
    assert found.returncode == 1
    assert "1 damaged or missing; 2 instance(s) queued" in found.stdout
    assert "p-000000001: missing from the mirror" in found.stderr
    assert archive.offsite() == (["p-000000002"], 2)


def _sftp(server: Sshd, folder: Path, client: str) -> dict[str, object]:
    return {"kind": "sftp", "client": client, **sftp_settings(server, folder)}


def _replicate_once(archive: Archive, settings: dict[str, object]) -> bool:
    """What the service's replication does next: send what is queued in one
    pack; whether a catalog snapshot is due after it."""
    config = configuration.load(archive.config_for(settings))
    catalog = Catalog(config.catalog_path, 2**26)
    keys = KeyStore.load(key_store_path(config.data_dir))
    tiers = Tiers(OnlineTier(config.online_path), {}, keys)
    transport = open_mirror(config)
    spool = config.data_dir / "spool"
    replicator = Replicator(catalog, tiers, transport, spool, Settings(batch_seconds=0))
    try:
        assert replicator.send(replicator.ready()) is not None
        return replicator.snapshot_due()
    finally:
        replicator.close()
        transport.close()
        catalog.close()


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_a_new_sftp_mirror_gets_the_whole_archive(
    archive: Archive, tmp_path: Path, sshd: Sshd, client: str
) -> None:
    new = tmp_path / "new-mirror"
    new.mkdir()
    settings = _sftp(sshd, new, client)

    refused = archive.verify_at(settings, "--all")
    moved = archive.verify_at(settings, "--all", "--new-mirror")
    untouched = not any(new.iterdir())
    snapshot_due = _replicate_once(archive, settings)
    checked = archive.verify_at(settings, "--all")

    assert refused.returncode == 1
    assert "not the mirror replicated to so far" in refused.stderr
    # Not a folder to mount: a server.
    assert "(is it the server and folder replicated to so far?)" in refused.stderr
    assert "mounted" not in refused.stderr
    assert moved.returncode == 1, moved.stderr
    assert "2 damaged or missing; 4 instance(s) queued" in moved.stdout
    assert "p-000000002: missing from the mirror" in moved.stderr
    assert untouched
    # Marked by the next replication, which sends a snapshot right after.
    assert (new / "mirror" / "identity").is_file()
    assert [p.name for p in new.glob("packs/*/*.pack")] == ["p-000000003.pack"]
    assert snapshot_due
    assert checked.returncode == 0, checked.stderr
    assert "1 pack(s) read back: 1 good, 0 damaged or missing" in checked.stdout
    assert archive.offsite() == (["p-000000003"], 0)


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_a_new_sftp_mirror_lost_half_way_says_what_was_queued(
    archive: Archive, tmp_path: Path, sshd: Sshd, client: str
) -> None:
    """The server goes away after the first pack was found missing: that
    pack's instances are queued again already, and the command says so
    rather than that nothing changed; run again, it does the rest."""
    new = tmp_path / "new-mirror"
    new.mkdir()
    settings = _sftp(sshd, new, client)
    checked = []
    check = audit._check

    def server_gone_at_the_second(*args: Any) -> list[str]:
        checked.append(args[0].pack_id)
        if len(checked) == 2:
            sshd.stop()
        return check(*args)

    config = archive.config_for(settings)
    command = ["replication", "verify", "--all", "--new-mirror"]
    with mock.patch.object(audit, "_check", server_gone_at_the_second):
        cut = CliRunner().invoke(main, [*command, "--config", str(config)])
    half = archive.offsite()
    sshd.start()
    again = archive.verify_at(settings, "--all", "--new-mirror")

    assert cut.exit_code == 1, cut.output
    assert "nothing was changed" not in cut.output
    assert "1 pack(s) read back: 0 good, 1 damaged or missing; 2 instance(s)" in (
        cut.output
    )
    assert "cannot reach the mirror any more" in cut.output
    assert "run the same command again" in cut.output
    assert half == (["p-000000002"], 2)
    assert again.returncode == 1, again.stderr
    assert "1 damaged or missing; 2 instance(s) queued" in again.stdout
    assert archive.offsite() == ([], 4)
