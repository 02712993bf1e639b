"""One conformance suite for every mirror transport, then the SFTP mirror's
failures against a real OpenSSH server, through either SSH client (OpenSSH's
ssh or paramiko): killed mid-upload, a replaced or unknown host key, a
stalled transfer, a server down then up.

The SFTP server runs on this machine as the current user, so the mirror
root of either backend is a local folder the tests can look into: to plant
an unfinished upload, or to check that nothing incomplete has a name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import paramiko
import pytest
from paramiko.sftp import CMD_EXTENDED

from appliance.errors import (
    ConfigError,
    HostKeyError,
    MirrorConflictError,
    StalledTransferError,
    TransportError,
)
from appliance.replication.transports import (
    OpensshTransport,
    SftpSettings,
    SftpTransport,
    Transport,
    open_transport,
)
from appliance.replication.transports.names import validate_name
from appliance.replication.transports.retry import backoff_delay
from appliance.replication.transports.settings import read_settings
from appliance.replication.transports.sftpwire import SftpWire
from appliance.replication.transports.sshprocess import open_ssh_session, ssh_command
from tests.ports import held_port
from tests.sshd import Sshd

MiB = 1024 * 1024
PACK = "packs/123/p-000000123.pack"

BAD_NAMES = [
    "",
    "../x",
    "packs/../../x",
    "/abs",
    "/etc/passwd",
    "packs//x",
    "packs/",
    "./x",
    ".hidden",
    "packs/.x",
    "a b",
    "tab\tname",
    "back\\slash",
    "caf\u00e9",
    "line\nbreak",
    "x.pack.partial",
    "a/" * 8 + "b",
    "x" * 101,
]


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic stand-in bytes for an encrypted pack (no patient data)."""
    return random.Random(seed).randbytes(size)


@dataclass
class Mirror:
    """A transport under test and the local folder its files land in."""

    transport: Transport
    root: Path
    local: Path
    sent: list[int] = field(default_factory=list)

    def source(self, data: bytes, name: str = "source") -> tuple[Path, int, str]:
        path = self.local / name
        path.write_bytes(data)
        return path, len(data), hashlib.sha256(data).hexdigest()

    def put(self, name: str, data: bytes, **hooks: Callable[[int], None]) -> int:
        """Upload ``data`` as ``name``; the bytes actually sent."""
        self.sent.clear()
        path, size, digest = self.source(data)
        self.transport.put(name, path, size, digest, progress=self.sent.append, **hooks)
        return sum(self.sent)

    def read(self, name: str) -> bytes:
        return b"".join(self.transport.get(name))

    def plant_partial(self, name: str, data: bytes) -> None:
        """Leave an unfinished upload as an earlier attempt would have."""
        path = self.root / f"{name}.partial"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def files(self) -> list[str]:
        """Every file under the mirror root, partial ones included."""
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file()
        )


def sftp_settings(server: Sshd, root: Path, **overrides: object) -> dict[str, object]:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": server.port,
        "user": server.user,
        "key_file": str(server.user_key),
        "known_hosts": str(server.known_hosts),
        "remote_path": str(root),
        "timeout": 5.0,
        "stall_timeout": 10.0,
        "retries": 2,
        "backoff": 0.05,
        "backoff_max": 0.2,
    }
    settings.update(overrides)
    return settings


CLIENTS: dict[str, type[OpensshTransport] | type[SftpTransport]] = {
    "openssh": OpensshTransport,
    "paramiko": SftpTransport,
}


def sftp_transport(
    server: Sshd,
    root: Path,
    client: str,
    sleep: Callable[[float], object] = time.sleep,
    **overrides: object,
) -> Transport:
    values = sftp_settings(server, root, client=client, **overrides)
    settings = read_settings(SftpSettings, values, "sftp")
    return CLIENTS[client](settings, sleep=sleep)


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> str:
    """Each SSH client the SFTP mirror can use."""
    return str(request.param)


