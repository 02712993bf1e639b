"""A mirror that refuses us (another archive's identity marker, a changed
host key, a refused login): the replication process says so once per
cause, the status commands say what stops it, and it resumes by itself,
saying so once, when the cause is removed.

The mirrors are real: a directory mirror, and OpenSSH's sshd on loopback.
"""

from __future__ import annotations

import errno
import logging
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
        _empty_the_mirror(site)
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
