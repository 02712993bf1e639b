"""Tests for study packs: round trips, tar and zstd compatibility, tampering.

Contents are random bytes, generated instances or pydicom's sample files;
every patient name is made up.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from appliance.errors import (
    DamagedPackError,
    KeyStoreError,
    MissingKeyError,
    PackError,
    SourceMismatchError,
)
from appliance.storage.keys import KeyStore, key_id_of, key_store_path
from appliance.storage.packs import (
    DEFAULT_RECORD_SIZE,
    TAPE_RECORD_SIZE,
    InstanceMeta,
    PackReader,
    PackSummary,
    PackWriter,
    sealing,
    write_pack_file,
)
from appliance.storage.packs import tar as tar_layer
from appliance.storage.packs.manifest import PackHeader

STUDY = "1.2.826.0.1.3680043.10.1009.7"
SERIES = STUDY + ".1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PATIENT = {"PatientName": "KALDORVIS^MIRTA", "PatientID": "BP7730012"}
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"]


# -- helpers ------------------------------------------------------------------------


def meta_for(data: bytes, number: int, study: str = STUDY) -> InstanceMeta:
    """A made-up instance whose stored bytes are ``data``."""
    digest = hashlib.sha256(data).hexdigest()
    return InstanceMeta(
        sop_instance_uid=f"{study}.1.{number}",
        sop_class_uid=CT_IMAGE_STORAGE,
        series_uid=SERIES,
        study_uid=study,
        transfer_syntax=EXPLICIT_LE,
        size=len(data),
        sha256=digest,
        content_sha256=hashlib.sha256(data[len(data) // 2 :]).hexdigest(),
        attributes={
            "patient": PATIENT,
            "study": {"StudyDate": "20260115", "AccessionNumber": "ACC00000042"},
            "series": {"Modality": "CT", "SeriesNumber": "1"},
            "instance": {"InstanceNumber": str(number)},
        },
        received=1768470000.0 + number,
    )


def write_pack(
    contents: list[bytes],
    key_store: KeyStore | None = None,
    record_size: int = DEFAULT_RECORD_SIZE,
    pack_id: str = "p-000001",
) -> tuple[bytes, PackSummary]:
    """A pack of ``contents`` written to memory; encrypted with a key store."""
    out = io.BytesIO()
    key = key_store.new_data_key() if key_store else None
    with PackWriter(out, pack_id, STUDY, key=key, record_size=record_size) as writer:
        for number, data in enumerate(contents, start=1):
            writer.add(meta_for(data, number), io.BytesIO(data))
    assert writer.summary is not None
    return out.getvalue(), writer.summary


class Pipe(io.RawIOBase):
    """A non-seekable source that hands out short reads, like a pipe."""

    def __init__(self, data: bytes, chunk: int = 4099) -> None:
        self._data = memoryview(data)
        self._position = 0
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        size = min(len(buffer), self._chunk, len(self._data) - self._position)
        buffer[:size] = self._data[self._position : self._position + size]
        self._position += size
        return size


class Collected(dict):
    """A ``read_all`` sink keeping each member's bytes by member name."""

    def __call__(self, name: str) -> io.BytesIO:
        collected = self

        class Out(io.BytesIO):
            def close(self) -> None:
                collected[name] = self.getvalue()
                super().close()

        return Out()


def flip(data: bytes, position: int, mask: int = 0xFF) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= mask
    return bytes(damaged)


def extract(pack: bytes, uid: str, keys: KeyStore | None = None) -> bytes:
    out = io.BytesIO()
    PackReader(io.BytesIO(pack), keys).extract(uid, out)
    return out.getvalue()


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        names = " ".join(missing)
        reason = f"{names} not installed (apt-get install -y {names})"
        print(reason)
        pytest.skip(reason)


