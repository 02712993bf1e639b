"""The ACKs kept for resent HL7 messages are deleted once older than
hl7.ack_days, a few at a time; newer ones stay and still answer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.catalog import answers
from appliance.catalog.store import Catalog
from appliance.prefetch.hl7_process import prune_answers

NOW = 1_800_000_000.0
DAY = 86_400.0


def _keep(catalog: Catalog, count: int, age_days: float, label: str) -> None:
    with catalog.env.begin(write=True) as txn:
        for n in range(count):
            record = answers.answer(b"MSH|^~\\\\&|ACK", f"{n:064x}", "ADT^A08")
            record["time"] = NOW - age_days * DAY - n
            catalog._put(txn, answers.DATABASE, f"RIS|{label}{n:05d}", record)


def _kept(catalog: Catalog) -> list[str]:
    with catalog.read() as txn:
        return [key for key, _ in catalog.all_records(txn, answers.DATABASE)]


def test_answers_older_than_the_limit_go_and_the_others_stay(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        # More than one transaction's share, old and new interleaved by key.
        _keep(catalog, 1500, 40, "a")
        _keep(catalog, 1200, 2, "b")
        _keep(catalog, 300, 31, "c")

        deleted = answers.prune(catalog, NOW - 30 * DAY)

        assert deleted == 1800
        kept = _kept(catalog)
        assert len(kept) == 1200 and all(key.startswith("RIS|b") for key in kept)
        with catalog.read() as txn:
            assert answers.recall(catalog, txn, "RIS|b00000") is not None
        assert answers.prune(catalog, NOW - 30 * DAY) == 0
    finally:
        catalog.close()


def test_pruning_logs_what_it_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    try:
        _keep(catalog, 3, 40, "a")
        with caplog.at_level(logging.INFO, logger="appliance.prefetch.hl7_process"):
            prune_answers(catalog, NOW - 30 * DAY)
            prune_answers(catalog, NOW - 30 * DAY)
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["3 HL7 answer(s) older than hl7.ack_days deleted"]
    finally:
        catalog.close()
