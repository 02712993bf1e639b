"""Sealed files (catalog snapshots, journal segments): round trips, and every
kind of damage fails with a clear error."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.storage import sealed
from appliance.storage.keys import KeyStore


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore.create_if_missing(tmp_path_factory.mktemp("keys") / "master.keys")


def _seal(data: bytes, keys: KeyStore, name: str = "catalog/snapshot-000001") -> bytes:
    out = io.BytesIO()
    sealed.seal(io.BytesIO(data), out, name, keys)
    return out.getvalue()


def _open(blob: bytes, keys: KeyStore, name: str = "catalog/snapshot-000001") -> bytes:
    out = io.BytesIO()
    sealed.open_sealed(io.BytesIO(blob), name, keys, out)
    return out.getvalue()


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=5000))
def test_round_trip(keys: KeyStore, data: bytes) -> None:
    assert _open(_seal(data, keys), keys) == data


def test_large_blob_spans_chunks(keys: KeyStore) -> None:
    data = os.urandom(3 * sealed.CHUNK + 12345)

    blob = _seal(data, keys)

    assert len(blob) > 3 * sealed.CHUNK
    assert _open(blob, keys) == data


def test_no_clear_text_on_the_mirror(keys: KeyStore) -> None:
    blob = _seal(b"KALDOR^MIRTA 1.2.826.0.1.3680043.10.1009.5" * 100, keys)

    assert b"KALDOR" not in blob and b"1.2.826" not in blob


@pytest.mark.parametrize("where", [0.2, 0.5, 0.99])
def test_a_flipped_byte_is_detected(keys: KeyStore, where: float) -> None:
    blob = bytearray(_seal(os.urandom(2 * sealed.CHUNK), keys))
    blob[int(len(blob) * where)] ^= 0x01

    with pytest.raises(sealed.SealedFileError):
        _open(bytes(blob), keys)


def test_cut_short_is_detected(keys: KeyStore) -> None:
    blob = _seal(os.urandom(2 * sealed.CHUNK), keys)

    with pytest.raises(sealed.SealedFileError, match=r"cut short|fails its check"):
        _open(blob[: sealed.CHUNK + 100], keys)


def test_dropped_last_chunk_is_detected(keys: KeyStore) -> None:
    data = os.urandom(sealed.CHUNK * 2)
    blob = _seal(data, keys)
    # Drop everything after the first chunk: the first chunk is not "last".
    header_end = blob.index(b"}") + 1
    first_length = int.from_bytes(blob[header_end : header_end + 4], "big")
    truncated = blob[: header_end + 4 + 12 + first_length]

    with pytest.raises(sealed.SealedFileError, match="cut short"):
        _open(truncated, keys)


def test_renamed_file_is_detected(keys: KeyStore) -> None:
    blob = _seal(b"journal", keys, name="journal/000000001")

    with pytest.raises(sealed.SealedFileError, match="renamed"):
        _open(blob, keys, name="journal/000000002")


def test_missing_master_key_is_a_clear_error(keys: KeyStore, tmp_path: Path) -> None:
    other = KeyStore.create_if_missing(tmp_path / "other.keys")
    blob = _seal(b"secret", keys)

    with pytest.raises(Exception, match="master key"):
        _open(blob, other)


def test_seal_file_reports_the_written_digest(keys: KeyStore, tmp_path: Path) -> None:
    import hashlib

    source = tmp_path / "in"
    source.write_bytes(b"x" * 10_000)
    destination = tmp_path / "out"

    digest = sealed.seal_file(source, destination, "catalog/snapshot-000002", keys)

    assert digest == hashlib.sha256(destination.read_bytes()).hexdigest()
