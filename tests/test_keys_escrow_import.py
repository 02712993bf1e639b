"""``appliance keys import`` as a disaster-recovery team runs it: what it
says when the key store already had a current key of its own (the service
was started before the import, or another escrow was imported first), and
when the file given is no escrow text at all."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.storage.keys import (
    ESCROW_TITLE,
    KeyStore,
    MasterKey,
    key_store_path,
)
from tests.read_only import read_only

_COMMAND = (sys.executable, "-m", "appliance")


def keys(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_COMMAND, "keys", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def escrow_of_another_archive(tmp_path: Path) -> tuple[Path, str]:
    """An escrow text, and the id of its current key."""
    key = MasterKey.generate()
    store = KeyStore(tmp_path / "lost" / "master.keys", {key.key_id: key}, key.key_id)
    path = tmp_path / "escrow.txt"
    path.write_text(store.export_escrow())
    return path, key.key_id


def test_importing_into_a_new_store_takes_the_escrows_current_key(
    tmp_path: Path,
) -> None:
    escrow, escrowed = escrow_of_another_archive(tmp_path)

    done = keys(tmp_path / "data", "import", str(escrow))

    assert done.returncode == 0, done.stderr
    assert f"current {escrowed}" in done.stdout
    assert "export" not in done.stdout + done.stderr


def test_a_current_key_the_escrow_lacks_is_named_with_what_to_do(
    tmp_path: Path,
) -> None:
    """New packs go under the store's own current key: an escrow without
    it could not read them after the next disaster."""
    data_dir = tmp_path / "data"
    made = keys(data_dir, "init")
    assert made.returncode == 0, made.stderr
    own = KeyStore.load(key_store_path(data_dir)).current_id
    escrow, _escrowed = escrow_of_another_archive(tmp_path)

    done = keys(data_dir, "import", str(escrow))

    assert done.returncode == 0, done.stderr
    assert KeyStore.load(key_store_path(data_dir)).current_id == own
    warning = done.stderr
    assert own in warning and str(escrow) in warning
    assert "appliance keys export" in warning


def test_an_import_over_a_damaged_store_says_how_to_rebuild_it(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    assert keys(data_dir, "init").returncode == 0
    store = key_store_path(data_dir)
    store.write_text("")
    escrow, escrowed = escrow_of_another_archive(tmp_path)

    refused = keys(data_dir, "import", str(escrow))
    store.rename(store.with_name("master.keys.damaged"))
    rebuilt = keys(data_dir, "import", str(escrow))

    assert refused.returncode == 1
    assert f"move {store} aside" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert KeyStore.load(store).current_id == escrowed


def test_a_file_that_is_not_text_is_refused_plainly(tmp_path: Path) -> None:
    binary = tmp_path / "escrow.bin"
    binary.write_bytes(bytes(range(256)))

    done = keys(tmp_path / "data", "import", str(binary))

    assert done.returncode == 1
    assert "not an escrow text" in done.stderr
    assert "codec" not in done.stderr


def test_a_missing_file_is_named_without_errno(tmp_path: Path) -> None:
    missing = tmp_path / "escrow.txt"

    done = keys(tmp_path / "data", "import", str(missing))

    assert done.returncode == 1
    assert str(missing) in done.stderr and "no such file" in done.stderr.lower()
    assert "Errno" not in done.stderr


def test_init_says_once_that_the_key_is_made(tmp_path: Path) -> None:
    """The command explains the escrow itself; the log's warning for a key
    made unasked (by the service's first start) would say it twice."""
    made = keys(tmp_path / "data", "init")

    assert made.returncode == 0, made.stderr
    key_id = KeyStore.load(key_store_path(tmp_path / "data")).current_id
    said = made.stdout + made.stderr
    assert said.count(key_id) == 1, said
    assert "appliance keys export" in made.stdout


def _export_to(data_dir: Path, **how: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_COMMAND, "keys", "export", "--data-dir", str(data_dir)],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        **how,  # type: ignore[call-overload]
    )