def sample_contents(count: int, size: int = 3000) -> list[bytes]:
    """Distinct, partly compressible contents."""
    return [
        hashlib.sha256(bytes([n])).digest() * (size // 64) + os.urandom(size // 2)
        for n in range(count)
    ]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore.create_if_missing(key_store_path(tmp_path_factory.mktemp("keys")))


@pytest.fixture(params=[False, True], ids=["clear", "encrypted"])
def key_store(request: pytest.FixtureRequest, keys: KeyStore) -> KeyStore | None:
    return keys if request.param else None


# -- round trips --------------------------------------------------------------------

contents_strategy = st.lists(
    st.one_of(
        st.binary(max_size=6000),
        st.builds(
            lambda b, n: b * n, st.binary(min_size=1, max_size=50), st.integers(1, 400)
        ),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    contents=contents_strategy,
    encrypted=st.booleans(),
    record_size=st.sampled_from([512, DEFAULT_RECORD_SIZE, 3 * 4096]),
)
def test_round_trip(
    keys: KeyStore, contents: list[bytes], encrypted: bool, record_size: int
):
    pack, summary = write_pack(contents, keys if encrypted else None, record_size)

    assert len(pack) == summary.bytes_written
    assert len(pack) % record_size == 0
    assert hashlib.sha256(pack).hexdigest() == summary.sha256
    reader = PackReader(io.BytesIO(pack), keys)
    manifest = reader.manifest()
    assert manifest == summary.manifest
    assert [e.meta for e in manifest.instances] == [
        meta_for(data, n) for n, data in enumerate(contents, start=1)
    ]
    for entry, data in zip(manifest.instances, contents, strict=True):
        assert extract(pack, entry.sop_instance_uid, keys) == data
    assert reader.verify().ok

    collected = Collected()
    report = PackReader(Pipe(pack), keys).read_all(collected)
    assert report.ok
    assert report.manifest == summary.manifest
    assert [collected[e.member] for e in manifest.instances] == contents


def test_pydicom_sample_files_round_trip_with_their_attributes(
    tmp_path: Path, key_store: KeyStore | None
):
    paths = [Path(get_testdata_file(name, download=False)) for name in SAMPLES]
    metas = [sample_meta(path) for path in paths]
    destination = tmp_path / "nearline" / "p-000002.pack"

    summary = write_pack_file(
        destination,
        zip(metas, paths, strict=True),
        "p-000002",
        key=key_store.new_data_key() if key_store else None,
        root=tmp_path,
    )

    with PackReader.open(destination, key_store) as reader:
        manifest = reader.manifest()
        assert manifest.study_uid is None
        for meta, path in zip(metas, paths, strict=True):
            entry = manifest.instance(meta.sop_instance_uid)
            assert entry.meta == meta
            out = tmp_path / "recalled" / f"{entry.member.split('/')[-1]}.dcm"
            reader.extract_to(entry, out, root=tmp_path)
            assert out.read_bytes() == path.read_bytes()
            dataset = pydicom.dcmread(out, stop_before_pixels=True)
            assert dataset.SOPInstanceUID == meta.sop_instance_uid
        assert reader.verify().ok
    assert summary.bytes_written == destination.stat().st_size


def sample_meta(path: Path) -> InstanceMeta:
    data = path.read_bytes()
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceMeta(
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        series_uid=str(dataset.SeriesInstanceUID),
        study_uid=str(dataset.StudyInstanceUID),
        transfer_syntax=str(dataset.file_meta.TransferSyntaxUID),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_sha256=hashlib.sha256(data).hexdigest(),
        attributes={
            "patient": {"PatientName": str(dataset.get("PatientName", ""))},
            "series": {"Modality": str(dataset.get("Modality", ""))},
        },
    )


def test_a_pack_of_no_instances_is_still_a_pack(key_store: KeyStore | None):
    pack, _ = write_pack([], key_store)

    report = PackReader(io.BytesIO(pack), key_store).verify()

    assert report.ok
    assert report.instances == []


# -- readable by tar and zstd alone -------------------------------------------------


def test_tar_lists_every_member(tmp_path: Path, key_store: KeyStore | None):
    require_tools("tar")
    pack, summary = write_pack(sample_contents(3), key_store)
    (tmp_path / "p.pack").write_bytes(pack)

    listing = subprocess.run(
        ["tar", "-tf", "p.pack"], cwd=tmp_path, capture_output=True, text=True
    )

    assert listing.returncode == 0, listing.stderr
    assert listing.stderr == ""
    assert listing.stdout.split() == [member.name for member in summary.members]
    suffix = ".zst.enc" if key_store else ".zst"
    assert listing.stdout.split() == [
        "pack.json",
        f"instances/000001.dcm{suffix}",
        f"instances/000002.dcm{suffix}",
        f"instances/000003.dcm{suffix}",
        f"manifest.json{suffix}",
        "trailer.json",
    ]


def test_tar_and_zstd_recover_an_unencrypted_pack(tmp_path: Path):
    require_tools("tar", "zstd")
    contents = sample_contents(3)
    pack, _ = write_pack(contents)
    (tmp_path / "p.pack").write_bytes(pack)

    subprocess.run(["tar", "-xf", "p.pack"], cwd=tmp_path, check=True)
    for number in (1, 2, 3):
        subprocess.run(
            ["zstd", "-q", "-d", f"instances/00000{number}.dcm.zst"],
            cwd=tmp_path,
            check=True,
        )
    subprocess.run(["zstd", "-q", "-d", "manifest.json.zst"], cwd=tmp_path, check=True)

    for number, data in enumerate(contents, start=1):
        assert (tmp_path / f"instances/00000{number}.dcm").read_bytes() == data
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [i["sop_instance_uid"] for i in manifest["instances"]] == [
        f"{STUDY}.1.{n}" for n in (1, 2, 3)
    ]
    assert manifest["instances"][0]["attributes"]["patient"] == PATIENT


def test_an_encrypted_pack_opens_with_the_documented_recipe(keys: KeyStore):
    """The steps of docs/pack-format.md, with tarfile, AESGCM and zstandard."""
    contents = sample_contents(2)
    pack, _ = write_pack(contents, keys)

    with tarfile.open(fileobj=io.BytesIO(pack)) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    header = json.loads(members["pack.json"])
    master = keys.get(header["encryption"]["master_key_id"]).secret
    wrapped = bytes.fromhex(header["encryption"]["wrapped_data_key"])
    key_aad = (
        b"pacs-appliance data key\x00" + header["encryption"]["master_key_id"].encode()
    )
    data_key = AESGCM(master).decrypt(wrapped[:12], wrapped[12:], key_aad)

    def open_member(name: str) -> bytes:
        blob = members[name]
        aad = (
            b"pacs-appliance-pack/1\x00"
            + header["pack_id"].encode()
            + b"\x00"
            + name.encode()
        )
        frame = AESGCM(data_key).decrypt(blob[:12], blob[12:], aad)
        return zstandard.ZstdDecompressor().decompress(frame)

    manifest = json.loads(open_member("manifest.json.zst.enc"))
    for entry, data in zip(manifest["instances"], contents, strict=True):
        recovered = open_member(entry["member"])
        assert recovered == data
        assert hashlib.sha256(recovered).hexdigest() == entry["sha256"]


def test_no_uid_or_patient_data_is_readable_in_an_encrypted_pack(keys: KeyStore):
    pack, summary = write_pack(sample_contents(2), keys)

    for secret in (STUDY, SERIES, "KALDORVIS", "BP7730012", "ACC00000042"):
        assert secret.encode() not in pack
    for member in summary.members:
        assert "1.2." not in member.name


def test_member_names_carry_no_uids_in_a_clear_pack():
    pack, _ = write_pack(sample_contents(2))

    with tarfile.open(fileobj=io.BytesIO(pack)) as archive:
        names = archive.getnames()
    assert not any(STUDY in name or "KALDOR" in name for name in names)


# -- streams and records ------------------------------------------------------------


def test_a_pack_streams_through_a_pipe(keys: KeyStore):
    contents = sample_contents(4, size=300_000)
    read_fd, write_fd = os.pipe()
    summaries: list[PackSummary] = []

    def produce() -> None:
        with open(write_fd, "wb") as pipe:
            assert not pipe.seekable()
            key = keys.new_data_key()
            with PackWriter(
                pipe, "p-piped", STUDY, key, record_size=TAPE_RECORD_SIZE
            ) as w:
                for number, data in enumerate(contents, start=1):
                    w.add(meta_for(data, number), io.BytesIO(data))
            assert w.summary is not None
            summaries.append(w.summary)

    producer = threading.Thread(target=produce)
    producer.start()
    collected = Collected()
    with open(read_fd, "rb") as pipe:
        report = PackReader(pipe, keys).read_all(collected)
    producer.join()

    assert report.ok, report.describe()
    assert [collected[e.member] for e in report.manifest.instances] == contents
    assert summaries[0].bytes_written % TAPE_RECORD_SIZE == 0


class RecordingOutput:
    """A write-only output that keeps the size of every write."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.sizes.append(len(data))
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def test_every_write_is_one_whole_record():
    output = RecordingOutput()
    contents = sample_contents(3, size=200_000)

    with PackWriter(output, "p-tape", STUDY, record_size=TAPE_RECORD_SIZE) as writer:
        for number, data in enumerate(contents, start=1):
            writer.add(meta_for(data, number), io.BytesIO(data))

    assert set(output.sizes) == {TAPE_RECORD_SIZE}
    assert PackReader(Pipe(bytes(output.data))).verify().ok


def test_tar_reads_tape_records(tmp_path: Path):
    require_tools("tar")
    pack, summary = write_pack(sample_contents(2), record_size=TAPE_RECORD_SIZE)
    (tmp_path / "p.pack").write_bytes(pack)

    listing = subprocess.run(
        ["tar", "-b", str(TAPE_RECORD_SIZE // 512), "-tf", "-"],
        input=pack,
        capture_output=True,
    )

    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == [m.name for m in summary.members]


def test_a_stream_gives_its_manifest_at_the_end_and_is_read_once(keys: KeyStore):
    pack, summary = write_pack(sample_contents(3), keys)
    reader = PackReader(Pipe(pack), keys)

    assert reader.manifest() == summary.manifest
    with pytest.raises(PackError, match="read once"):
        reader.read_all()
    with pytest.raises(PackError, match="needs a pack file"):
        reader.extract(summary.manifest.instances[0], io.BytesIO())


class CountingFile(io.BytesIO):
    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


def test_the_manifest_of_a_pack_file_costs_a_few_reads():
    pack, summary = write_pack(sample_contents(60, size=2000))
    source = CountingFile(pack)

    reader = PackReader(source)
    opened_at = source.reads
    manifest = reader.manifest()

    assert manifest == summary.manifest
    assert source.reads - opened_at <= 8


def test_a_damaged_trailer_only_slows_finding_the_manifest(
    caplog: pytest.LogCaptureFixture, key_store: KeyStore | None
):
    pack, summary = write_pack(sample_contents(3), key_store)
    trailer = summary.members[-1]
    damaged = flip(pack, trailer.data_offset + 20)

    with caplog.at_level(logging.WARNING):
        manifest = PackReader(io.BytesIO(damaged), key_store).manifest()
        report = PackReader(io.BytesIO(damaged), key_store).verify()

    assert manifest == summary.manifest
    assert "walking the tar headers" in caplog.text
    assert not report.ok
    assert all(check.ok for check in report.instances)
    assert any("trailer.json" in problem for problem in report.problems)


def test_members_of_8_gib_and_more_get_pax_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_store: KeyStore | None
):
    """Lowers the 8 GiB threshold so that a small member takes the pax path."""
    require_tools("tar")
    monkeypatch.setattr(tar_layer, "PAX_SIZE_THRESHOLD", 1000)
    contents = [bytes(100), os.urandom(5000)]
    pack, summary = write_pack(contents, key_store)
    (tmp_path / "p.pack").write_bytes(pack)

    listing = subprocess.run(
        ["tar", "-tvf", "p.pack"], cwd=tmp_path, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    sizes = {
        line.split()[-1]: int(line.split()[2]) for line in listing.stdout.splitlines()
    }
    for member in summary.members:
        assert sizes[member.name] == member.size
    assert PackReader(io.BytesIO(pack), key_store).verify().ok
    assert PackReader(Pipe(pack), key_store).read_all().ok


# -- tampering ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_an_instance_names_the_instance(
    key_store: KeyStore | None, where: str
):
    contents = sample_contents(3)
    pack, summary = write_pack(contents, key_store)
    manifest = summary.manifest

    for target in manifest.instances:
        offset = {"first": 0, "middle": target.member_size // 2, "last": -1}[where]
        end = target.data_offset + target.member_size
        position = end - 1 if offset == -1 else target.data_offset + offset
        damaged = flip(pack, position)

        report = PackReader(io.BytesIO(damaged), key_store).verify()
        assert [c.sop_instance_uid for c in report.bad] == [target.sop_instance_uid]
        assert report.problems == []
        stream_report = PackReader(Pipe(damaged), key_store).read_all()
        assert [c.sop_instance_uid for c in stream_report.bad] == [
            target.sop_instance_uid
        ]
        with pytest.raises(DamagedPackError) as caught:
            extract(damaged, target.sop_instance_uid, key_store)
        assert caught.value.sop_instance_uid == target.sop_instance_uid
        assert target.member in str(caught.value)
        assert target.sop_instance_uid in str(caught.value)
        for other in manifest.instances:
            if other != target:
                data = extract(damaged, other.sop_instance_uid, key_store)
                assert data == contents[manifest.instances.index(other)]


def test_a_flipped_byte_in_the_manifest_is_named(key_store: KeyStore | None):
    pack, summary = write_pack(sample_contents(3), key_store)
    member = summary.members[-2]

    for position in (member.data_offset, member.data_offset + member.size // 2):
        damaged = flip(pack, position)

        with pytest.raises(DamagedPackError) as caught:
            PackReader(io.BytesIO(damaged), key_store).manifest()
        assert caught.value.part == member.name
        with pytest.raises(DamagedPackError, match=r"manifest\.json"):
            PackReader(Pipe(damaged), key_store).manifest()
        report = PackReader(Pipe(damaged), key_store).read_all()
        assert not report.ok
        assert any(member.name in problem for problem in report.problems)


def test_every_flipped_byte_of_the_header_is_named(key_store: KeyStore | None):
    pack, summary = write_pack(sample_contents(1), key_store)
    header = summary.members[0]

    for position in range(header.data_offset, header.data_offset + header.size):
        with pytest.raises(PackError, match=r"pack\.json"):
            PackReader(io.BytesIO(flip(pack, position, 0x01)), key_store)


def test_a_flipped_byte_in_a_tar_header_is_named(key_store: KeyStore | None):
    pack, summary = write_pack(sample_contents(3), key_store)
    second = summary.manifest.instances[1]

    damaged = flip(pack, second.header_offset + 130, 0x01)  # in the size field

    report = PackReader(io.BytesIO(damaged), key_store).verify()
    where = f"tar header at byte {second.header_offset}"
    assert any(where in problem for problem in report.problems)
    assert [c.ok for c in report.instances] == [True, False, False]
    assert "not reached" in (report.instances[2].problem or "")
    with pytest.raises(DamagedPackError, match=where) as caught:
        extract(damaged, second.sop_instance_uid, key_store)
    assert caught.value.sop_instance_uid == second.sop_instance_uid


def test_members_swapped_inside_a_pack_are_detected(key_store: KeyStore | None):
    contents = [os.urandom(4000), os.urandom(4000)]  # incompressible: same size
    pack, summary = write_pack(contents, key_store)
    first, second = summary.manifest.instances
    assert first.member_size == second.member_size
    size = first.member_size

    swapped = bytearray(pack)
    swapped[first.data_offset : first.data_offset + size] = pack[
        second.data_offset : second.data_offset + size
    ]
    swapped[second.data_offset : second.data_offset + size] = pack[
        first.data_offset : first.data_offset + size
    ]

    report = PackReader(io.BytesIO(bytes(swapped)), key_store).verify()
    assert [c.ok for c in report.instances] == [False, False]
    if key_store:
        assert "GCM tag" in (report.instances[0].problem or "")
    else:
        assert "SHA-256" in (report.instances[0].problem or "")


def test_a_member_from_another_pack_does_not_open(keys: KeyStore):
    contents = sample_contents(1)
    pack, summary = write_pack(contents, keys)
    other, _ = write_pack(contents, keys, pack_id="p-000002")
    member = summary.manifest.instances[0]
    span = slice(member.data_offset, member.data_offset + member.member_size)

    grafted = bytearray(pack)
    grafted[span] = other[span]

    report = PackReader(io.BytesIO(bytes(grafted)), keys).verify()
    assert "GCM tag" in (report.instances[0].problem or "")


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.95])
def test_a_pack_cut_short_is_reported(key_store: KeyStore | None, cut: float):
    pack, summary = write_pack(sample_contents(4, size=20_000), key_store)
    damaged = pack[: int(summary.members[-1].header_offset * cut)]

    report = PackReader(Pipe(damaged), key_store).read_all()

    assert not report.ok
    assert any("ends early" in problem for problem in report.problems)


@pytest.fixture(scope="module")
def small_packs(keys: KeyStore) -> dict[bool, bytes]:
    contents = [b"", b"KALDOR" * 300, os.urandom(700)]
    return {
        encrypted: write_pack(contents, keys if encrypted else None)[0]
        for encrypted in (False, True)
    }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), encrypted=st.booleans(), mask=st.integers(1, 255))
def test_any_flipped_byte_anywhere_is_detected(
    keys: KeyStore,
    small_packs: dict[bool, bytes],
    data: st.DataObject,
    encrypted: bool,
    mask: int,
):
    pack = small_packs[encrypted]
    position = data.draw(st.integers(0, len(pack) - 1))
    damaged = flip(pack, position, mask)

    for source in (io.BytesIO(damaged), Pipe(damaged)):
        try:
            report = PackReader(source, keys).read_all()
        except (PackError, KeyStoreError):
            continue
        assert not report.ok, f"flip at {position} went unnoticed"


# -- keys -----------------------------------------------------------------------------


def test_a_pack_under_a_key_the_store_lacks_names_the_key(
    tmp_path: Path, keys: KeyStore
):
    pack, _ = write_pack(sample_contents(1), keys)
    other = KeyStore.create_if_missing(key_store_path(tmp_path))

    with pytest.raises(MissingKeyError, match=keys.current_id):
        PackReader(io.BytesIO(pack), other)
    with pytest.raises(KeyStoreError, match="no key store was given"):
        PackReader(io.BytesIO(pack))


def test_packs_stay_readable_after_key_rotation(tmp_path: Path):
    store = KeyStore.create_if_missing(key_store_path(tmp_path))
    contents = sample_contents(2)
    old_pack, _ = write_pack(contents, store)
    old_id = store.current_id

    store.rotate()
    new_pack, _ = write_pack(contents, store)

    reloaded = KeyStore.load(store.path)
    for pack in (old_pack, new_pack):
        assert PackReader(io.BytesIO(pack), reloaded).verify().ok
    assert (
        PackReader(io.BytesIO(old_pack), reloaded).header.encryption.master_key_id
        == old_id
    )  # type: ignore[union-attr]
    assert (
        PackReader(io.BytesIO(new_pack), reloaded).header.encryption.master_key_id
        != old_id
    )  # type: ignore[union-attr]


# -- writing --------------------------------------------------------------------------


# How a source reaches the compressor: whole, in one read and one call;
# streamed in chunks (every instance over the size for a single call); or
# through a pipe, whose short reads make the single call give way to the
# stream.
SOURCE_KINDS = ["whole", "streamed", "pipe"]


def _source_for(kind: str, monkeypatch: pytest.MonkeyPatch):
    if kind == "streamed":
        monkeypatch.setattr(sealing, "WHOLE_MAX", 1000)
    if kind == "pipe":
        return lambda data: io.BufferedReader(Pipe(data, chunk=700))
    return io.BytesIO


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_a_source_whose_checksum_differs_is_refused_before_writing(
    key_store: KeyStore | None, kind: str, monkeypatch: pytest.MonkeyPatch
):
    source = _source_for(kind, monkeypatch)
    good, bad = sample_contents(2, size=5000)
    out = io.BytesIO()
    key = key_store.new_data_key() if key_store else None
    writer = PackWriter(out, "p-000003", STUDY, key)
    writer.add(meta_for(good, 1), source(good))
    written = len(out.getvalue())

    with pytest.raises(SourceMismatchError, match=rf"{STUDY}\.1\.2: .*SHA-256"):
        writer.add(meta_for(bad, 2), source(flip(bad, 10)))
    with pytest.raises(SourceMismatchError, match="ended after"):
        writer.add(meta_for(bad, 2), source(bad[:-1]))
    with pytest.raises(SourceMismatchError, match="longer than"):
        writer.add(meta_for(bad, 2), source(bad + b"x"))

    assert len(out.getvalue()) == written
    writer.add(meta_for(bad, 2), source(bad))
    writer.close()
    report = PackReader(io.BytesIO(out.getvalue()), key_store).verify()
    assert report.ok
    assert len(report.instances) == 2


@pytest.mark.parametrize("size", [3000, 200_000], ids=["inline", "threaded"])
def test_add_all_stops_at_the_first_mismatch(size: int):
    contents = sample_contents(6, size)
    items = [
        (meta_for(data, n), io.BytesIO(data)) for n, data in enumerate(contents, 1)
    ]
    items[3] = (items[3][0], io.BytesIO(b"not the instance"))
    out = io.BytesIO()
    writer = PackWriter(out, "p-000004", STUDY)

    with pytest.raises(SourceMismatchError):
        writer.add_all(items, threads=2)

    writer.close()
    manifest = PackReader(io.BytesIO(out.getvalue())).manifest()
    assert [e.meta for e in manifest.instances] == [m for m, _ in items[:3]]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_add_all_keeps_the_order_of_mixed_sizes(keys: KeyStore, threads: int):
    sizes = [300_000, 2000, 500_000, 150_000, 10, 0, 400_000, 140_000, 90_000]
    contents = [os.urandom(size) for size in sizes]
    items = [
        (meta_for(data, n), io.BytesIO(data)) for n, data in enumerate(contents, 1)
    ]
    out = io.BytesIO()

    with PackWriter(out, "p-000008", STUDY, keys.new_data_key()) as writer:
        entries = writer.add_all(items, threads)

    assert [e.meta for e in entries] == [meta for meta, _ in items]
    assert [e.member for e in entries] == [
        f"instances/{n:06d}.dcm.zst.enc" for n in range(1, len(sizes) + 1)
    ]
    collected = Collected()
    report = PackReader(Pipe(out.getvalue(), chunk=65536), keys).read_all(collected)
    assert report.ok, report.describe()
    assert [collected[e.member] for e in entries] == contents


def test_a_pack_file_is_written_durably_and_never_overwritten(tmp_path: Path):
    contents = sample_contents(2)
    items = [
        (meta_for(data, n), io.BytesIO(data)) for n, data in enumerate(contents, 1)
    ]
    destination = tmp_path / "nearline" / "ab" / "p-000005.pack"

    summary = write_pack_file(destination, items, "p-000005", root=tmp_path)

    assert destination.read_bytes().startswith(b"pack.json")
    assert hashlib.sha256(destination.read_bytes()).hexdigest() == summary.sha256
    assert sorted(p.name for p in destination.parent.iterdir()) == ["p-000005.pack"]
    with pytest.raises(PackError, match="never overwritten"):
        write_pack_file(destination, [], "p-000005")


def test_a_failed_pack_file_leaves_nothing(tmp_path: Path):
    data = sample_contents(1)[0]
    destination = tmp_path / "p-000006.pack"

    with pytest.raises(SourceMismatchError):
        write_pack_file(
            destination, [(meta_for(data, 1), io.BytesIO(b"x"))], "p-000006"
        )

    assert list(tmp_path.iterdir()) == []


def test_misuse_raises_errors_that_name_the_parameter():
    data = b"abc"
    with pytest.raises(ValueError, match="pack_id"):
        PackWriter(io.BytesIO(), "../etc")
    with pytest.raises(ValueError, match="record_size"):
        PackWriter(io.BytesIO(), "p-1", record_size=1000)
    with pytest.raises(ValueError, match="sha256"):
        InstanceMeta("1", "1", "1", "1", "1", 3, "nothex", "0" * 64)
    with pytest.raises(ValueError, match="attributes"):
        InstanceMeta("1", "1", "1", "1", "1", 3, "0" * 64, "0" * 64, {"visit": {}})
    writer = PackWriter(io.BytesIO(), "p-1", STUDY)
    with pytest.raises(ValueError, match="belongs to study"):
        writer.add(meta_for(data, 1, study="1.2.3"), io.BytesIO(data))
    writer.add(meta_for(data, 1), io.BytesIO(data))
    with pytest.raises(ValueError, match="already in the pack"):
        writer.add(meta_for(data, 1), io.BytesIO(data))


def test_an_unknown_instance_is_a_clear_error(key_store: KeyStore | None):
    pack, _ = write_pack(sample_contents(1), key_store)

    with pytest.raises(PackError, match=r"holds no instance 9\.9\.9"):
        extract(pack, "9.9.9", key_store)


def test_a_file_that_is_not_a_pack_is_refused(tmp_path: Path):
    path = tmp_path / "notes.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("notes.txt")
        archive.addfile(info, io.BytesIO(b""))

    with pytest.raises(PackError):
        PackReader.open(path)


@pytest.fixture
def instance_files(tmp_path: Path) -> Iterator[list[Path]]:
    paths = []
    for number, data in enumerate(sample_contents(3), start=1):
        path = tmp_path / f"{number}.dcm"
        path.write_bytes(data)
        paths.append(path)
    yield paths


def test_sources_may_be_paths(instance_files: list[Path], keys: KeyStore):
    out = io.BytesIO()
    with PackWriter(out, "p-000007", STUDY, keys.new_data_key()) as writer:
        for number, path in enumerate(instance_files, start=1):
            writer.add(meta_for(path.read_bytes(), number), path)

    for number, path in enumerate(instance_files, start=1):
        assert extract(out.getvalue(), f"{STUDY}.1.{number}", keys) == path.read_bytes()


# -- the format document --------------------------------------------------------------

FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "pack-format.md"


def doc_blocks(language: str) -> list[str]:
    """The fenced blocks of ``language`` in docs/pack-format.md."""
    text = FORMAT_DOC.read_text()
    return [
        block.split("\n", 1)[1]
        for block in text.split("```")[1::2]
        if block.startswith(language + "\n")
    ]


def test_the_documented_headers_are_valid():
    headers = [b for b in doc_blocks("json") if b.startswith('{"check"')]

    parsed = [PackHeader.from_bytes(block.encode()) for block in headers]

    assert [h.pack_id for h in parsed] == ["p-000123", "p-000124"]
    assert parsed[0].encryption is not None
    assert parsed[0].encryption.master_key_id == key_id_of(bytes(range(32)))


def test_the_documented_recovery_script_decrypts_a_pack(tmp_path: Path, keys: KeyStore):
    require_tools("tar", "zstd")
    (script,) = [b for b in doc_blocks("python") if "decrypt-pack.py" in b]
    (tmp_path / "decrypt-pack.py").write_text(script)
    (tmp_path / "escrow.txt").write_text(keys.export_escrow())
    contents = sample_contents(3)
    pack, summary = write_pack(contents, keys)
    (tmp_path / "p.pack").write_bytes(pack)
    recovered = tmp_path / "recovered"
    recovered.mkdir()

    subprocess.run(["tar", "-xf", "../p.pack"], cwd=recovered, check=True)
    subprocess.run(
        [sys.executable, "../decrypt-pack.py", ".", "../escrow.txt"],
        cwd=recovered,
        check=True,
        capture_output=True,
    )
    frames = [str(p.relative_to(recovered)) for p in recovered.rglob("*.zst")]
    subprocess.run(["zstd", "-q", "-d", "--rm", *frames], cwd=recovered, check=True)

    manifest = json.loads((recovered / "manifest.json").read_text())
    for entry, data in zip(manifest["instances"], contents, strict=True):
        member = recovered / entry["member"].removesuffix(".zst.enc")
        assert member.read_bytes() == data
    assert manifest["pack_id"] == summary.pack_id


# -- reading with worker threads ------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_large_and_small_members_come_out_in_order(keys: KeyStore, threads: int):
    """Members of 128 KiB to 8 MiB are decoded ahead in workers, others here."""
    contents = sample_contents(5, size=4000)
    contents[1] = os.urandom(200_000)
    contents[2] = os.urandom(9 << 20)
    contents[3] = os.urandom(130_000)
    pack, _ = write_pack(contents, keys)

    collected = Collected()
    report = PackReader(Pipe(pack, chunk=1 << 20), keys).read_all(collected, threads)

    assert report.ok, report.describe()
    members = [check.member for check in report.instances]
    assert members == [f"instances/00000{n}.dcm.zst.enc" for n in range(1, 6)]
    assert [collected[member] for member in members] == contents
