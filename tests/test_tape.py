"""Tape: the simulated drive and changer, the mt/mtx parsers on recorded
transcripts, the command runner, and what only the tape library does."""

from __future__ import annotations

import errno
import hashlib
import time
from pathlib import Path

import pytest

from appliance.errors import VolumeError, VolumeFull, VolumeNotReachable
from appliance.storage.volumes import tapeformat
from appliance.storage.volumes.commands import MtTool, MtxTool, run_tool
from appliance.storage.volumes.tape import TapeLibrary
from appliance.storage.volumes.tapedevices import StTapeDrive
from appliance.storage.volumes.tapefake import FakeCartridge, FakeChanger, FakeTapeDrive
from appliance.storage.volumes.tapestatus import (
    ChangerStatus,
    DriveElement,
    MtStatus,
    StorageElement,
    parse_mt_status,
    parse_mtx_status,
    render_mt_status,
    render_mtx_status,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tape"
MiB = 1 << 20
RECORD = 64 * 1024


def transcript(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def drive(tmp_path: Path) -> FakeTapeDrive:
    FakeCartridge.create(tmp_path / "T1.tape", capacity=10_000)
    drive = FakeTapeDrive()
    drive.insert(tmp_path / "T1.tape")
    return drive


def write_file(drive: FakeTapeDrive, *records: bytes) -> None:
    handle = drive.open("w")
    for record in records:
        handle.write(record)
    handle.close()


def read_until_filemark(drive: FakeTapeDrive) -> list[bytes]:
    handle = drive.open("r")
    records = []
    while record := handle.read(65536):
        records.append(record)
    handle.close()
    return records


# -- the simulated drive ---------------------------------------------------


def test_fake_drive_reads_records_then_zero_bytes_once_at_a_filemark(drive):
    write_file(drive, b"a1", b"a2")
    write_file(drive, b"b1")
    drive.rewind()

    handle = drive.open("r")
    assert [handle.read(100), handle.read(100)] == [b"a1", b"a2"]
    assert handle.read(100) == b""
    assert handle.read(100) == b"b1"
    assert handle.read(100) == b""
    with pytest.raises(OSError) as caught:
        handle.read(100)
    assert caught.value.errno == errno.EIO  # end of data
    handle.close()


def test_fake_drive_status_follows_the_head(drive):
    assert drive.status().at_bot and drive.status().online
    write_file(drive, b"a1", b"a2")
    write_file(drive, b"b1")

    status = drive.status()
    assert (status.file_number, status.block_number) == (2, 0)
    assert status.at_eod and "EOF" in status.flags
    drive.asf(1)
    handle = drive.open("r")
    handle.read(100)
    handle.close()
    assert (drive.status().file_number, drive.status().block_number) == (1, 1)


def test_fake_drive_spacing_over_filemarks(drive):
    for name in (b"f0", b"f1", b"f2"):
        write_file(drive, name + b"-first", name + b"-second")

    drive.asf(2)
    assert read_until_filemark(drive) == [b"f2-first", b"f2-second"]
    drive.rewind()
    drive.fsf(1)
    assert read_until_filemark(drive)[0] == b"f1-first"
    # bsf stops before the filemark: on the last record of the file before.
    drive.asf(2)
    drive.bsf(1)
    assert (drive.status().file_number, drive.status().block_number) == (1, 2)
    drive.eod()
    assert drive.status().at_eod and drive.status().file_number == 3

    drive.asf(1)
    with pytest.raises(VolumeError, match="fsf 5"):
        drive.fsf(5)
    assert drive.status().at_eod
    drive.asf(1)
    with pytest.raises(VolumeError, match="bsf 3"):
        drive.bsf(3)
    assert drive.status().at_bot


def test_fake_drive_writing_mid_tape_cuts_off_the_rest(drive):
    write_file(drive, b"one")
    write_file(drive, b"two")
    write_file(drive, b"three")

    drive.asf(1)
    write_file(drive, b"new")
    drive.rewind()

    assert read_until_filemark(drive) == [b"one"]
    assert read_until_filemark(drive) == [b"new"]
    assert drive.status().at_eod


def test_fake_drive_end_of_tape_still_takes_the_filemark(drive):
    handle = drive.open("w")
    handle.write(b"x" * 6000)
    with pytest.raises(OSError) as caught:
        handle.write(b"y" * 6000)
    assert caught.value.errno == errno.ENOSPC
    handle.close()

    assert drive.status().file_number == 1
    drive.rewind()
    assert read_until_filemark(drive) == [b"x" * 6000]


def test_fake_drive_refuses_a_read_smaller_than_the_record(drive):
    write_file(drive, b"z" * 5000)
    drive.rewind()

    handle = drive.open("r")
    with pytest.raises(OSError) as caught:
        handle.read(4096)
    assert caught.value.errno == errno.ENOMEM
    handle.close()


def test_fake_drive_opens_once_and_positions_only_when_idle(drive):
    handle = drive.open("w")

    with pytest.raises(VolumeError, match="busy"):
        drive.rewind()
    with pytest.raises(VolumeError, match="busy"):
        drive.open("r")
    handle.close()
    drive.rewind()


def test_fake_drive_write_protect_and_no_tape(tmp_path):
    FakeCartridge.create(tmp_path / "WP.tape", capacity=1000, write_protected=True)
    drive = FakeTapeDrive()

    assert not drive.status().online and "DR_OPEN" in drive.status().flags
    with pytest.raises(VolumeError, match="no tape"):
        drive.rewind()
    drive.insert(tmp_path / "WP.tape")
    assert drive.status().write_protected
    with pytest.raises(VolumeError, match="write protected"):
        drive.open("w")


def test_fake_cartridge_survives_reopening(drive, tmp_path):
    write_file(drive, b"kept", b"records")
    write_file(drive, b"second file")

    again = FakeTapeDrive()
    again.insert(tmp_path / "T1.tape")

    assert read_until_filemark(again) == [b"kept", b"records"]
    assert read_until_filemark(again) == [b"second file"]


# -- the simulated changer -------------------------------------------------


def test_fake_changer_loads_and_unloads_only_ejected_tapes(tmp_path):
    drive = FakeTapeDrive()
    changer = FakeChanger(tmp_path, [drive], slots=6, mail_slots=1)
    changer.insert_cartridge("A00001L6", MiB)
    changer.insert_cartridge("A00002L6", MiB, slot=4)

    changer.load(4, 0)

    status = changer.status()
    assert status.drive(0) == DriveElement(0, True, 4, "A00002L6")
    assert status.slot_of("A00002L6") is None
    assert drive.status().online
    with pytest.raises(VolumeError, match="eject"):
        changer.unload(4, 0)
    drive.eject()
    changer.unload(2, 0)
    assert changer.status().slot_of("A00002L6").number == 2
    with pytest.raises(VolumeError, match="Empty"):
        changer.load(3, 0)


def test_fake_changer_state_survives_reopening(tmp_path):
    drive = FakeTapeDrive()
    changer = FakeChanger(tmp_path, [drive], slots=4)
    changer.insert_cartridge("A00001L6", MiB)
    changer.load(1, 0)

    second_drive = FakeTapeDrive()
    reopened = FakeChanger(tmp_path, [second_drive], slots=4)

    assert reopened.status() == changer.status()
    assert second_drive.status().online
    with pytest.raises(VolumeError, match="not in a slot"):
        reopened.remove_cartridge("A00001L6")


def test_fake_changer_mail_slot_is_listed_as_import_export(tmp_path):
    changer = FakeChanger(tmp_path, [FakeTapeDrive()], slots=5, mail_slots=2)

    changer.insert_cartridge("A00001L6", MiB, slot=5)

    slots = changer.status().slots
    assert [s.number for s in slots if s.import_export] == [4, 5]
    assert changer.status().slot_of("A00001L6") == StorageElement(
        5, True, "A00001L6", True
    )


# -- parsers on recorded transcripts ---------------------------------------


def test_mtx_status_two_drives_with_barcodes():
    status = parse_mtx_status(transcript("mtx-two-drives-barcodes.txt"))

    assert status.drives == (
        DriveElement(0, True, 3, "A00003L6"),
        DriveElement(1, False),
    )
    assert len(status.slots) == 24
    assert status.slots[0] == StorageElement(1, True, "A00001L6")
    assert status.slots[2] == StorageElement(3, False)
    assert status.slots[5] == StorageElement(6, True, None)
    assert status.slots[23] == StorageElement(24, False, None, True)
    assert status.slot_of("CLN001L1").number == 23
    assert status.drive_of("A00003L6").number == 0
    assert status.empty_slot(preferred=3).number == 3
    assert status.empty_slot(preferred=1).number == 3


def test_mtx_status_autoloader_without_barcodes():
    status = parse_mtx_status(transcript("mtx-autoloader-no-barcodes.txt"))

    assert status.drives == (DriveElement(0, True, 1, None),)
    assert [s.number for s in status.slots if s.full] == [2, 3, 4, 7]
    assert all(s.barcode is None for s in status.slots)
    assert not any(s.import_export for s in status.slots)


def test_mtx_status_mail_slots_and_unknown_source():
    status = parse_mtx_status(transcript("mtx-mail-slots-unknown-source.txt"))

    assert status.drives == (DriveElement(0, True, None, "PA0107L8"),)
    assert status.slots[1] == StorageElement(2, True, "PA0102L8")
    assert status.slots[10] == StorageElement(11, True, "PA0111L8", True)
    assert status.slots[11] == StorageElement(12, False, None, True)
    assert status.empty_slot().number == 3


def test_mtx_status_empty_library():
    status = parse_mtx_status(transcript("mtx-empty-library.txt"))

    assert [d.full for d in status.drives] == [False, False]
    assert not any(s.full for s in status.slots)


def test_mtx_status_garbage_and_truncated_output_are_errors():
    with pytest.raises(VolumeError, match="mtx status"):
        parse_mtx_status("mtx: Request Sense: Long Report=yes\n")
    cut = "\n".join(transcript("mtx-two-drives-barcodes.txt").splitlines()[:10])
    with pytest.raises(VolumeError, match="24 slots"):
        parse_mtx_status(cut)


@pytest.mark.parametrize(
    ("name", "file_number", "block_number", "flags"),
    [
        ("mt-bot.txt", 0, 0, {"BOT", "ONLINE", "IM_REP_EN"}),
        ("mt-after-fsf.txt", 2, 0, {"EOF", "ONLINE", "IM_REP_EN"}),
        ("mt-eod.txt", 7, 0, {"EOF", "EOD", "ONLINE", "IM_REP_EN"}),
        ("mt-write-protected.txt", 0, 0, {"BOT", "WR_PROT", "ONLINE", "IM_REP_EN"}),
        ("mt-no-tape.txt", -1, -1, {"DR_OPEN", "IM_REP_EN"}),
        ("mt-fast-eod.txt", -1, -1, {"EOD", "ONLINE", "IM_REP_EN"}),
        ("mt-old-format-mid-file.txt", 3, 41, {"ONLINE", "IM_REP_EN"}),
    ],
)
def test_mt_status_transcripts(name, file_number, block_number, flags):
    status = parse_mt_status(transcript(name))

    assert (status.file_number, status.block_number) == (file_number, block_number)
    assert status.flags == flags


def test_mt_status_details():
    bot = parse_mt_status(transcript("mt-bot.txt"))
    old = parse_mt_status(transcript("mt-old-format-mid-file.txt"))

    assert bot.online and bot.at_bot and not bot.at_eod and not bot.write_protected
    assert (bot.block_size, bot.density) == (0, "0x5a (LTO-6)")
    assert (old.partition, old.block_size, old.density) == (0, 512, "0x25 (DDS-3)")
    assert parse_mt_status(transcript("mt-write-protected.txt")).write_protected
    with pytest.raises(VolumeError, match="mt status"):
        parse_mt_status("/dev/nst0: Input/output error\n")


def test_rendered_status_reads_back_the_same():
    mt = MtStatus(4, 12, 0, 0, "0x5c (LTO-7)", frozenset({"ONLINE", "EOF"}))
    changer = ChangerStatus(
        (DriveElement(0, True, 2, "B00002L7"), DriveElement(1, True, None, None)),
        (
            StorageElement(1, True, "B00001L7"),
            StorageElement(2, False),
            StorageElement(3, True, None, True),
        ),
    )

    assert parse_mt_status(render_mt_status(mt)) == mt
    assert "General status bits on (81000000):" in render_mt_status(mt)
    assert parse_mtx_status(render_mtx_status(changer, "/dev/sg3")) == changer


# -- running the tools -----------------------------------------------------


def test_mt_and_mtx_on_a_missing_device_fail_clearly_and_quickly(tmp_path):
    missing = str(tmp_path / "nst9")
    started = time.monotonic()

    for call in (
        MtTool(missing, timeout=10).status,
        MtxTool(missing, timeout=10).status,
    ):
        try:
            call()
        except VolumeError as exc:
            assert missing in str(exc) or "not installed" in str(exc)
        else:
            pytest.fail("a missing device was accepted")
    assert time.monotonic() - started < 10


def test_real_drive_class_on_a_missing_device(tmp_path):
    drive = StTapeDrive(str(tmp_path / "nst9"), MtTool(str(tmp_path / "nst9"), 10))

    with pytest.raises(VolumeError, match="nst9"):
        drive.open("r")
    with pytest.raises(VolumeError, match="nst9"):
        drive.rewind()


def test_real_drive_class_positions_with_mt_and_writes_records(tmp_path):
    log = tmp_path / "mt.log"
    script = tmp_path / "mt"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$3" = status ]; then cat {FIXTURES / "mt-bot.txt"}; fi\n'
    )
    script.chmod(0o755)
    device = tmp_path / "nst0"
    device.touch()
    drive = StTapeDrive(str(device), MtTool(str(device), 10, program=str(script)))

    drive.wait_ready(5)
    drive.asf(3)
    drive.asf(0)
    drive.eod()
    drive.fsf(2)
    drive.bsf(1)
    handle = drive.open("w")
    handle.write(b"one record")
    with pytest.raises(VolumeError, match="busy"):
        drive.rewind()
    handle.close()
    drive.eject()

    prefix = f"-f {device} "
    assert log.read_text().splitlines() == [
        prefix + command
        for command in (
            "status",
            "setblk 0",
            "asf 3",
            "rewind",
            "eod",
            "fsf 2",
            "bsf 1",
            "offline",
        )
    ]
    assert device.read_bytes() == b"one record"


def test_a_hanging_command_is_stopped_at_its_timeout():
    started = time.monotonic()

    with pytest.raises(VolumeError, match=r"did not finish within 0\.5 s"):
        run_tool(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 5


def test_a_missing_program_names_its_package():
    with pytest.raises(VolumeError, match="apt-get install"):
        run_tool(["no-such-tape-tool-here"], timeout=5)


def test_a_failing_command_reports_its_error_output():
    with pytest.raises(VolumeError, match=r"exit 3.*broken"):
        run_tool(["sh", "-c", "echo broken >&2; exit 3"], timeout=5)


# -- the tape library beyond the conformance suite -------------------------


def library_with(tmp_path: Path, *barcodes: str, capacity: int = 64 * MiB):
    drive = FakeTapeDrive()
    changer = FakeChanger(tmp_path / "sim", [drive])
    for barcode in barcodes:
        changer.insert_cartridge(barcode, capacity)
    library = TapeLibrary(drive, changer, tmp_path / "state", record_size=RECORD)
    return library, drive, changer


def test_packs_are_tape_files_with_header_padding_and_trailer(tmp_path):
    library, drive, _ = library_with(tmp_path, "T00001")
    library.label("T00001", 32 * MiB)
    data = b"\x01" * (RECORD + 10)

    location = library.write_pack("T00001", "p-000007", [data])

    assert location.position == 1
    drive.asf(1)
    records = read_until_filemark_sized(drive)
    assert len(records) == 4 and all(len(r) == RECORD for r in records)
    assert tapeformat.read_record(records[0], tapeformat.HEADER_MAGIC) == {
        "pack_id": "p-000007",
        "volume": "T00001",
    }
    assert records[1] + records[2][:10] == data
    assert records[2][10:] == bytes(RECORD - 10)
    trailer = tapeformat.read_record(records[3], tapeformat.TRAILER_MAGIC)
    assert trailer["size"] == len(data)
    assert trailer["sha256"] == hashlib.sha256(data).hexdigest()


def read_until_filemark_sized(drive: FakeTapeDrive) -> list[bytes]:
    handle = drive.open("r")
    records = []
    while record := handle.read(MiB):
        records.append(record)
    handle.close()
    return records


def test_end_of_tape_from_the_drive_is_volume_full(tmp_path):
    library, _, _ = library_with(tmp_path, "T00001", "T00002", capacity=4 * MiB)
    library.label("T00001", 100 * MiB)  # more than the cartridge really holds
    library.label("T00002", 100 * MiB)
    first = library.write_pack("T00001", "p-000001", [b"a" * MiB])

    with pytest.raises(VolumeFull, match="end of tape"):
        library.write_pack("T00001", "p-000002", [b"b" * 5 * MiB])

    assert library.list_packs("T00001") == [first]
    assert library.free_bytes("T00001") == 0
    assert library.list_volumes()[0].full
    with pytest.raises(VolumeFull, match="no more packs"):
        library.write_pack("T00001", "p-000003", [b"c"])
    assert library.write_pack("T00002", "p-000002", [b"b" * MiB]).position == 1


def test_scan_rebuilds_the_registry_and_skips_a_cut_off_pack(tmp_path):
    library, drive, changer = library_with(tmp_path, "T00001")
    library.label("T00001", 3 * MiB)
    kept = [
        library.write_pack("T00001", f"p-{n}", [bytes([n]) * 300_000]) for n in (1, 2)
    ]
    with pytest.raises(VolumeFull):
        library.write_pack("T00001", "p-3", [b"x" * 5 * MiB])

    fresh = TapeLibrary(drive, changer, tmp_path / "other-state", record_size=RECORD)
    with pytest.raises(VolumeError, match="scan"):
        fresh.list_packs("T00001")

    assert fresh.scan("T00001") == kept
    assert fresh.list_packs("T00001") == kept
    assert b"".join(fresh.read_pack(kept[1])) == bytes([2]) * 300_000


def test_a_tape_holding_data_is_never_labelled(tmp_path):
    library, drive, changer = library_with(tmp_path, "T00001")
    library.label("T00001", 8 * MiB)
    library.write_pack("T00001", "p-1", [b"precious"])

    forgetful = TapeLibrary(
        drive, changer, tmp_path / "other-state", record_size=RECORD
    )

    with pytest.raises(VolumeError, match="already holds data"):
        forgetful.label("T00001", 8 * MiB)
    assert [p.pack_id for p in forgetful.scan("T00001")] == ["p-1"]


def test_a_pack_altered_on_tape_fails_its_check(tmp_path):
    library, _, changer = library_with(tmp_path, "T00001")
    library.label("T00001", 8 * MiB)
    location = library.write_pack("T00001", "p-1", [b"A" * 1000])
    cartridge = changer.cartridge_path("T00001")
    raw = cartridge.read_bytes()
    cartridge.write_bytes(raw.replace(b"A" * 1000, b"A" * 999 + b"B"))
    library.unload()
    library.load("T00001")

    with pytest.raises(VolumeError, match="p-1"):
        b"".join(library.read_pack(location))


def test_the_changer_swaps_cartridges_as_needed(tmp_path):
    library, _, changer = library_with(tmp_path, "T00001", "T00002")
    library.label("T00001", 8 * MiB)
    library.label("T00002", 8 * MiB)

    one = library.write_pack("T00001", "p-1", [b"one"])
    two = library.write_pack("T00002", "p-2", [b"two"])

    assert changer.status().drive(0).barcode == "T00002"
    assert b"".join(library.read_pack(one)) == b"one"
    assert changer.status().drive(0).barcode == "T00001"
    assert b"".join(library.read_pack(two)) == b"two"
    library.unload()
    assert not changer.status().drive(0).full
    assert {s.barcode for s in changer.status().slots if s.full} == {"T00001", "T00002"}


def test_a_barcode_that_does_not_match_the_tape_label_is_refused(tmp_path):
    library, drive, changer = library_with(tmp_path, "T00001", "T00002")
    library.label("T00001", 8 * MiB)
    library.label("T00002", 8 * MiB)
    library.unload()
    swapped = changer.cartridge_path("T00001").read_bytes()
    changer.cartridge_path("T00002").write_bytes(swapped)
    fresh = TapeLibrary(drive, changer, tmp_path / "state", record_size=RECORD)

    with pytest.raises(VolumeError, match="labelled 'T00001'"):
        fresh.write_pack("T00002", "p-1", [b"x"])


def test_a_drive_without_changer_reaches_only_the_tape_inside(tmp_path):
    FakeCartridge.create(tmp_path / "T00001.tape", 8 * MiB)
    FakeCartridge.create(tmp_path / "T00002.tape", 8 * MiB)
    drive = FakeTapeDrive()
    library = TapeLibrary(drive, None, tmp_path / "state", record_size=RECORD)
    drive.insert(tmp_path / "T00001.tape")
    library.label("T00001", 8 * MiB)
    location = library.write_pack("T00001", "p-1", [b"single drive"])
    library.unload()
    drive.remove()
    drive.insert(tmp_path / "T00002.tape")
    library.label("T00002", 8 * MiB)

    assert [v.reachable for v in library.list_volumes()] == [False, True]
    with pytest.raises(VolumeNotReachable, match="T00001"):
        library.read_pack(location)
    library.unload()
    drive.remove()
    drive.insert(tmp_path / "T00001.tape")
    assert b"".join(library.read_pack(location)) == b"single drive"


def test_the_wrong_tape_in_a_drive_without_changer_is_named(tmp_path):
    FakeCartridge.create(tmp_path / "T00001.tape", 8 * MiB)
    FakeCartridge.create(tmp_path / "T00002.tape", 8 * MiB)
    drive = FakeTapeDrive()
    library = TapeLibrary(drive, None, tmp_path / "state", record_size=RECORD)
    for label in ("T00001", "T00002"):
        drive.insert(tmp_path / f"{label}.tape")
        library.label(label, 8 * MiB)
        library.unload()
        drive.remove()
    drive.insert(tmp_path / "T00002.tape")

    with pytest.raises(VolumeNotReachable, match="holds volume T00002, not T00001"):
        library.load("T00001")
    with pytest.raises(VolumeNotReachable, match="T00001"):
        library.write_pack("T00001", "p-1", [b"meant for T00001"])
    assert library.list_packs("T00002") == []


def test_another_archives_tape_in_a_drive_without_changer_is_named(tmp_path):
    mine, theirs = "archive-mine-0001", "archive-theirs-0002"
    FakeCartridge.create(tmp_path / "ours.tape", 8 * MiB)
    FakeCartridge.create(tmp_path / "theirs.tape", 8 * MiB)
    drive = FakeTapeDrive()
    library = TapeLibrary(
        drive, None, tmp_path / "state", record_size=RECORD, archive=mine
    )
    other = TapeLibrary(
        drive, None, tmp_path / "other", record_size=RECORD, archive=theirs
    )
    for tape, labeller in (("ours", library), ("theirs", other)):
        drive.insert(tmp_path / f"{tape}.tape")
        labeller.label("T00001", 8 * MiB)
        labeller.unload()
        drive.remove()
    drive.insert(tmp_path / "ours.tape")
    location = library.write_pack("T00001", "p-1", [b"this archive's"])
    library.unload()
    drive.remove()
    drive.insert(tmp_path / "theirs.tape")

    both = f"holds volume T00001 of archive {theirs}, not of this archive \\({mine}\\)"
    assert not library.is_reachable("T00001")
    assert [v.reachable for v in library.list_volumes()] == [False]
    with pytest.raises(VolumeNotReachable, match=both):
        library.load("T00001")
    with pytest.raises(VolumeNotReachable, match=both):
        library.read_pack(location)
    with pytest.raises(VolumeNotReachable, match=both):
        library.write_pack("T00001", "p-2", [b"meant for this archive's"])
    library.unload()
    drive.remove()
    drive.insert(tmp_path / "ours.tape")
    assert b"".join(library.read_pack(location)) == b"this archive's"


def test_scanning_another_archives_tape_is_refused(tmp_path):
    library, drive, changer = library_with(tmp_path, "T00001")
    library.archive_source = "archive-theirs-0002"
    library.label("T00001", 8 * MiB)
    library.unload()
    fresh = TapeLibrary(
        drive,
        changer,
        tmp_path / "fresh-state",
        record_size=RECORD,
        archive="archive-mine-0001",
    )

    with pytest.raises(VolumeError, match="of archive archive-theirs-0002"):
        fresh.scan("T00001")
    assert fresh.list_volumes() == []


def test_default_record_size_round_trip(tmp_path):
    drive = FakeTapeDrive()
    changer = FakeChanger(tmp_path / "sim", [drive])
    changer.insert_cartridge("T00001", 64 * MiB)
    library = TapeLibrary(drive, changer, tmp_path / "state")
    library.label("T00001", 64 * MiB)
    data = bytes(range(256)) * 5000

    location = library.write_pack("T00001", "p-1", [data])

    assert b"".join(library.read_pack(location)) == data
    # label, header, 5 data records (the last one padded), trailer
    assert library.list_volumes()[0].used == 8 * tapeformat.DEFAULT_RECORD_SIZE


@pytest.mark.parametrize("capacity", ["64 MiB", -1, 0, True, None])
def test_scanning_a_tape_whose_label_names_no_usable_capacity_is_refused(
    tmp_path, capacity
):
    library, drive, changer = library_with(tmp_path, "T00001")
    # A label as another tool (or a hand) may have written it.
    written = library.label_fields
    library.label_fields = lambda volume, size: {  # type: ignore[method-assign]
        **written(volume, size),
        "capacity": capacity,
    }
    library.label("T00001", 8 * MiB)
    library.write_pack("T00001", "p-1", [b"kept"])
    library.unload()
    fresh = TapeLibrary(drive, changer, tmp_path / "fresh-state", record_size=RECORD)

    with pytest.raises(VolumeError, match="T00001: its label names no usable capacity"):
        fresh.scan("T00001")
    assert fresh.list_volumes() == []


def test_only_the_cartridge_in_the_drive_is_listed_write_protected_or_not(
    tmp_path,
):
    """The drive reports the tab of the cartridge it holds; the changer
    reports none, and a cartridge in a slot is not loaded to find out."""
    library, _, changer = library_with(tmp_path, "T00001", "T00002")
    library.label("T00001", 8 * MiB)
    library.label("T00002", 8 * MiB)
    library.unload()
    changer.set_write_protect("T00001")

    library.load("T00001")
    protected = {v.label: v.read_only for v in library.list_volumes()}
    library.load("T00002")
    writable = {v.label: v.read_only for v in library.list_volumes()}

    assert protected == {"T00001": True, "T00002": None}
    assert writable == {"T00001": None, "T00002": False}


def test_the_tape_in_a_drive_without_changer_is_listed_write_protected(tmp_path):
    # A changer without drives stands for the hands that slide the tab.
    hands = FakeChanger(tmp_path / "sim", [])
    cartridge = hands.cartridge_path("T00001")
    FakeCartridge.create(cartridge, 8 * MiB)
    drive = FakeTapeDrive()
    library = TapeLibrary(drive, None, tmp_path / "state", record_size=RECORD)
    drive.insert(cartridge)
    library.label("T00001", 8 * MiB)
    library.unload()
    drive.remove()
    hands.set_write_protect("T00001")
    drive.insert(cartridge)

    [info] = library.list_volumes()

    assert (info.reachable, info.read_only) == (True, True)