@pytest.fixture(scope="module")
def shared_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One server for the conformance suite."""
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_root(tmp_path: Path) -> tuple[Path, Path]:
    root, local = tmp_path / "mirror", tmp_path / "local"
    root.mkdir()
    local.mkdir()
    return root, local


@pytest.fixture(params=["directory", "sftp-openssh", "sftp-paramiko"])
def mirror(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mirror]:
    root, local = make_root(tmp_path)
    if request.param == "directory":
        transport = open_transport("directory", {"path": str(root)})
    else:
        server = request.getfixturevalue("shared_sshd")
        client = request.param.removeprefix("sftp-")
        transport = open_transport("sftp", sftp_settings(server, root, client=client))
    with transport:
        yield Mirror(transport, root, local)


@pytest.fixture
def sftp_mirror(sshd: Sshd, tmp_path: Path, client: str) -> Iterator[Mirror]:
    root, local = make_root(tmp_path)
    with sftp_transport(sshd, root, client) as transport:
        yield Mirror(transport, root, local)


# -- the conformance suite: every backend ------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, MiB, 3 * MiB + 17])
def test_put_then_get_gives_the_same_bytes(mirror: Mirror, size: int) -> None:
    data = payload(size)
    assert mirror.put(PACK, data) == size
    assert mirror.read(PACK) == data
    assert mirror.transport.size(PACK) == size
    assert mirror.transport.sha256(PACK) == hashlib.sha256(data).hexdigest()
    assert mirror.files() == [PACK]


def test_get_streams_in_chunks(mirror: Mirror) -> None:
    data = payload(5 * MiB + 3)
    mirror.put(PACK, data)
    chunks = list(mirror.transport.get(PACK))
    assert len(chunks) > 1
    assert max(len(chunk) for chunk in chunks) <= mirror.transport.block_size
    assert b"".join(chunks) == data


def test_list_and_size(mirror: Mirror) -> None:
    names = [
        "packs/001/p-000000001.pack",
        "packs/002/p-000000002.pack",
        "catalog/snapshot-000000000042",
        "journal/000000000001-000000000124",
    ]
    for number, name in enumerate(names):
        mirror.put(name, payload(100 + number, seed=number))
    listing = mirror.transport.list()
    assert listing == sorted((name, 100 + n) for n, name in enumerate(names))
    assert [name for name, _ in mirror.transport.list("packs/")] == names[:2]
    assert [name for name, _ in mirror.transport.list("packs/00")] == names[:2]
    assert [name for name, _ in mirror.transport.list("packs/002/")] == names[1:2]
    assert mirror.transport.list("cat") == [(names[2], 102)]
    assert mirror.transport.list("nothing/") == []
    assert mirror.transport.size(names[3]) == 103
    assert mirror.transport.size("packs/999/p-000000999.pack") is None
    assert mirror.transport.size("packs") is None  # a folder is not a file


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_before_anything_is_sent(
    mirror: Mirror, name: str
) -> None:
    path, size, digest = mirror.source(b"data")
    with pytest.raises(ValueError, match="not a remote name"):
        mirror.transport.put(name, path, size, digest)
    for operation in (
        mirror.transport.get,
        mirror.transport.size,
        mirror.transport.delete,
    ):
        with pytest.raises(ValueError):
            operation(name)
    assert mirror.files() == []


@pytest.mark.parametrize("prefix", ["../", "/", "/etc/", "a b", "packs//", ".x"])
def test_bad_prefixes_are_refused(mirror: Mirror, prefix: str) -> None:
    with pytest.raises(ValueError, match="cannot start a remote name"):
        mirror.transport.list(prefix)


def test_good_names_pass() -> None:
    for name in (PACK, "catalog/snapshot-000042", "journal/000000124", "a", "A.b_c-d"):
        assert validate_name(name) == name


def test_overwriting_is_refused(mirror: Mirror) -> None:
    first = payload(2000, seed=1)
    mirror.put(PACK, first)
    for other in (payload(2000, seed=2), payload(3000, seed=3), b""):
        with pytest.raises(MirrorConflictError, match="never overwritten"):
            mirror.put(PACK, other)
    assert mirror.read(PACK) == first
    assert mirror.files() == [PACK]


def test_a_folder_holding_the_name_is_a_conflict(mirror: Mirror) -> None:
    mirror.put("packs/123", b"inside")
    with pytest.raises(MirrorConflictError, match="not a file"):
        mirror.put("packs", b"outside")
    assert mirror.transport.list() == [("packs/123", 6)]


def test_putting_the_same_bytes_again_sends_nothing(mirror: Mirror) -> None:
    data = payload(MiB + 5)
    mirror.put(PACK, data)
    assert mirror.put(PACK, data) == 0
    assert mirror.read(PACK) == data


def test_a_partial_file_is_never_listed_as_complete(mirror: Mirror) -> None:
    mirror.plant_partial(PACK, payload(500))
    assert mirror.transport.list() == []
    assert mirror.transport.list(partial=True) == [(PACK, 500)]
    assert mirror.transport.size(PACK) is None
    with pytest.raises(TransportError, match="not on the mirror"):
        mirror.transport.get(PACK)
    mirror.transport.delete(PACK, partial=True)
    assert mirror.files() == []


def test_delete(mirror: Mirror) -> None:
    mirror.put(PACK, b"x" * 10)
    mirror.plant_partial("packs/123/other.pack", b"y")
    mirror.transport.delete(PACK)
    mirror.transport.delete(PACK)  # not there: no error
    assert mirror.files() == ["packs/123/other.pack.partial"]
    mirror.transport.delete("packs/123/other.pack")  # only the complete file
    assert mirror.files() == ["packs/123/other.pack.partial"]


def test_a_partial_with_the_right_prefix_is_resumed(mirror: Mirror) -> None:
    data = payload(4 * MiB + 123)
    held = 2 * MiB + 77
    mirror.plant_partial(PACK, data[:held])
    assert mirror.put(PACK, data) == len(data) - held
    assert mirror.read(PACK) == data
    assert mirror.files() == [PACK]


@pytest.mark.parametrize(
    "planted",
    [
        b"\0" * MiB,  # the torn tail a power cut leaves
        payload(MiB, seed=99),  # another file's bytes
        payload(5 * MiB, seed=1),  # longer than the file
    ],
    ids=["zeros", "other-bytes", "too-long"],
)
def test_a_partial_with_a_wrong_prefix_restarts(mirror: Mirror, planted: bytes) -> None:
    data = payload(3 * MiB, seed=1)
    mirror.plant_partial(PACK, planted)
    assert mirror.put(PACK, data) == len(data)
    assert mirror.read(PACK) == data
    assert mirror.files() == [PACK]


def test_a_complete_partial_is_renamed_without_sending(mirror: Mirror) -> None:
    data = payload(MiB)
    mirror.plant_partial(PACK, data)
    assert mirror.put(PACK, data) == 0
    assert mirror.read(PACK) == data


def test_a_wrong_checksum_stores_nothing(mirror: Mirror) -> None:
    path, size, _digest = mirror.source(payload(MiB))
    with pytest.raises(TransportError, match="SHA-256"):
        mirror.transport.put(PACK, path, size, "0" * 64)
    assert mirror.files() == []


def test_a_short_local_file_stores_nothing(mirror: Mirror) -> None:
    path, size, digest = mirror.source(payload(1000))
    with pytest.raises(TransportError, match="ends at byte 1000"):
        mirror.transport.put(PACK, path, size + 1, digest)
    assert mirror.transport.list() == []


def test_bytes_in_memory_go_up_as_a_file_would(mirror: Mirror) -> None:
    data = bytearray(payload(3 * MiB + 17))
    digest = hashlib.sha256(data).hexdigest()
    mirror.transport.put(PACK, data, len(data), digest)
    assert mirror.read(PACK) == data
    assert mirror.files() == [PACK]


def test_bytes_in_memory_resumed_are_checked_as_a_file_would_be(
    mirror: Mirror,
) -> None:
    data = payload(3 * MiB)
    mirror.plant_partial(PACK, data[: MiB + 5])
    # Sent whole, the caller's hash is taken as it is; a resumed upload
    # hashes the bytes it adds to the part already there.
    with pytest.raises(TransportError, match="SHA-256"):
        mirror.transport.put(PACK, data, len(data), "0" * 64)
    assert PACK not in mirror.files()

    mirror.plant_partial(PACK, data[: MiB + 5])
    sent: list[int] = []
    digest = hashlib.sha256(data).hexdigest()
    mirror.transport.put(PACK, data, len(data), digest, progress=sent.append)
    assert sum(sent) == len(data) - MiB - 5
    assert mirror.read(PACK) == data


def test_short_bytes_in_memory_store_nothing(mirror: Mirror) -> None:
    data = payload(1000)
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(TransportError, match="end at byte 1000"):
        mirror.transport.put(PACK, data, len(data) + 1, digest)
    assert mirror.transport.list() == []


def test_throttle_is_asked_before_each_block(mirror: Mirror) -> None:
    data = payload(2 * MiB + 10)
    asked: list[int] = []

    def throttle(count: int) -> None:
        asked.append(count)
        assert sum(asked) - count == sum(mirror.sent)  # before, not after

    mirror.put(PACK, data, throttle=throttle)
    assert asked == mirror.sent
    assert sum(asked) == len(data)
    assert max(asked) <= mirror.transport.block_size


def test_an_error_in_a_hook_stores_nothing_under_the_name(mirror: Mirror) -> None:
    class Stop(Exception):
        pass

    def throttle(count: int) -> None:
        if sum(mirror.sent) >= MiB:
            raise Stop

    with pytest.raises(Stop):
        mirror.put(PACK, payload(3 * MiB), throttle=throttle)
    assert mirror.transport.list() == []
    assert mirror.put(PACK, payload(3 * MiB)) < 3 * MiB  # resumed


# -- configuration -------------------------------------------------------------


def test_a_missing_mirror_folder_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="mount the mirror disk"):
        open_transport("directory", {"path": str(tmp_path / "absent")})
    assert not (tmp_path / "absent").exists()


def test_a_missing_remote_folder_is_reported(shared_sshd: Sshd, tmp_path: Path) -> None:
    settings = sftp_settings(shared_sshd, tmp_path / "absent")
    with (
        open_transport("sftp", settings) as transport,
        pytest.raises(TransportError, match="does not exist on the mirror"),
    ):
        transport.list()


def test_configuration_errors_name_the_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        open_transport("sftp", {"host": "mirror", "port": "22", "timeout": -1})
    keys = {key for key, _message in caught.value.problems}
    assert keys == {
        "mirror.user",
        "mirror.key_file",
        "mirror.known_hosts",
        "mirror.port",
    }
    with pytest.raises(ConfigError, match=r"mirror\.kind"):
        open_transport("s3", {})
    with pytest.raises(ConfigError, match=r"mirror\.block_size"):
        open_transport("directory", {"path": "/", "block_size": 10})


def test_the_ssh_client_is_chosen_by_configuration(tmp_path: Path) -> None:
    values = {"host": "mirror", "user": "pacs", "key_file": "k", "known_hosts": "h"}
    with open_transport("sftp", values) as default:
        assert isinstance(default, OpensshTransport)
    with open_transport("sftp", {**values, "client": "paramiko"}) as chosen:
        assert isinstance(chosen, SftpTransport)
    with pytest.raises(ConfigError, match=r"mirror\.client"):
        open_transport("sftp", {**values, "client": "putty"})


def test_ssh_runs_with_pinned_keys_and_no_other_configuration(tmp_path: Path) -> None:
    values = sftp_settings_for("-oProxyCommand=evil", tmp_path)
    command = ssh_command(read_settings(SftpSettings, values, "sftp"))
    options = {command[i + 1] for i, word in enumerate(command) if word == "-o"}
    assert command[1:3] == ["-F", "none"]  # no ssh_config of the machine or user
    assert {
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f'UserKnownHostsFile="{tmp_path / "known hosts"}"',  # quoted: a space
        "GlobalKnownHostsFile=none",
        "UpdateHostKeys=no",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "ConnectTimeout=5",
        "ServerAliveInterval=15",
    } <= options
    # A host name that looks like an option stays a host name.
    assert command[-3:] == ["--", "-oProxyCommand=evil", "sftp"]


def sftp_settings_for(host: str, folder: Path) -> dict[str, object]:
    return {
        "host": host,
        "user": "pacs",
        "key_file": str(folder / "key"),
        "known_hosts": str(folder / "known hosts"),
        "timeout": 5.0,
    }


def test_a_missing_ssh_program_says_what_to_install(
    shared_sshd: Sshd, tmp_path: Path
) -> None:
    values = sftp_settings(shared_sshd, tmp_path)
    settings = read_settings(SftpSettings, values, "sftp")
    with pytest.raises(TransportError, match=r"openssh-client.*paramiko"):
        open_ssh_session(settings, ssh="ssh-not-installed-here")


def test_the_openssh_client_flushes_before_renaming_and_ends_its_ssh(
    shared_sshd: Sshd, tmp_path: Path
) -> None:
    root, local = make_root(tmp_path)
    transport = sftp_transport(shared_sshd, root, "openssh")
    flushed: list[bool] = []
    real_fsync = SftpWire.fsync

    def fsync(wire: SftpWire, handle: bytes) -> bool:
        # The partial file is flushed, and not yet renamed.
        assert (root / f"{PACK}.partial").exists() and not (root / PACK).exists()
        flushed.append(real_fsync(wire, handle))
        return flushed[-1]

    with mock.patch.object(SftpWire, "fsync", fsync):
        Mirror(transport, root, local).put(PACK, payload(MiB))
    process = transport._session.process  # type: ignore[attr-defined]
    transport.close()
    assert flushed == [True]
    assert process.poll() is not None  # ssh ended with the transport


def test_the_paramiko_client_flushes_before_renaming(
    shared_sshd: Sshd, tmp_path: Path
) -> None:
    root, local = make_root(tmp_path)
    transport = sftp_transport(shared_sshd, root, "paramiko")
    flushed: list[str] = []
    real_request = paramiko.SFTPClient._request

    def request(client: paramiko.SFTPClient, kind: int, *fields: object) -> object:
        if kind == CMD_EXTENDED and fields[0] == "fsync@openssh.com":
            # The partial file is flushed, and not yet renamed.
            assert (root / f"{PACK}.partial").exists() and not (root / PACK).exists()
            flushed.append(str(fields[0]))
        return real_request(client, kind, *fields)

    with mock.patch.object(paramiko.SFTPClient, "_request", request):
        Mirror(transport, root, local).put(PACK, payload(MiB))
    transport.close()
    # The real server answered OK: an "unsupported" or failed flush raises.
    assert flushed == ["fsync@openssh.com"]
    assert (root / PACK).read_bytes() == payload(MiB)


def test_a_failed_flush_is_not_committed(shared_sshd: Sshd, tmp_path: Path) -> None:
    root, local = make_root(tmp_path)
    transport = sftp_transport(shared_sshd, root, "paramiko")
    real_request = paramiko.SFTPClient._request

    def request(client: paramiko.SFTPClient, kind: int, *fields: object) -> object:
        if kind == CMD_EXTENDED and fields[0] == "fsync@openssh.com":
            raise OSError("Failure")
        return real_request(client, kind, *fields)

    with (
        mock.patch.object(paramiko.SFTPClient, "_request", request),
        pytest.raises(TransportError, match="Failure"),
    ):
        Mirror(transport, root, local).put(PACK, payload(MiB))
    transport.close()
    assert not (root / PACK).exists()


def test_key_files_in_a_folder_with_a_space(shared_sshd: Sshd, tmp_path: Path) -> None:
    root, local = make_root(tmp_path)
    keys = tmp_path / "mirror keys"
    keys.mkdir()
    for name in ("user_ed25519", "known_hosts"):
        source = shared_sshd.folder / name
        (keys / name).write_bytes(source.read_bytes())
        (keys / name).chmod(0o600)
    values = sftp_settings(
        shared_sshd,
        root,
        key_file=str(keys / "user_ed25519"),
        known_hosts=str(keys / "known_hosts"),
    )
    with open_transport("sftp", values) as transport:
        assert Mirror(transport, root, local).put(PACK, b"pack") == 4


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = [backoff_delay(n, 1.0, 60.0) for n in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0


# -- the SFTP mirror's failures ---------------------------------------------------


def wait_for_size(path: Path, size: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {size} bytes")


def test_sshd_killed_mid_upload_then_restarted(sshd: Sshd, sftp_mirror: Mirror) -> None:
    data = payload(8 * MiB)
    partial = sftp_mirror.root / f"{PACK}.partial"

    def kill_after_3_mib(count: int) -> None:
        if sum(sftp_mirror.sent) >= 3 * MiB and sshd.process is not None:
            wait_for_size(partial, MiB)
            sshd.kill()

    with pytest.raises(TransportError, match="after 3 attempts"):
        sftp_mirror.put(PACK, data, throttle=kill_after_3_mib)
    # Nothing incomplete carries the name.
    assert sftp_mirror.files() == [f"{PACK}.partial"]
    partial_size = partial.stat().st_size
    assert MiB <= partial_size < len(data)

    sshd.start()
    sent = sftp_mirror.put(PACK, data)
    assert sent == len(data) - partial_size
    assert sftp_mirror.read(PACK) == data
    assert sftp_mirror.files() == [PACK]


def test_a_connection_lost_mid_upload_is_resumed_in_the_same_put(
    sshd: Sshd, sftp_mirror: Mirror, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(6 * MiB)
    partial = sftp_mirror.root / f"{PACK}.partial"
    killed: list[int] = []

    def kill_sessions_once(count: int) -> None:
        if sum(sftp_mirror.sent) >= 2 * MiB and not killed:
            wait_for_size(partial, MiB)
            killed.extend(sshd.session_pids())
            sshd.kill_sessions()

    with caplog.at_level(logging.INFO, logger="appliance.replication"):
        sftp_mirror.put(PACK, data, throttle=kill_sessions_once)
    assert killed
    assert sftp_mirror.read(PACK) == data
    assert sftp_mirror.files() == [PACK]
    # The second attempt went on from what the partial file held.
    resumed = [r.args for r in caplog.records if r.msg.startswith("mirror: resuming")]
    assert len(resumed) == 1
    assert MiB <= resumed[0][1] < len(data)  # type: ignore[index]


def test_a_replaced_host_key_is_refused(
    sshd: Sshd, sftp_mirror: Mirror, client: str
) -> None:
    sftp_mirror.put(PACK, b"before")
    sshd.stop()
    sshd.replace_host_key()
    sshd.start()

    started = time.monotonic()
    with pytest.raises(HostKeyError) as caught:
        sftp_mirror.put("packs/124/p-000000124.pack", b"after")
    assert time.monotonic() - started < 3  # not retried
    message = str(caught.value)
    assert "SHA256:" in message and str(sshd.known_hosts) in message
    assert "intercepting" in message and "replace" in message
    assert sftp_mirror.files() == [PACK]

    with (
        sftp_transport(sshd, sftp_mirror.root, client) as fresh,
        pytest.raises(HostKeyError, match="pins"),
    ):
        fresh.list()


def test_an_unknown_host_is_refused(sshd: Sshd, tmp_path: Path, client: str) -> None:
    root, _local = make_root(tmp_path)
    sshd.known_hosts.write_text("")
    with (
        sftp_transport(sshd, root, client) as transport,
        pytest.raises(HostKeyError, match="does not list") as caught,
    ):
        transport.list()
    assert "SHA256:" in str(caught.value)

    sshd.known_hosts.unlink()
    with (
        sftp_transport(sshd, root, client) as transport,
        pytest.raises(HostKeyError, match="known_hosts"),
    ):
        transport.list()


def test_a_refused_key_says_where_to_add_it(
    sshd: Sshd, tmp_path: Path, client: str
) -> None:
    root, _local = make_root(tmp_path)
    sshd.authorized_keys.write_text("")
    with (
        sftp_transport(sshd, root, client) as transport,
        pytest.raises(TransportError, match="authorized_keys") as caught,
    ):
        transport.list()
    assert not isinstance(caught.value, HostKeyError)


def test_a_stalled_upload_is_cut_off(sshd: Sshd, tmp_path: Path, client: str) -> None:
    root, local = make_root(tmp_path)
    transport = sftp_transport(sshd, root, client, stall_timeout=0.5, retries=0)
    mirror = Mirror(transport, root, local)

    frozen: list[int] = []

    def stall_after_a_block(count: int) -> None:
        if mirror.sent and not frozen:
            # Writes are sent ahead of their answers: let the first block land.
            wait_for_size(root / f"{PACK}.partial", MiB // 2)
            frozen.extend(sshd.session_pids())
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    try:
        with transport:
            started = time.monotonic()
            with pytest.raises(StalledTransferError, match=r"no progress for 0\.5 s"):
                mirror.put(PACK, payload(4 * MiB), throttle=stall_after_a_block)
            assert time.monotonic() - started < 10
    finally:
        _thaw(frozen)
    again = sftp_transport(sshd, root, client)
    with again:
        assert again.list() == []
        # The next attempt resumes what the stalled one left.
        resumed = Mirror(again, root, local)
        assert resumed.put(PACK, payload(4 * MiB)) < 4 * MiB
        assert resumed.read(PACK) == payload(4 * MiB)


def _thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_waiting_for_the_bandwidth_limiter_is_not_a_stall(
    sshd: Sshd, tmp_path: Path, client: str
) -> None:
    root, local = make_root(tmp_path)
    transport = sftp_transport(sshd, root, client, stall_timeout=0.5, retries=0)
    mirror = Mirror(transport, root, local)

    def slow_limiter(count: int) -> None:
        time.sleep(0.8)  # longer than stall_timeout, per block

    with transport:
        assert mirror.put(PACK, payload(3 * MiB), throttle=slow_limiter) == 3 * MiB
        assert mirror.read(PACK) == payload(3 * MiB)


def test_a_server_that_stops_reading_is_cut_off(
    sshd: Sshd, tmp_path: Path, client: str
) -> None:
    root, local = make_root(tmp_path)
    # A long socket timeout: only the stall watchdog can end this quickly.
    transport = sftp_transport(
        sshd, root, client, timeout=60.0, stall_timeout=1.0, retries=0
    )
    mirror = Mirror(transport, root, local)
    frozen: list[int] = []

    def freeze_the_server(count: int) -> None:
        if sum(mirror.sent) >= 2 * MiB and not frozen:
            frozen.extend(sshd.session_pids())
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    try:
        with transport:
            started = time.monotonic()
            with pytest.raises(StalledTransferError):
                mirror.put(PACK, payload(16 * MiB), throttle=freeze_the_server)
            assert time.monotonic() - started < 15
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert frozen
    assert not (root / PACK).exists()


def test_a_single_stall_is_resumed_in_the_same_put(
    sshd: Sshd, tmp_path: Path, client: str
) -> None:
    root, local = make_root(tmp_path)
    transport = sftp_transport(sshd, root, client, stall_timeout=0.5, retries=2)
    mirror = Mirror(transport, root, local)
    stalls = []

    def stall_once(count: int) -> None:
        if sum(mirror.sent) >= 2 * MiB and not stalls:
            # Freeze this session's server processes; a new connection gets
            # new ones, so the resumed upload goes through.
            stalls.extend(sshd.session_pids())
            for pid in stalls:
                os.kill(pid, signal.SIGSTOP)

    try:
        with transport:
            mirror.put(PACK, payload(4 * MiB), throttle=stall_once)
            assert stalls
            assert mirror.read(PACK) == payload(4 * MiB)
    finally:
        _thaw(stalls)


def test_reconnects_with_backoff_until_the_server_is_back(
    sshd: Sshd, tmp_path: Path, client: str
) -> None:
    root, local = make_root(tmp_path)
    sshd.stop()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            sshd.start()
        time.sleep(seconds)

    transport = sftp_transport(
        sshd, root, client, sleep=sleep, retries=6, backoff=0.1, backoff_max=0.3
    )
    with transport:
        Mirror(transport, root, local).put(PACK, b"pack bytes")
        assert waits == [0.1, 0.2, 0.3]
        assert b"".join(transport.get(PACK)) == b"pack bytes"


def test_gives_up_when_the_server_stays_down(
    sshd: Sshd, tmp_path: Path, client: str
) -> None:
    root, _local = make_root(tmp_path)
    sshd.stop()
    waits: list[float] = []
    transport = sftp_transport(sshd, root, client, sleep=waits.append, retries=3)
    with transport, pytest.raises(TransportError, match="after 4 attempts"):
        transport.size(PACK)
    assert waits == [0.05, 0.1, 0.2]


def test_a_refused_connection_is_reported_in_ssh_words(
    shared_sshd: Sshd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, _local = make_root(tmp_path)
    waits: list[float] = []

    # Held, never listening: a connection to it is refused. ssh's exit then
    # resets the socket this side reads, which is not the reason to report.
    with held_port() as nothing_listens:
        port = nothing_listens.port
        transport = sftp_transport(
            shared_sshd, root, "openssh", sleep=waits.append, port=port, retries=1
        )
        with (
            caplog.at_level(logging.WARNING, logger="appliance.replication"),
            transport,
            pytest.raises(TransportError, match="after 2 attempts") as caught,
        ):
            transport.size(PACK)

    said = f"connect to host 127.0.0.1 port {port}: Connection refused"
    message = str(caught.value)
    assert said in message
    assert "reset by peer" not in message and "\n" not in message
    assert waits == [0.05]  # still tried again: the mirror may come back
    retried = [r.getMessage() for r in caplog.records if "trying again" in r.msg]
    assert len(retried) == 1 and said in retried[0]


def test_a_download_continues_after_the_connection_is_lost(
    sshd: Sshd, sftp_mirror: Mirror
) -> None:
    data = payload(24 * MiB)
    (sftp_mirror.root / "packs").mkdir()
    (sftp_mirror.root / "packs" / "big.pack").write_bytes(data)
    received = bytearray()
    for chunk in sftp_mirror.transport.get("packs/big.pack"):
        received += chunk
        if len(received) == 2 * MiB:
            sshd.kill_sessions()
    assert bytes(received) == data


def test_paramikos_read_cut_short_by_a_lost_connection_is_not_a_shrunk_file(
    sshd: Sshd, tmp_path: Path
) -> None:
    # paramiko reads an EOFError from a dropped connection as the file's end
    # and returns no bytes: seen once in a run, made certain here.
    root, _local = make_root(tmp_path)
    data = payload(6 * MiB)
    (root / "packs").mkdir()
    (root / "packs" / "big.pack").write_bytes(data)
    real = paramiko.SFTPFile.read
    cut: list[int] = []

    def read(file: paramiko.SFTPFile, size: int | None = None) -> bytes:
        if not cut and file.tell() >= 2 * MiB:
            cut.append(file.tell())
            sshd.kill_sessions()
            return b""
        return real(file, size)

    transport = sftp_transport(sshd, root, "paramiko", sleep=lambda _s: None)
    with transport, mock.patch.object(paramiko.SFTPFile, "read", read):
        assert b"".join(transport.get("packs/big.pack")) == data
    assert cut


def test_paramikos_read_of_a_file_that_shrank_says_so(
    sshd: Sshd, tmp_path: Path
) -> None:
    root, _local = make_root(tmp_path)
    (root / "packs").mkdir()
    pack = root / "packs" / "big.pack"
    pack.write_bytes(payload(6 * MiB))
    received = 0
    transport = sftp_transport(sshd, root, "paramiko")
    with transport, pytest.raises(TransportError, match="shrank"):
        for chunk in transport.get("packs/big.pack"):
            received += len(chunk)
            if received >= 2 * MiB and pack.stat().st_size > MiB:
                os.truncate(pack, MiB)


def test_operations_share_one_connection(sshd: Sshd, sftp_mirror: Mirror) -> None:
    for number in range(5):
        sftp_mirror.put(f"journal/{number:012d}", payload(10, seed=number))
        sftp_mirror.transport.list()
    # sshd forks a monitor and a session process per connection.
    assert len(sshd.session_pids()) <= 2
