"""Appointment list files: read, checked whole, imported by the command line."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.catalog.store import Catalog
from appliance.cli import main
from appliance.prefetch import appointments, listfile, watch

GOOD = (
    "Patient_ID,issuer,appointment_time,modality,procedure_code,accession\n"
    "PAT-0042,CITYHOSP,2027-01-15 09:30,ct,CTHEAD,ACC1\n"
    "PAT-0077,,202701160800,MR,,\n"
    "\n"
)


def test_a_good_file_gives_one_appointment_per_line() -> None:
    found = listfile.read("\ufeff" + GOOD, "day.csv")

    assert found.problems == []
    first, second = found.appointments
    assert first.appointment_id == "list:ACC1"
    assert first.modality == "CT"
    assert first.start == time.mktime(time.strptime("202701150930", "%Y%m%d%H%M"))
    assert [(p.patient_id, p.issuer) for p in first.patients] == [
        ("PAT-0042", "CITYHOSP")
    ]
    assert second.appointment_id == "list:PAT-0077||202701160800"
    assert second.start == time.mktime(time.strptime("202701160800", "%Y%m%d%H%M"))


def test_every_bad_line_is_reported_with_its_number() -> None:
    text = (
        "patient_id,appointment_time,status\n"
        "A,2027-01-15 09:30,\n"
        "B,next tuesday,\n"
        ",2027-01-15 09:30,\n"
        "C,,booked\n"
        "D,,cancelled\n"
        "E,2027-01-15 09:30,maybe\n"
        "F,2027-01-15 09:30\n"
    )

    found = listfile.read(text, "bad.csv")

    assert [p.split(":")[0] for p in found.problems] == [
        "line 3",
        "line 4",
        "line 5",
        "line 7",
        "line 8",
    ]
    assert "next tuesday" in found.problems[0]


def test_line_numbers_count_file_lines_and_line_breaks_are_refused() -> None:
    text = (
        "patient_id,appointment_time,modality\n"
        'A,2027-01-15 09:30,"C\nT"\n'
        "B,tomorrow,CT\n"
    )

    found = listfile.read(text, "x.csv")

    assert found.problems == [
        "line 2: a line break or control character",
        "line 4: appointment_time 'tomorrow' is not a date and time "
        "(e.g. 2027-01-15 09:30)",
    ]


def test_a_column_named_twice_is_refused() -> None:
    found = listfile.read("patient_id,appointment_time,patient_id\nA,1,B\n", "x")

    assert "column(s) named twice: patient_id" in found.problems[0]


def test_a_header_without_the_required_columns_is_refused() -> None:
    found = listfile.read("patient,when\nA,B\n", "x.csv")

    assert found.appointments == []
    (problem,) = found.problems
    assert "missing column(s) patient_id, appointment_time" in problem
    assert "unknown column(s) patient, when" in problem


def make_archive(folder: Path) -> Path:
    Catalog(folder / "catalog").close()
    return folder


def test_import_records_the_file_and_is_harmless_to_repeat(tmp_path: Path) -> None:
    data = make_archive(tmp_path / "data")
    day = tmp_path / "day.csv"
    day.write_text(GOOD)
    runner = CliRunner()

    first = runner.invoke(
        main, ["prefetch", "import", "--data-dir", str(data), str(day)]
    )
    again = runner.invoke(
        main, ["prefetch", "import", "--data-dir", str(data), str(day)]
    )
    listed = runner.invoke(
        main, ["prefetch", "appointments", "--data-dir", str(data), "--all", "--json"]
    )

    assert first.exit_code == 0, first.output
    assert "2 appointments recorded" in first.output
    assert again.exit_code == 0
    recorded = json.loads(listed.output)
    assert [a["key"] for a in recorded] == ["list:ACC1", "list:PAT-0077||202701160800"]


def test_a_bad_file_imports_nothing_and_fails(tmp_path: Path) -> None:
    data = make_archive(tmp_path / "data")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(GOOD + "PAT-9,,not a time,CT,,\n")

    result = CliRunner().invoke(
        main, ["prefetch", "import", "--data-dir", str(data), str(mixed)]
    )

    assert result.exit_code == 1
    assert "refused, nothing imported" in result.output
    assert "line 5" in result.output
    catalog = Catalog(data / "catalog", readonly=True)
    try:
        assert appointments.appointments(catalog) == []
    finally:
        catalog.close()


def test_import_without_an_archive_says_so(tmp_path: Path) -> None:
    day = tmp_path / "day.csv"
    day.write_text(GOOD)

    result = CliRunner().invoke(
        main, ["prefetch", "import", "--data-dir", str(tmp_path / "none"), str(day)]
    )

    assert result.exit_code == 1
    assert "no catalog" in result.output
    assert not (tmp_path / "none").exists()


def test_the_watched_folder_imports_settled_files_and_sorts_them(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "monday.csv").write_text(GOOD)
    (folder / "broken.csv").write_text("patient_id,appointment_time\nX,never\n")
    (folder / "growing.csv").write_text(GOOD)
    (folder / "notes.txt").write_text("not a list")
    secret = tmp_path / "secret.txt"
    secret.write_text("made-up-secret-line\n")
    (folder / "link.csv").symlink_to(secret)
    old = time.time() - 3600
    for name in ("monday.csv", "broken.csv", "growing.csv"):
        os.utime(folder / name, (old, old))
    settling = watch.Settling()

    first_look = settling.settled(folder)
    # A copy that keeps the original's time is still seen growing.
    with open(folder / "growing.csv", "a") as more:
        more.write("PAT-0099,,2027-01-20 10:00,CT,,ACC99\n")
    os.utime(folder / "growing.csv", (old, old))
    second_look = settling.settled(folder)
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        counts = watch.import_files(catalog, second_look)
        recorded = appointments.appointments(catalog)
    finally:
        catalog.close()

    assert first_look == []
    assert [p.name for p in second_look] == ["broken.csv", "monday.csv"]
    assert counts == (1, 1)
    assert len(recorded) == 2
    assert (folder / "done" / "monday.csv").exists()
    assert (folder / "refused" / "broken.csv").exists()
    errors = (folder / "refused" / "broken.csv.errors").read_text()
    assert errors.startswith("line 2: appointment_time 'never'")
    assert (folder / "growing.csv").exists()
    assert (folder / "link.csv").is_symlink()
    assert (folder / "notes.txt").exists()
    assert [p.name for p in settling.settled(folder)] == ["growing.csv"]


def test_a_value_over_the_csv_modules_limit_refuses_the_file_without_a_traceback(
    tmp_path: Path,
) -> None:
    data = make_archive(tmp_path / "data")
    huge = tmp_path / "huge.csv"
    huge.write_text("patient_id,appointment_time\n" + "X" * 200_000 + ",2027-01-15\n")

    result = CliRunner().invoke(
        main, ["prefetch", "import", "--data-dir", str(data), str(huge)]
    )

    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "line 2: not read as CSV: field larger than field limit" in result.output


def test_a_file_the_csv_module_cannot_read_stops_neither_the_folder_nor_others(
    tmp_path: Path,
) -> None:
    # It crashed the prefetch run at every interval: no later file was
    # imported, and the planner never ran.
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a-huge.csv").write_text(
        "patient_id,appointment_time\n" + "X" * 200_000 + ",2027-01-15\n"
    )
    (folder / "b-monday.csv").write_text(GOOD)
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        counts = watch.import_files(catalog, sorted(folder.glob("*.csv")))
        recorded = appointments.appointments(catalog)
    finally:
        catalog.close()

    assert counts == (1, 1)
    assert len(recorded) == 2
    errors = (folder / "refused" / "a-huge.csv.errors").read_text()
    assert errors.startswith("line 2: not read as CSV")
    assert (folder / "done" / "b-monday.csv").exists()


def test_a_folder_that_cannot_take_done_files_stops_neither_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "done").write_text("a file where the done folder goes\n")
    (folder / "a-monday.csv").write_text(GOOD)
    (folder / "b-broken.csv").write_text("patient_id,appointment_time\nX,never\n")
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        counts = watch.import_files(catalog, sorted(folder.glob("*.csv")))
        recorded = appointments.appointments(catalog)
    finally:
        catalog.close()

    # Recorded, but left where it is: the next interval tries to move it.
    assert counts == (0, 1)
    assert len(recorded) == 2
    assert (folder / "a-monday.csv").exists()
    assert (folder / "refused" / "b-broken.csv").exists()
    assert "a-monday.csv left in the watched folder" in caplog.text


def test_values_longer_than_their_dicom_attribute_are_refused_not_cut() -> None:
    # The same limits as for HL7: an ID cut short matches another patient.
    text = (
        "patient_id,issuer,appointment_time,accession,modality,appointment_id\n"
        f"{'P' * 65},,2027-01-15 09:30,,,\n"
        f"A,{'I' * 65},2027-01-15 09:30,,,\n"
        f"B,,2027-01-15 09:30,{'1' * 17},,\n"
        f"C,,2027-01-15 09:30,,{'M' * 17},\n"
        f"D,,2027-01-15 09:30,,,{'K' * 65}\n"
        f"{'E' * 64},{'I' * 64},2027-01-15 09:30,{'1' * 16},CT,{'K' * 64}\n"
    )

    found = listfile.read(text, "long.csv")

    assert found.problems == [
        "line 2: patient_id is 65 characters long; at most 64 are taken",
        "line 3: issuer is 65 characters long; at most 64 are taken",
        "line 4: accession is 17 characters long; at most 16 are taken",
        "line 5: modality is 17 characters long; at most 16 are taken",
        "line 6: appointment_id is 65 characters long; at most 64 are taken",
    ]
    assert len(found.appointments) == 1


def test_a_quote_left_open_is_reported_on_the_line_it_opens() -> None:
    text = (
        "patient_id,appointment_time,modality\n"
        "A,2027-01-15 09:30,CT,extra\n"
        '"B,2027-01-15 09:30,CT\n'
    )

    found = listfile.read(text, "x.csv")

    assert found.problems == [
        "line 2: 4 fields, the header names 3",
        "line 3: 1 fields, the header names 3",
    ]


def test_a_time_out_of_range_is_named_as_the_appointment_time() -> None:
    found = listfile.read("patient_id,appointment_time\nA,0001-01-01 00:00\n", "x")

    assert found.problems == [
        "line 2: appointment_time '0001-01-01 00:00' is out of range"
    ]


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    # Checked whole, a list file takes some fifty times its size in
    # memory: a whole RIS export dropped in by mistake would exhaust it at
    # every prefetch interval.
    data = make_archive(tmp_path / "data")
    folder = tmp_path / "incoming"
    folder.mkdir()
    huge = folder / "export.csv"
    line = "PAT-0042,,2027-01-15 09:30,CT,,\n"
    with huge.open("w") as out:
        out.write(
            "patient_id,issuer,appointment_time,modality,procedure_code,accession\n"
        )
        out.write(line * (listfile.MAX_BYTES // len(line) + 1))

    result = CliRunner().invoke(
        main, ["prefetch", "import", "--data-dir", str(data), str(huge)]
    )
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        counts = watch.import_files(catalog, [huge])
        recorded = appointments.appointments(catalog)
    finally:
        catalog.close()

    assert result.exit_code == 1
    assert "larger than 8 MB" in result.output
    assert counts == (0, 1)
    assert recorded == []
    errors = (folder / "refused" / "export.csv.errors").read_text()
    assert "larger than 8 MB" in errors


def test_a_fifo_or_link_put_in_after_the_look_is_refused_not_waited_on(
    tmp_path: Path,
) -> None:
    # Between the look that found a settled file and its import, the RIS
    # (or anyone who can write there) may swap it: a FIFO would block the
    # prefetch run for ever, a link would be followed out of the folder.
    folder = tmp_path / "incoming"
    folder.mkdir()
    fifo = folder / "a-swapped.csv"
    os.mkfifo(fifo)
    secret = tmp_path / "secret.txt"
    secret.write_text("made-up-secret-line\n")
    (folder / "b-link.csv").symlink_to(secret)
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    done: list[tuple[int, int]] = []
    worker = threading.Thread(
        target=lambda: done.append(
            watch.import_files(catalog, sorted(folder.glob("*.csv")))
        ),
        daemon=True,
    )
    try:
        worker.start()
        worker.join(20)
        if worker.is_alive():  # let the stuck open go, then fail
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(5)
    finally:
        catalog.close()

    assert done == [(0, 2)]
    assert (
        "not a regular file"
        in (folder / "refused" / "a-swapped.csv.errors").read_text()
    )
    assert (
        "made-up-secret-line"
        not in (folder / "refused" / "b-link.csv.errors").read_text()
    )


def test_a_negative_number_of_days_is_refused_with_a_reason(tmp_path: Path) -> None:
    # It listed nothing, as if no appointment were coming.
    data = make_archive(tmp_path / "data")

    result = CliRunner().invoke(
        main, ["prefetch", "appointments", "--data-dir", str(data), "--days", "-1"]
    )

    assert result.exit_code == 2
    assert "Invalid value for '--days'" in result.output


def test_a_file_name_or_column_cannot_forge_a_line_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The RIS names the files it drops: a line break in a name, or in a
    # column name quoted in the refusal, started a log line of its own.
    folder = tmp_path / "incoming"
    folder.mkdir()
    forged = "\n2026-12-05 23:59:59,000 CRITICAL appliance.fake[1]: forged"
    (folder / f"a{forged}.csv").write_text(GOOD)
    (folder / "b.csv").write_text(f'patient_id,appointment_time,"x{forged}"\n')
    caplog.set_level("INFO")
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        counts = watch.import_files(catalog, sorted(folder.glob("*.csv")))
    finally:
        catalog.close()

    assert counts == (1, 1)
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("watch")]
    assert len(messages) == 2
    assert all("\n" not in message for message in messages)
    assert "\\x0a2026-12-05" in messages[0]


def test_one_appointment_on_two_lines_is_refused_not_overwritten() -> None:
    # The second line replaced the first unseen, and the import still said
    # "2 appointments recorded".
    text = (
        "patient_id,appointment_time,modality,accession\n"
        "PAT-0042,2027-01-15 09:30,CT,ACC1\n"
        "PAT-0077,2027-01-16 09:30,MR,ACC1\n"
        "PAT-0042,2027-01-17 09:30,CT,ACC2\n"
    )

    found = listfile.read(text, "x.csv")

    assert found.problems == [
        "line 3: the same appointment as line 2 "
        "(appointment_id, else accession, else patient and time)"
    ]