def test_an_export_to_a_full_disk_fails_in_one_line(tmp_path: Path) -> None:
    """``keys export > escrow.txt`` on a full disk leaves an escrow cut
    short: the command must fail, not leave a traceback or exit 0."""
    assert keys(tmp_path / "data", "init").returncode == 0

    with open("/dev/full", "w") as full:
        done = _export_to(tmp_path / "data", stdout=full)

    assert done.returncode == 1
    assert done.stderr.startswith("cannot write the escrow text: No space left")
    assert done.stderr.count("\n") == 1, done.stderr


def test_an_export_with_standard_output_closed_fails(tmp_path: Path) -> None:
    assert keys(tmp_path / "data", "init").returncode == 0

    done = _export_to(tmp_path / "data", preexec_fn=lambda: os.close(1))

    assert done.returncode == 1
    assert "standard output is closed" in done.stderr


@pytest.mark.parametrize("source", ["/dev/zero", "large"])
def test_a_device_or_a_large_file_is_refused_without_reading_it_all(
    tmp_path: Path, source: str
) -> None:
    """An escrow is a few hundred bytes: reading /dev/zero to its end
    would fill the memory."""
    if source == "large":
        large = tmp_path / "escrow.txt"
        large.write_text(ESCROW_TITLE + "\n" + "#\n" * (3 << 20))
        source = str(large)

    done = keys(tmp_path / "data", "import", source)

    assert done.returncode == 1
    assert done.stderr == (
        f"cannot import {source}: not an escrow text: larger than 4 MiB (an "
        "escrow text holds about 100 bytes per master key)\n"
    )
    assert not key_store_path(tmp_path / "data").exists()


def test_a_rotation_on_a_read_only_key_folder_fails_in_one_line(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    assert keys(data_dir, "init").returncode == 0
    before = key_store_path(data_dir).read_bytes()

    with read_only(key_store_path(data_dir).parent):
        done = keys(data_dir, "rotate")

    assert done.returncode == 1
    assert done.stderr == (
        "cannot rotate the master key: cannot open the key folder "
        f"{key_store_path(data_dir).parent}: Read-only file system\n"
    )
    assert key_store_path(data_dir).read_bytes() == before


def _owners(folder: Path) -> set[tuple[int, int]]:
    every = [folder, *folder.iterdir()]
    return {(path.stat().st_uid, path.stat().st_gid) for path in every}


def test_root_rotating_the_services_keys_leaves_them_the_services(
    tmp_path: Path,
) -> None:
    """The store is owner-only: rewritten as root's, the service's own
    user could read it no more, and the service would stop."""
    if os.geteuid() != 0:
        pytest.skip("needs root, as an administrator's sudo is")
    data_dir = tmp_path / "data"
    assert keys(data_dir, "init").returncode == 0
    folder = key_store_path(data_dir).parent
    for path in [folder, *folder.iterdir()]:
        os.chown(path, 12345, 12346)

    done = keys(data_dir, "rotate")

    assert done.returncode == 0, done.stderr
    assert _owners(folder) == {(12345, 12346)}


def test_root_importing_into_the_services_data_folder_leaves_it_the_services(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, as an administrator's sudo is")
    escrow, _escrowed = escrow_of_another_archive(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chown(data_dir, 12345, 12346)

    done = keys(data_dir, "import", str(escrow))

    assert done.returncode == 0, done.stderr
    assert _owners(key_store_path(data_dir).parent) == {(12345, 12346)}


def test_an_export_to_a_file_others_may_read_makes_it_owner_only(
    tmp_path: Path,
) -> None:
    """``keys export > escrow.txt`` under the usual umask 022."""
    assert keys(tmp_path / "data", "init").returncode == 0
    escrow = tmp_path / "escrow.txt"
    escrow.touch(mode=0o644)
    escrow.chmod(0o644)

    with open(escrow, "w") as output:
        done = _export_to(tmp_path / "data", stdout=output)

    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(escrow.stat().st_mode) == 0o600
    assert "made 0600" in done.stderr
    assert escrow.read_text().startswith(ESCROW_TITLE)
