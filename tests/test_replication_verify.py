"""``appliance replication verify`` looks at the mirror's identity before it
reads anything: a wrong ``[mirror]`` setting (a mistyped path, an
unmounted folder, another archive's mirror) is refused and changes
nothing, a new, empty mirror is taken only when asked for
(``--new-mirror``), and a pack lost on this archive's own mirror is still
queued again.

The archive is built in this process (stored and replicated to a
directory mirror); the command runs as the administrator runs it.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.catalog import replication
from appliance.catalog.store import Catalog
from appliance.replication.transports.directory import DirectoryTransport
from appliance.storage.keys import KeyStore, key_store_path
from tests.restore_site import Origin, appliance, write_config
from tests.test_replicator import mirror_of_another_archive


@dataclass
class Archive:
    """An archive that sent two packs (two instances each) to ``mirror``."""

    folder: Path
    mirror: Path
    catalog_path: Path
    data_dir: Path

    def verify(self, mirror: Path, *options: str) -> subprocess.CompletedProcess[str]:
        """``appliance replication verify`` with ``[mirror]`` set to ``mirror``."""
        config = write_config(
            self.folder / "verify.toml",
            self.data_dir,
            {"kind": "directory", "path": str(mirror)},
        )
        return appliance("replication", "verify", *options, config=config)

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
