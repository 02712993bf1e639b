"""A mirror that refuses us (another archive's identity marker, a changed
host key, a refused login): the replication process says so once per
cause, the status commands say what stops it, and it resumes by itself,
saying so once, when the cause is removed.

The mirrors are real: a directory mirror, and OpenSSH's sshd on loopback.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance import overview
from appliance.catalog import replication
from appliance.config import Config, load
from appliance.errors import HostKeyError, LoginRefusedError
from appliance.replication import health
from appliance.replication.health import FAILING, REFUSED, Health, kind_of
from appliance.replication.replicator import Replicator, Settings
from appliance.replication.transports import directory
from appliance.replication.transports.directory import DirectoryTransport
from tests.sshd import Sshd
from tests.test_replicator import (
    CountingMirror,
    Site,
    _sftp_replicator,
    _wait_for,
    built_site,
    mirror_of_another_archive,
)

Records = Callable[[], list[logging.LogRecord]]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from built_site(tmp_path)


def _config(site: Site) -> Config:
    return load(
        None,
        {
            "storage.data_dir": str(site.spool.parent / "data"),
            "mirror.kind": "directory",
            "mirror.path": str(site.mirror),
        },
    )


@contextmanager
def _running(replicator: Replicator) -> Iterator[None]:
    """The replicator's loop in a thread, as the replication process runs
    it (with a backoff that starts at a millisecond)."""
    stop = threading.Event()
    thread = threading.Thread(target=replicator.run, args=(stop, 0.001))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()


def _lines(caplog: pytest.LogCaptureFixture, level: int, text: str = "") -> Records:
    def found() -> list[logging.LogRecord]:
        return [
            r
            for r in list(caplog.records)
            if r.levelno == level and text in r.getMessage()
        ]

    return found


def _retries(caplog: pytest.LogCaptureFixture) -> Records:
    return _lines(caplog, logging.DEBUG, "still stopped")


def _empty_the_mirror(site: Site) -> None:
    """What the administrator does: the other archive's files go, its
    identity marker last (a refused round reads nothing else)."""
    for folder in ("packs", "journal", "catalog"):
        shutil.rmtree(site.mirror / folder, ignore_errors=True)
    (site.mirror / "mirror" / "identity").unlink()


def test_a_mirror_of_another_archive_is_logged_once_shown_and_resumed(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mirror_of_another_archive(tmp_path)
    site.store("mine", 3)
    config = _config(site)
    errors = _lines(caplog, logging.ERROR)
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    with _running(site.replicator()):
        _wait_for(lambda: len(_retries(caplog)()) >= 3)
    refused = overview.replication_status(config, site.catalog)
    # The replication process started again: the same cause, no new ERROR.
    with _running(site.replicator()):
        _wait_for(lambda: len(_retries(caplog)()) >= 6)
    # Emptied between two runs: emptied under a running round, the marker
    # may vanish between its look and its read, which is another trouble.
    _empty_the_mirror(site)
    with _running(site.replicator()):
        _wait_for(lambda: health.read_trouble(site.catalog) is None)

    [error] = errors()
    assert "the mirror refuses us" in error.getMessage()
    assert "another master key" in error.getMessage()
    assert refused["state"] == REFUSED
    assert refused["summary"].startswith("stopped: the mirror refuses us since ")
    assert "another master key" in refused["summary"]
    assert refused["trouble"]["kind"] == REFUSED
    assert refused["queued_instances"] == 3
    assert refused["recovery_point_seconds"] >= 0

    [resumed] = _lines(caplog, logging.INFO, "replication resumed")()
    assert "another master key" in resumed.getMessage()
    assert len(errors()) == 1
    after = overview.replication_status(config, site.catalog)
    assert (after["state"], after["trouble"], after["last_error"]) == (
        "up to date",
        None,
        None,
    )
    assert after["queued_instances"] == 0
    assert overview.mirror_state(config, site.catalog)["state"] == "up to date"


def test_with_nothing_queued_a_refusing_mirror_is_not_up_to_date(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mirror_of_another_archive(tmp_path)
    config = _config(site)
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    # Nothing is queued: the catalog snapshot is what the mirror refuses.
    with _running(site.replicator()):
        _wait_for(lambda: len(_retries(caplog)()) >= 2)

    status = overview.replication_status(config, site.catalog)
    assert status["queued_instances"] == 0
    assert status["state"] == REFUSED
    assert "up to date" not in status["summary"]
    assert overview.mirror_state(config, site.catalog)["state"] == REFUSED


def test_the_same_cause_is_recalled_once_an_hour(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mirror_of_another_archive(tmp_path)
    site.store("hourly", 1)
    offset = [0.0]
    replicator = Replicator(
        site.catalog,
        site.tiers,
        DirectoryTransport(site.mirror),
        site.spool,
        Settings(batch_seconds=0),
        clock=lambda: time.time() + offset[0],
    )
    warnings = _lines(caplog, logging.WARNING, "still stopped")
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    with _running(replicator):
        _wait_for(lambda: len(_retries(caplog)()) >= 2)
        assert not warnings()
        offset[0] = health.REMIND_EVERY + 1
        _wait_for(lambda: len(warnings()) >= 1)
        seen = len(_retries(caplog)())
        _wait_for(lambda: len(_retries(caplog)()) >= seen + 2)

    assert len(warnings()) == 1
    assert "another master key" in warnings()[0].getMessage()
    assert len(_lines(caplog, logging.ERROR)()) == 1


def test_a_changed_host_key_then_a_refused_login_then_resumed(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site.store("sftp-refused", 2)
    server = Sshd(tmp_path / "sshd")
    authorized = server.authorized_keys.read_text()
    server.replace_host_key()  # known_hosts still pins the first key
    errors = _lines(caplog, logging.ERROR)
    alerts: list[BaseException] = []
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    with server:
        replicator = _sftp_replicator(site, server)
        replicator.health = Health(site.catalog, alert=alerts.append)
        with _running(replicator):
            _wait_for(lambda: len(_retries(caplog)()) >= 3, timeout=60)
            host_key = health.read_trouble(site.catalog)
            # The administrator pins the new key, but the mirror's new
            # installation does not know the appliance's login key yet.
            server.authorized_keys.write_text("")
            server.write_known_hosts()
            _wait_for(lambda: len(errors()) == 2, timeout=60)
            seen = len(_retries(caplog)())
            _wait_for(lambda: len(_retries(caplog)()) >= seen + 2, timeout=60)
            login = health.read_trouble(site.catalog)
            server.authorized_keys.write_text(authorized)
            _wait_for(lambda: health.read_trouble(site.catalog) is None, timeout=60)
        replicator.transport.close()

    assert host_key is not None and login is not None
    assert (host_key.kind, login.kind) == (REFUSED, REFUSED)
    assert "host key" in host_key.cause
    assert "refused the key" in login.cause
    first, second = errors()
    assert "host key" in first.getMessage()
    assert "refused the key" in second.getMessage()
    assert [type(alert) for alert in alerts] == [HostKeyError, LoginRefusedError]
    assert len(_lines(caplog, logging.INFO, "replication resumed")()) == 1
    assert len(errors()) == 2
    assert replication.queue_state(site.catalog).instances == 0


# -- with nothing to send -----------------------------------------------------------


def _idle_replicator(site: Site, root: Path, **settings: object) -> Replicator:
    chosen = Settings(batch_seconds=0, **settings)  # type: ignore[arg-type]
    return Replicator(
        site.catalog, site.tiers, DirectoryTransport(root), site.spool, chosen
    )


def _until_nothing_is_due(site: Site, replicator: Replicator) -> None:
    """Run the replicator until what was stored is on the mirror and the
    catalog snapshot and the audit's share are done: then nothing is due
    for hours, and only the look at the mirror can find a refusal."""
    with _running(replicator):
        _wait_for(
            lambda: (
                replication.queue_state(site.catalog).instances == 0
                and replication.mirror_mark(site.catalog, "audit_time") > 0
            )
        )


def _point(disk: Path, folder: Path) -> None:
    """Point the mirror's path at ``folder`` in one step (a disk swapped
    under its mount point)."""
    link = disk.with_name(disk.name + ".new")
    link.symlink_to(folder, target_is_directory=True)
    os.replace(link, disk)


def _swapped_mirror(site: Site, tmp_path: Path) -> tuple[Path, Path]:
    """This archive replicated to the folder the path ``disk`` points at,
    then that path points at a folder of another archive (its own master
    key); ``disk`` and this archive's folder."""
    ours, disk = tmp_path / "ours", tmp_path / "disk"
    ours.mkdir()
    _point(disk, ours)
    site.store("before", 2)
    _until_nothing_is_due(site, _idle_replicator(site, disk))
    mirror_of_another_archive(tmp_path)
    _point(disk, site.mirror)
    return disk, ours


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_started_idle_at_another_archive_s_mirror_it_is_refused_and_resumes(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk, ours = _swapped_mirror(site, tmp_path)
    theirs = _files(site.mirror)
    config = _config(site)
    errors = _lines(caplog, logging.ERROR)
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    # The replication process starts with nothing queued and nothing due.
    with _running(_idle_replicator(site, disk)):
        _wait_for(lambda: len(_retries(caplog)()) >= 2)
        refused = overview.replication_status(config, site.catalog)
        _point(disk, ours)  # the administrator puts this archive's mirror back
        _wait_for(lambda: health.read_trouble(site.catalog) is None)
        after = overview.replication_status(config, site.catalog)

    [error] = errors()
    assert error.getMessage().startswith("replication stopped: the mirror refuses us")
    assert "another master key" in error.getMessage()
    assert refused["state"] == REFUSED
    assert refused["summary"].startswith("stopped: the mirror refuses us since ")
    assert refused["queued_instances"] == 0
    assert _files(site.mirror) == theirs  # nothing was written to it
    [resumed] = _lines(caplog, logging.INFO, "replication resumed")()
    assert "another master key" in resumed.getMessage()
    assert (after["state"], after["summary"], after["trouble"]) == (
        "up to date",
        "up to date",
        None,
    )
    assert len(errors()) == 1


def test_a_mirror_swapped_while_idle_is_refused_at_the_next_look(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours, disk = tmp_path / "ours", tmp_path / "disk"
    ours.mkdir()
    _point(disk, ours)
    mirror_of_another_archive(tmp_path)
    site.store("idle", 2)
    config = _config(site)
    errors = _lines(caplog, logging.ERROR)
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    # A look at the mirror every 50 ms in place of every 5 minutes.
    with _running(_idle_replicator(site, disk, identity_seconds=0.05)):
        _wait_for(lambda: replication.mirror_mark(site.catalog, "audit_time") > 0)
        before = overview.replication_status(config, site.catalog)
        _point(disk, site.mirror)
        _wait_for(lambda: len(_retries(caplog)()) >= 2)
        refused = overview.replication_status(config, site.catalog)
        _point(disk, ours)
        _wait_for(lambda: health.read_trouble(site.catalog) is None)
        after = overview.replication_status(config, site.catalog)

    assert before["state"] == after["state"] == "up to date"
    assert refused["state"] == REFUSED
    assert "another master key" in refused["summary"]
    [error] = errors()
    assert "the mirror refuses us" in error.getMessage()
    assert len(_lines(caplog, logging.INFO, "replication resumed")()) == 1


def test_an_idle_replicator_looks_at_the_mirror_once_a_period(site: Site) -> None:
    site.replicator().check_mirror()  # the mirror gets its marker
    mirror = CountingMirror(site.mirror)
    stop = threading.Event()
    looks = itertools.count(1)

    def paused() -> bool:
        if next(looks) >= 200:
            stop.set()
        return False

    replicator = Replicator(
        site.catalog,
        site.tiers,
        mirror,
        site.spool,
        Settings(batch_seconds=0, audit_days=0),
        paused=paused,
    )
    replicator.run(stop, idle=0.001)

    # 200 idle rounds (a snapshot among them), one look at the marker.
    assert mirror.gets == ["mirror/identity"]
    assert replication.mirror_mark(site.catalog, "snapshot_time") > 0


def test_while_paused_an_idle_replicator_does_not_look_at_the_mirror(
    site: Site,
) -> None:
    mirror = CountingMirror(site.mirror)
    stop = threading.Event()
    looks = itertools.count(1)

    def paused() -> bool:
        if next(looks) >= 5:
            stop.set()
        return True

    replicator = Replicator(
        site.catalog, site.tiers, mirror, site.spool, Settings(), paused=paused
    )
    replicator.run(stop, idle=0.001)

    assert (mirror.connects, mirror.gets) == (0, [])
    assert site.remote_files() == []


def test_idle_at_a_mirror_with_a_changed_host_key_it_is_refused_and_resumes(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site.store("sftp-idle", 1)
    server = Sshd(tmp_path / "sshd")
    errors = _lines(caplog, logging.ERROR)
    caplog.set_level(logging.DEBUG, logger="appliance.replication")

    with server:
        first = _sftp_replicator(site, server)
        _until_nothing_is_due(site, first)
        first.transport.close()
    server.replace_host_key()  # the mirror is installed again
    with server:
        # The replication process starts with nothing queued and nothing due.
        replicator = _sftp_replicator(site, server)
        with _running(replicator):
            _wait_for(lambda: len(_retries(caplog)()) >= 2, timeout=60)
            refused = health.read_trouble(site.catalog)
            server.write_known_hosts()  # the administrator pins the new key
            _wait_for(lambda: health.read_trouble(site.catalog) is None, timeout=60)
        replicator.transport.close()

    assert refused is not None and refused.kind == REFUSED
    assert "host key" in refused.cause
    [error] = errors()
    assert "host key" in error.getMessage()
    assert len(_lines(caplog, logging.INFO, "replication resumed")()) == 1
    assert replication.queue_state(site.catalog).instances == 0


def _raised(exc: OSError) -> BaseException:
    """What the directory mirror raises for this answer of the system."""
    try:
        raise directory._error(exc, "cannot write packs/1/p-000000001.pack") from exc
    except Exception as raised:
        return raised


def test_a_mirror_folder_that_cannot_be_written_is_a_refusal() -> None:
    # As root, no folder refuses a write: the errors the directory mirror
    # makes of the system's answers are classified instead.
    assert kind_of(_raised(PermissionError(errno.EACCES, "Permission denied"))) == (
        REFUSED
    )
    assert kind_of(_raised(OSError(errno.EROFS, "Read-only file system"))) == REFUSED
    assert kind_of(_raised(OSError(errno.ENOENT, "No such file"))) == FAILING


def test_a_missing_mirror_folder_is_said_once_across_process_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance.catalog.store import Catalog
    from appliance.replication import process

    missing = tmp_path / "unmounted" / "mirror"
    config = load(
        None,
        {
            "storage.data_dir": str(tmp_path / "data"),
            "mirror.kind": "directory",
            "mirror.path": str(missing),
        },
    )
    catalog = Catalog(config.catalog_path, map_size=2**26)
    stop = threading.Event()
    stop.set()  # no wait before the process would end
    try:
        # Each call is what one replication process does before it ends
        # (its supervisor starts another one).
        for _ in range(3):
            process._replicate(config, catalog, stop, process.limiter(config, stop))
        status = overview.replication_status(config, catalog)
    finally:
        catalog.close()

    [error] = _lines(caplog, logging.ERROR)()
    assert str(missing) in error.getMessage()
    assert status["state"] == FAILING
    assert status["summary"].startswith("stopped since ")
    assert "retrying" in status["summary"] and str(missing) in status["summary"]
