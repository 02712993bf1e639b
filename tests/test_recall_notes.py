"""Recall notes: a recall killed (SIGKILL) after its files are written and
before, or just after, its catalog transaction leaves no file behind that
nothing counts, and never loses one that the catalog counts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from appliance import service
from appliance.catalog import copies
from appliance.catalog.records import InstanceRecord
from appliance.catalog.store import Catalog
from appliance.config import Config, load
from appliance.hsm import recall as recall_module
from appliance.hsm import recall_notes
from appliance.hsm.failures import Failure
from appliance.hsm.migrator import Migrator
from appliance.hsm.recall import Recaller
from appliance.hsm.recall_notes import RecallNote
from appliance.hsm.tiers import Tiers
from appliance.ingest import Ingest
from appliance.storage.keys import KeyStore, key_store_path
from appliance.storage.nearline import NearlineTier
from appliance.storage.online import OnlineTier
from appliance.storage.packs import PackReader
from tests.conftest import Appliance
from tests.datasets import study_files, uid

STUDY = uid("study", "noted")
KEPT = uid("study", "kept")
INSTANCES = 6
CONFIG = """
[storage]
data_dir = "{data_dir}"
reserved_bytes = 0
"""

# The `appliance recall` command, with the catalog transaction (or the
# removal of the note after it) replaced by a SIGKILL of the process, or
# held until a line arrives on stdin.
RECALL = """
import os, signal, sys
from appliance.catalog import copies
from appliance.cli import main
from appliance.hsm.recall_notes import RecallNote

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

real_add_copies = copies.add_copies

def hold(*args, **kwargs):
    print("extracted", flush=True)
    sys.stdin.readline()
    return real_add_copies(*args, **kwargs)

where = sys.argv.pop(1)
if where == "before-record":
    copies.add_copies = die
elif where == "after-record":
    RecallNote.end = die
elif where == "hold":
    copies.add_copies = hold
main()
"""


@dataclass
class Archive:
    config_path: Path
    config: Config
    catalog: Catalog
    online: OnlineTier
    nearline: NearlineTier
    keys: KeyStore

    def tiers(self) -> Tiers:
        return Tiers(self.online, {"nearline": self.nearline}, self.keys)

    def files(self) -> set[Path]:
        return set(self.online.objects.rglob("*.dcm"))

    def counted(self) -> set[Path]:
        """The files of every online copy the catalog counts."""
        found = set()
        for study in (STUDY, KEPT):
            for record in copies.instances_of(self.catalog, study):
                copy = record.copy_on("online")
                if copy is not None:
                    found.add(self.online.path_of(copy.location))
        return found

    def notes(self) -> list[Path]:
        return sorted(recall_notes.folder_of(self.online).glob("*.note"))


def _make_archive(config_path: Path) -> Archive:
    """Two studies stored online; STUDY moved to nearline (a real pack)."""
    config = load(config_path)
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    online = OnlineTier(config.online_path)
    online.open()
    nearline = NearlineTier(config.nearline_path)
    nearline.open()
    keys = KeyStore.create_if_missing(key_store_path(config.data_dir))
    ingest = Ingest(catalog, online, "refuse")
    try:
        for label in ("noted", "kept"):
            folder = config_path.parent / label
            for path in study_files(folder, label, INSTANCES, pixel_bytes=8000):
                assert ingest.import_file(path, "test").ok
    finally:
        ingest.close()
    found = Archive(config_path, config, catalog, online, nearline, keys)
    moved = Migrator(catalog, found.tiers(), 1).move(STUDY, "online", "nearline")
    assert all(outcome.ok for outcome in moved)
    return found


@contextlib.contextmanager
def archive_in(folder: Path) -> Iterator[Archive]:
    """The two studies' archive in ``folder``, its catalog closed after."""
    config_path = folder / "appliance.toml"
    config_path.write_text(CONFIG.format(data_dir=folder / "data"))
    found = _make_archive(config_path)
    try:
        yield found
    finally:
        found.catalog.close()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    with archive_in(tmp_path) as found:
        yield found


def _as_the_service_starts(archive: Archive) -> None:
    """The service's clean-up at its start, with its own catalog."""
    archive.catalog.close()
    service.clean_up_recalls(archive.config, archive.online)
    config = archive.config
    archive.catalog = Catalog(
        config.catalog_path, config.get("storage.catalog_max_size")
    )


