"""Tests for the master key store and the wrapping of data keys."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import KeyStoreError, MissingKeyError
from appliance.storage.keys import (
    ESCROW_TITLE,
    WRAPPED_KEY_BYTES,
    KeyStore,
    MasterKey,
    import_escrow,
    key_id_of,
    key_store_path,
    parse_escrow,
)

# Known answers, computed once by hand from the documented construction; a
# change here means keys or packs written earlier no longer open.
KAT_MASTER = bytes(range(32))
KAT_MASTER_ID = "d6515e0d"
KAT_DATA_KEY = bytes(range(100, 132))
KAT_WRAPPED = bytes.fromhex(
    "c8c9cacbcccdcecfd0d1d2d3751d07bceea5914b185171d16e77996794f29a"
    "df7c12d25f91d4459e5a10296aedb88255d0c17dca9fdb1950671382e5"
)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return key_store_path(tmp_path / "data")


def kat_store(path: Path) -> KeyStore:
    key = MasterKey(KAT_MASTER_ID, KAT_MASTER, "2026-01-15T10:15:00Z")
    return KeyStore(path, {key.key_id: key}, key.key_id)


def test_key_ids_are_derived_from_the_key():
    assert key_id_of(KAT_MASTER) == KAT_MASTER_ID
    assert key_id_of(bytes(32)) == "cd38c63b"


def test_a_known_wrapped_data_key_opens(store_path: Path):
    data_key = kat_store(store_path).unwrap(KAT_MASTER_ID, KAT_WRAPPED)

    assert data_key.secret == KAT_DATA_KEY
    assert data_key.master_key_id == KAT_MASTER_ID


def test_the_wrapping_is_plain_aes_gcm_as_documented():
    nonce, sealed = KAT_WRAPPED[:12], KAT_WRAPPED[12:]
    aad = b"pacs-appliance data key\x00" + KAT_MASTER_ID.encode()

    assert AESGCM(KAT_MASTER).decrypt(nonce, sealed, aad) == KAT_DATA_KEY


def test_create_if_missing_makes_a_private_store_once(store_path: Path):
    first = KeyStore.create_if_missing(store_path)
    again = KeyStore.create_if_missing(store_path)

    assert again.current_id == first.current_id
    assert again.current.secret == first.current.secret
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store_path.parent.stat().st_mode) == 0o700
    assert [p.name for p in store_path.parent.iterdir() if p.name.startswith(".")] == []


def test_the_store_file_is_documented_json(store_path: Path):
    store = KeyStore.create_if_missing(store_path)

    document = json.loads(store_path.read_text())

    assert document["format"] == "pacs-appliance-master-keys"
    assert document["version"] == 1
    assert document["current"] == store.current_id
    (entry,) = document["keys"]
    assert bytes.fromhex(entry["key"]) == store.current.secret
    assert entry["id"] == key_id_of(store.current.secret)


def test_a_store_others_can_read_is_refused(store_path: Path):
    KeyStore.create_if_missing(store_path)
    os.chmod(store_path, 0o644)

    with pytest.raises(KeyStoreError, match="chmod 600"):
        KeyStore.load(store_path)


def test_rotation_keeps_older_keys_and_stays_private(store_path: Path):
    store = KeyStore.create_if_missing(store_path)
    old = store.current
    old_data_key = store.new_data_key()

    new = store.rotate()

    reloaded = KeyStore.load(store_path)
    assert reloaded.current_id == new.key_id != old.key_id
    assert set(reloaded.keys) == {old.key_id, new.key_id}
    assert reloaded.new_data_key().master_key_id == new.key_id
    opened = reloaded.unwrap(old.key_id, old_data_key.wrapped)
    assert opened.secret == old_data_key.secret
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_store_in_a_folder_others_can_write_is_refused(store_path: Path, mode):
    """Another user could delete the store, or rename a key of their own
    over it: the next start would make, or take, a key no escrow holds."""
    KeyStore.create_if_missing(store_path)
    os.chmod(store_path.parent, mode)

    with pytest.raises(KeyStoreError, match=f"mode {mode:04o}.*chmod 700"):
        KeyStore.load(store_path)


def test_no_store_is_made_in_a_folder_others_can_write(store_path: Path) -> None:
    """The first key is not made where the next read would refuse it."""
    store_path.parent.mkdir(parents=True)
    os.chmod(store_path.parent, 0o777)

    with pytest.raises(KeyStoreError, match=r"mode 0777.*chmod 700"):
        KeyStore.create_if_missing(store_path)

    assert list(store_path.parent.iterdir()) == [
        store_path.with_name(f"{store_path.name}.lock")
    ]


def test_a_write_cut_short_leaves_no_copy_of_the_keys_behind(store_path: Path):
    """A temporary copy of the store that a killed writer left holds every
    key: the next change removes it."""
    store = KeyStore.create_if_missing(store_path)
    leftover = store_path.with_name(f".{store_path.name}.0badf00d.tmp")
    leftover.write_text(store_path.read_text())

    store.rotate()

    assert sorted(p.name for p in store_path.parent.iterdir()) == [
        "master.keys",
        "master.keys.lock",
    ]


def test_a_folder_in_the_stores_place_is_named_as_such(store_path: Path):
    store_path.mkdir(parents=True)

    with pytest.raises(KeyStoreError, match="is not a file"):
        KeyStore.load(store_path)


def test_rotation_keeps_keys_another_process_added(store_path: Path):
    mine = KeyStore.create_if_missing(store_path)
    theirs = KeyStore.load(store_path)
    added_elsewhere = theirs.rotate()

    mine.rotate()

    assert added_elsewhere.key_id in KeyStore.load(store_path).keys


def test_data_keys_are_fresh_and_wrapped_under_the_current_key(store_path: Path):
    store = KeyStore.create_if_missing(store_path)

    first, second = store.new_data_key(), store.new_data_key()

    assert first.secret != second.secret
    assert len(first.wrapped) == WRAPPED_KEY_BYTES
    assert first.master_key_id == store.current_id
    assert store.unwrap(first.master_key_id, first.wrapped).secret == first.secret


def test_an_unknown_master_key_id_is_named(store_path: Path):
    store = KeyStore.create_if_missing(store_path)
    wrapped = store.new_data_key().wrapped

    with pytest.raises(MissingKeyError, match="master key 0badc0de") as caught:
        store.unwrap("0badc0de", wrapped)
    assert caught.value.key_id == "0badc0de"


@settings(max_examples=60)
@given(position=st.integers(0, WRAPPED_KEY_BYTES - 1), mask=st.integers(1, 255))
def test_a_flipped_byte_in_a_wrapped_key_is_detected(
    tmp_path_factory: pytest.TempPathFactory, position: int, mask: int
):
    store = kat_store(tmp_path_factory.mktemp("k") / "master.keys")
    damaged = bytearray(KAT_WRAPPED)
    damaged[position] ^= mask

    with pytest.raises(KeyStoreError, match="does not open"):
        store.unwrap(KAT_MASTER_ID, bytes(damaged))


def test_a_wrapped_key_is_bound_to_its_master_key_id(store_path: Path):
    store = KeyStore.create_if_missing(store_path)
    data_key = store.new_data_key()
    other = store.rotate()
    # Same master key bytes under another id: the associated data differs.
    forged = MasterKey(other.key_id, store.keys[data_key.master_key_id].secret, "x")
    store.keys[other.key_id] = forged

    with pytest.raises(KeyStoreError, match="does not open"):
        store.unwrap(other.key_id, data_key.wrapped)


def test_a_key_that_does_not_match_its_id_is_refused(store_path: Path):
    KeyStore.create_if_missing(store_path)
    document = json.loads(store_path.read_text())
    document["keys"][0]["key"] = "00" * 32
    store_path.write_text(json.dumps(document))

    with pytest.raises(KeyStoreError, match="does not match its id"):
        KeyStore.load(store_path)


def test_a_damaged_store_file_is_reported(store_path: Path):
    KeyStore.create_if_missing(store_path)
    store_path.write_text("{not json")

    with pytest.raises(KeyStoreError, match="damaged"):
        KeyStore.load(store_path)


def test_a_missing_store_is_reported(store_path: Path):
    with pytest.raises(KeyStoreError, match="no key store"):
        KeyStore.load(store_path)


@settings(max_examples=30, deadline=None)
@given(
    secrets=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=5),
    data=st.data(),
)
def test_escrow_text_round_trips(
    tmp_path_factory: pytest.TempPathFactory, secrets: list[bytes], data: st.DataObject
):
    keys = {
        key_id_of(s): MasterKey(key_id_of(s), s, "2026-01-15T10:15:00Z")
        for s in secrets
    }
    current = data.draw(st.sampled_from(sorted(keys)))
    store = KeyStore(tmp_path_factory.mktemp("k") / "master.keys", keys, current)

    parsed, parsed_current = parse_escrow(store.export_escrow())

    assert parsed_current == current
    assert {k.key_id: k.secret for k in parsed} == {
        k: v.secret for k, v in keys.items()
    }


def test_escrow_import_rebuilds_a_store_on_new_hardware(tmp_path: Path):
    old = KeyStore.create_if_missing(key_store_path(tmp_path / "old"))
    old.rotate()
    escrow = old.export_escrow()

    rebuilt = import_escrow(key_store_path(tmp_path / "new"), escrow)

    assert rebuilt.current_id == old.current_id
    assert {k: v.secret for k, v in rebuilt.keys.items()} == {
        k: v.secret for k, v in old.keys.items()
    }
    assert stat.S_IMODE(rebuilt.path.stat().st_mode) == 0o600


def test_escrow_import_into_a_store_keeps_its_current_key(tmp_path: Path):
    escrowed = KeyStore.create_if_missing(key_store_path(tmp_path / "old"))
    store = KeyStore.create_if_missing(key_store_path(tmp_path / "new"))

    merged = import_escrow(store.path, escrowed.export_escrow())

    assert merged.current_id == store.current_id
    assert set(KeyStore.load(store.path).keys) == {
        store.current_id,
        escrowed.current_id,
    }


def test_escrow_text_is_readable_and_forgiving_of_case(store_path: Path):
    store = kat_store(store_path)
    text = store.export_escrow()

    assert text.splitlines()[0] == ESCROW_TITLE
    assert "0001020304050607" not in text  # printed in groups of 8 digits
    assert "00010203 04050607" in text
    (key,), current = parse_escrow(
        text.upper().replace(ESCROW_TITLE.upper(), ESCROW_TITLE)
    )
    assert key.secret == KAT_MASTER
    assert current == KAT_MASTER_ID


def test_escrow_text_saved_with_a_byte_order_mark_is_read(store_path: Path):
    """Typed back from paper in Notepad, saved as UTF-8 with its BOM."""
    text = "\ufeff" + kat_store(store_path).export_escrow().replace("\n", "\r\n")

    (key,), current = parse_escrow(text)

    assert key.secret == KAT_MASTER
    assert current == KAT_MASTER_ID


def test_a_mistyped_escrow_key_names_its_line(store_path: Path):
    text = kat_store(store_path).export_escrow()
    mistyped = text.replace("00010203", "00010204")

    with pytest.raises(KeyStoreError, match=r"escrow line 4: .*mistyped"):
        parse_escrow(mistyped)


def test_escrow_text_needs_exactly_one_current_key(store_path: Path):
    text = kat_store(store_path).export_escrow().replace("current ", "previous")

    with pytest.raises(KeyStoreError, match="exactly one key current"):
        parse_escrow(text)


def test_text_that_is_not_an_escrow_is_refused():
    with pytest.raises(KeyStoreError, match="not an escrow text"):
        parse_escrow("hello\n")


def test_a_running_store_sees_a_rotation_made_by_another_process(tmp_path) -> None:
    path = tmp_path / "keys" / "master.keys"
    service = KeyStore.create_if_missing(path)
    first = service.current.key_id
    wrapped_before = service.new_data_key()

    command_line = KeyStore.load(path)
    time.sleep(0.01)  # a distinct modification time on coarse clocks
    new = command_line.rotate()
    data_key = command_line.new_data_key()

    assert service.current.key_id == new.key_id != first
    assert service.unwrap(data_key.master_key_id, data_key.wrapped).secret == (
        data_key.secret
    )
    assert service.unwrap(first, wrapped_before.wrapped).secret == wrapped_before.secret
