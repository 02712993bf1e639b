"""Storage commitment transactions: what was asked, what was found, and
whether the report reached the requester.

One record per Transaction UID in ``commitments``; the ones whose report
has not been delivered yet are also listed in ``commitments.pending``, so
that the process delivering reports reads a short list. Records stay for
the retention time after they were received, so that a repeated request is
answered with the same result instead of being judged again.

States: ``waiting`` (some instances lack the off-site copy the
configuration requires; judged again until the deadline), ``decided``
(result known, report not delivered), ``reported`` and ``expired`` (the
report could not be delivered within the retention time).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from appliance.catalog import codec
from appliance.catalog.store import Catalog, encode_key
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

WAITING = "waiting"
DECIDED = "decided"
REPORTED = "reported"
EXPIRED = "expired"
_OPEN_STATES = (WAITING, DECIDED)


@dataclass
class Transaction:
    """One storage commitment request and what became of it."""

    uid: str
    # The requester's AE title: where a report goes on a new association.
    caller: str
    # (SOP Class UID, SOP Instance UID) in the order of the request.
    references: list[list[str]]
    received: float
    state: str = WAITING
    # Until when a waiting transaction waits for off-site copies.
    deadline: float = 0.0
    committed: list[list[str]] = field(default_factory=list)
    # (SOP Class UID, SOP Instance UID, Failure Reason in hex: "0x0112")
    failed: list[list[str]] = field(default_factory=list)
    # No delivery on a new association before this time: the worker that
    # decided tries the requester's own association first.
    deliver_after: float = 0.0
    attempts: int = 0
    last_error: str = ""
    reported: float = 0.0
    # N-ACTION requests received with this Transaction UID.
    requests: int = 1

    @property
    def is_open(self) -> bool:
        return self.state in _OPEN_STATES

    def decide(
        self,
        committed: list[list[str]],
        failed: list[list[str]],
        deliver_after: float,
    ) -> None:
        """Record the result; the report is due from ``deliver_after``."""
        self.state = DECIDED
        self.committed = committed
        self.failed = failed
        self.deliver_after = deliver_after
        self.attempts = 0
        self.last_error = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transaction:
        return cls(**data)


def open_transaction(catalog: Catalog, new: Transaction) -> tuple[Transaction, bool]:
    """Record a new request, or find the one with the same Transaction UID.

    Returns the transaction as stored and whether it is new. A repeated
    request with the same references counts one more request and, when the
    result is known, makes its report due again from ``new.deliver_after``;
    one with other references changes nothing (the caller refuses it).
    Both happen in one write transaction, so that two workers receiving the
    same request at once record it once.
    """
    try:
        with catalog.env.begin(write=True) as txn:
            raw = txn.get(encode_key(new.uid), db=catalog.db["commitments"])
            if raw is None:
                _put(catalog, txn, new)
                return new, True
            found = Transaction.from_json(codec.loads(raw))
            if found.references != new.references:
                return found, False
            found.requests += 1
            if found.state != WAITING:
                found.decide(found.committed, found.failed, new.deliver_after)
            _put(catalog, txn, found)
            return found, False
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record commitment {new.uid}: {exc}") from exc


def get(catalog: Catalog, uid: str) -> Transaction | None:
    with catalog.read() as txn:
        raw = txn.get(encode_key(uid), db=catalog.db["commitments"])
    return None if raw is None else Transaction.from_json(codec.loads(raw))


def pending(catalog: Catalog) -> list[Transaction]:
    """Every transaction whose report has not been delivered, oldest first."""
    found = []
    with catalog.read() as txn:
        for key, _value in txn.cursor(db=catalog.db["commitments.pending"]):
            raw = txn.get(key, db=catalog.db["commitments"])
            if raw is not None:
                found.append(Transaction.from_json(codec.loads(raw)))
    return sorted(found, key=lambda transaction: transaction.received)


def pending_count(catalog: Catalog) -> int:
    """How many transactions wait for their report to be delivered."""
    with catalog.read() as txn:
        return int(txn.stat(catalog.db["commitments.pending"])["entries"])


def update(
    catalog: Catalog, uid: str, change: Callable[[Transaction], bool]
) -> Transaction | None:
    """Apply ``change`` to the stored transaction in one write transaction;
    it returns False to leave the record as it was. The record after the
    change, or None when there is none."""
    try:
        with catalog.env.begin(write=True) as txn:
            raw = txn.get(encode_key(uid), db=catalog.db["commitments"])
            if raw is None:
                return None
            transaction = Transaction.from_json(codec.loads(raw))
            if change(transaction):
                _put(catalog, txn, transaction)
            return transaction
    except lmdb.Error as exc:
        raise CatalogError(f"cannot update commitment {uid}: {exc}") from exc


def prune(catalog: Catalog, received_before: float) -> int:
    """Forget closed transactions received before ``received_before``;
    how many were forgotten."""
    try:
        with catalog.env.begin(write=True, db=catalog.db["commitments"]) as txn:
            old = [
                bytes(key)
                for key, raw in txn.cursor()
                if _closed_before(codec.loads(raw), received_before)
            ]
            for key in old:
                txn.delete(key)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot prune commitments: {exc}") from exc
    return len(old)


def _closed_before(record: dict[str, Any], when: float) -> bool:
    return record["state"] not in _OPEN_STATES and record["received"] < when


def _put(catalog: Catalog, txn: lmdb.Transaction, transaction: Transaction) -> None:
    key = encode_key(transaction.uid)
    data = json.dumps(transaction.as_json(), separators=(",", ":"))
    txn.put(key, data.encode(), db=catalog.db["commitments"])
    if transaction.is_open:
        txn.put(key, b"", db=catalog.db["commitments.pending"])
    else:
        txn.delete(key, db=catalog.db["commitments.pending"])


def mark_reported(catalog: Catalog, uid: str, when: float) -> None:
    """The requester answered the report with Success."""

    def change(transaction: Transaction) -> bool:
        if transaction.state != DECIDED:
            return False
        transaction.state = REPORTED
        transaction.reported = when
        transaction.attempts += 1
        transaction.last_error = ""
        return True

    update(catalog, uid, change)


def mark_undelivered(catalog: Catalog, uid: str, error: str, retry_at: float) -> int:
    """A delivery attempt failed; the next one is due at ``retry_at``.
    The number of failed attempts so far."""

    def change(transaction: Transaction) -> bool:
        if transaction.state != DECIDED:
            return False
        transaction.attempts += 1
        transaction.last_error = error
        transaction.deliver_after = retry_at
        return True

    found = update(catalog, uid, change)
    return found.attempts if found is not None else 0