def _recall(archive: Archive, where: str) -> subprocess.Popen[str]:
    config = str(archive.config_path)
    return subprocess.Popen(
        [sys.executable, "-c", RECALL, where, "recall", "--config", config, STUDY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def _killed(archive: Archive, where: str) -> None:
    recall = _recall(archive, where)
    _out, err = recall.communicate(timeout=120)
    assert recall.returncode == -signal.SIGKILL, err


def test_a_recall_killed_before_its_transaction_leaves_nothing(
    archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    kept = {path: path.read_bytes() for path in archive.files()}
    assert set(kept) == archive.counted() and len(kept) == INSTANCES

    _killed(archive, "before-record")

    strays = archive.files() - set(kept)
    assert len(strays) == INSTANCES  # extracted and flushed, never recorded
    [note] = archive.notes()
    assert note.name.split("-")[0].isdigit()

    with caplog.at_level("INFO", logger=recall_notes.__name__):
        _as_the_service_starts(archive)

    assert archive.files() == set(kept) == archive.counted()
    assert {path: path.read_bytes() for path in kept} == kept
    assert not archive.notes()
    [logged] = [r.getMessage() for r in caplog.records]
    assert f"removed {INSTANCES} file(s)" in logged and STUDY in logged

    result = Recaller(archive.catalog, archive.tiers()).recall(STUDY)

    assert result.ok and result.staged == INSTANCES
    assert archive.files() == archive.counted()
    assert len(archive.files()) == 2 * INSTANCES
    assert not archive.notes()


def test_a_recall_killed_after_its_transaction_keeps_every_file(
    archive: Archive,
) -> None:
    _killed(archive, "after-record")

    assert len(archive.notes()) == 1
    assert len(archive.counted()) == 2 * INSTANCES

    _as_the_service_starts(archive)

    assert archive.files() == archive.counted()
    assert len(archive.files()) == 2 * INSTANCES
    assert not archive.notes()
    assert not Recaller(archive.catalog, archive.tiers()).needs_recall(STUDY)


def test_the_note_of_a_recall_still_running_is_left_alone(
    archive: Archive,
) -> None:
    kept = archive.files()
    recall = _recall(archive, "hold")
    try:
        assert recall.stdout is not None
        assert recall.stdout.readline() == "extracted\n"
        written = archive.files() - kept
        assert len(written) == INSTANCES

        removed = recall_notes.clean_up(archive.catalog, archive.online)

        assert removed == 0
        assert archive.files() - kept == written
        assert len(archive.notes()) == 1
    finally:
        recall.kill()
        recall.communicate(timeout=60)

    # Its process is gone now: the next clean-up takes the note.
    assert recall_notes.clean_up(archive.catalog, archive.online) == INSTANCES
    assert archive.files() == kept
    assert not archive.notes()


def test_a_recall_that_fails_leaves_its_note_to_the_next_one(
    archive: Archive,
) -> None:
    """A failure (not a kill) lets go of the note; the next recall, in the
    same process, removes the files first and leaves no stray."""
    kept = archive.files()
    with (
        mock.patch.object(
            recall_module.copies, "add_copies", side_effect=OSError("lost")
        ),
        pytest.raises(OSError),
    ):
        Recaller(archive.catalog, archive.tiers()).recall(STUDY)
    assert len(archive.files() - kept) == INSTANCES
    assert len(archive.notes()) == 1

    result = Recaller(archive.catalog, archive.tiers()).recall(STUDY)

    assert result.ok and result.staged == INSTANCES
    assert archive.files() == archive.counted()
    assert len(archive.files()) == 2 * INSTANCES
    assert not archive.notes()


@pytest.mark.parametrize("threads", [1, 4])
def test_each_key_is_noted_on_disk_before_its_file_is_written(
    archive: Archive, threads: int
) -> None:
    real_extract = Recaller._extract
    synced: list[int] = []
    real_fsync = os.fsync
    checked: list[str] = []

    def extract(
        self: Recaller,
        reader: PackReader,
        record: InstanceRecord,
        key: str,
    ) -> Failure | None:
        [note] = archive.notes()
        assert key in note.read_text().splitlines()
        assert synced, "the note was not flushed"
        assert not self.tiers.online.path_of(key).exists()
        checked.append(key)
        return real_extract(self, reader, record, key)

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(recall_notes.SUFFIX):
            synced.append(fd)
        real_fsync(fd)

    with (
        mock.patch.object(Recaller, "_extract", extract),
        mock.patch.object(recall_notes.os, "fsync", fsync),
    ):
        result = Recaller(archive.catalog, archive.tiers(), threads).recall(STUDY)

    assert result.ok and len(checked) == INSTANCES
    assert len(synced) == 1  # one pack: one flush of the note, not one each
    assert not archive.notes()


def test_a_note_of_a_dead_process_keeps_what_the_catalog_counts(
    archive: Archive,
) -> None:
    """Only files that no online copy of the study names are removed."""
    counted = sorted(archive.counted())
    stray = archive.online.new_key()
    archive.online.path_of(stray).write_bytes(b"left by a killed recall")
    note = RecallNote(archive.online, KEPT)
    note.add([counted[0].stem, stray, "not a key"])
    assert recall_notes.clean_up(archive.catalog, archive.online) == 0  # held

    note.close()  # as a dead process would
    removed = recall_notes.clean_up(archive.catalog, archive.online)

    assert removed == 1
    assert not archive.online.path_of(stray).exists()
    assert archive.files() == set(counted)
    assert not archive.notes()


def test_a_note_removed_between_its_making_and_its_lock_is_made_again(
    archive: Archive,
) -> None:
    """A clean-up that took a note just made (not yet locked) for a dead
    one: the recall makes another rather than write to a removed file."""
    real_flock = recall_notes.fcntl.flock
    raced: list[str] = []

    def flock(fd: int, operation: int) -> None:
        if not raced:
            [made] = archive.notes()
            raced.append(made.name)
            assert recall_notes.clean_up(archive.catalog, archive.online) == 0
            assert not made.exists()
        real_flock(fd, operation)

    note = RecallNote(archive.online, STUDY)
    with mock.patch.object(recall_notes.fcntl, "flock", flock):
        note.add([archive.online.new_key()])

    assert note.path is not None and note.path.exists()
    assert note.path.name != raced[0]
    note.end()
    assert not archive.notes()


def test_the_service_removes_what_a_killed_recall_left_before_it_listens(
    appliance_factory: Callable[[], Appliance],
) -> None:
    node = appliance_factory()
    node.write_config()
    archive = _make_archive(node.config_path)
    try:
        kept = archive.files()
        _killed(archive, "before-record")
        assert len(archive.files() - kept) == INSTANCES
    finally:
        archive.catalog.close()

    node.start()

    assert archive.files() == kept
    assert not archive.notes()
    log = node.log()
    cleaned = log.index(
        f"removed {INSTANCES} file(s) an interrupted recall of study {STUDY}"
    )
    assert cleaned < log.index("listening on")
