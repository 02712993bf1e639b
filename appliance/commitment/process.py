"""The service's commitment process: reports that workers could not deliver.

One child process of the listener (started again if it dies) reads the
pending transactions from the catalog about once a second. A transaction
waiting for off-site copies is judged again until the copies are there or
its deadline passes; a decided one whose report is due is sent on a new
association to the requester's ``[[peers]]`` address. A transaction a
worker has just answered is left to that worker until its
``deliver_after`` time (the worker judges it and tries the requester's own
association first); past it, the worker is taken to have died. A failed attempt is
tried again after ``commitment.retry_initial`` seconds, doubling up to
``commitment.retry_max``, until ``commitment.retention_days`` after the
request; then the report is given up with an error line. Everything it
knows is in the catalog, so a restart loses no report.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from appliance import logs
from appliance.catalog import commitments
from appliance.catalog.commitments import Transaction
from appliance.catalog.store import Catalog
from appliance.children import ChildSupervisor, die_with_parent
from appliance.commitment import messages
from appliance.commitment.delivery import Undelivered, deliver
from appliance.commitment.judge import judge, settle
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

_POLL = 1.0
_PRUNE_EVERY = 3600.0
_DAY = 86400.0


class CommitmentSupervisor(ChildSupervisor):
    """Runs the commitment process beside the service until :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        super().__init__(run_commitment, (config,), "commitment", stop_grace=30.0)


def run_commitment(config: Config) -> None:
    """Deliver reports until SIGTERM (the child process's work)."""
    die_with_parent()
    logs.setup(config.get("logging.level"), config.get("logging.format"))
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    try:
        Reporter(config, catalog).run(stop)
    finally:
        catalog.close()


class Reporter:
    """One pass after another over the pending transactions."""

    def __init__(self, config: Config, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.online = OnlineTier(config.online_path)
        self.require_offsite: bool = config.get("commitment.require_offsite")
        self.retry_initial: float = config.get("commitment.retry_initial")
        self.retry_max: float = config.get("commitment.retry_max")
        self.retention = config.get("commitment.retention_days") * _DAY

    def run(self, stop: threading.Event) -> None:
        pruned = 0.0
        while not stop.is_set():
            now = time.time()
            if now - pruned >= _PRUNE_EVERY:
                self._prune(now)
                pruned = now
            try:
                self.one_pass(stop)
            except ApplianceError as exc:
                logger.error("storage commitment: %s", exc)
            stop.wait(_POLL)

    def one_pass(self, stop: threading.Event) -> None:
        # Requesters not reached in this pass: their other reports wait for
        # the next one, instead of each waiting for a connection timeout.
        unreached: set[str] = set()
        for transaction in commitments.pending(self.catalog):
            if stop.is_set():
                return
            now = time.time()
            if now - transaction.received > self.retention:
                self._give_up(transaction)
            elif transaction.deliver_after > now or transaction.caller in unreached:
                continue  # a worker has it, or the next attempt is later
            elif transaction.state == commitments.WAITING:
                if not self._judge_again(transaction, now):
                    unreached.add(transaction.caller)
            elif not self._deliver(transaction):
                unreached.add(transaction.caller)

    def _judge_again(self, transaction: Transaction, now: float) -> bool:
        """Judge a waiting transaction again, and deliver its report once it
        is decided; False when that delivery failed."""
        findings = judge(
            self.catalog, self.online, transaction.references, self.require_offsite
        )
        if not settle(transaction, findings, now, deliver_after=now):
            return True

        def decide(stored: Transaction) -> bool:
            if stored.state != commitments.WAITING:
                return False
            stored.decide(transaction.committed, transaction.failed, now)
            return True

        commitments.update(self.catalog, transaction.uid, decide)
        logger.info(
            "storage commitment %s: decided after waiting for the mirror, "
            "%d committed, %d failed",
            transaction.uid,
            len(transaction.committed),
            len(transaction.failed),
        )
        return self._deliver(transaction)

    def _deliver(self, transaction: Transaction) -> bool:
        """Send the report on a new association; whether it was delivered."""
        peer = self.config.peer(transaction.caller)
        try:
            if peer is None:
                raise Undelivered(
                    f"no [[peers]] entry for AE title {transaction.caller!r}"
                )
            deliver(self.config, peer, transaction)
        except Undelivered as exc:
            self._retry_later(transaction, str(exc))
            return False
        except Exception as exc:  # a report is never lost to a surprise
            logger.exception("storage commitment %s: delivery failed", transaction.uid)
            self._retry_later(transaction, f"{type(exc).__name__}: {exc}")
            return False
        commitments.mark_reported(self.catalog, transaction.uid, time.time())
        logger.info(
            "storage commitment %s: report (event type %d) delivered to %s "
            "at %s:%d on a new association",
            transaction.uid,
            messages.event_type(transaction),
            peer.ae_title,
            peer.host,
            peer.port,
        )
        return True

    def _retry_later(self, transaction: Transaction, error: str) -> None:
        attempts = transaction.attempts + 1
        wait = backoff(attempts, self.retry_initial, self.retry_max)
        commitments.mark_undelivered(
            self.catalog, transaction.uid, error, time.time() + wait
        )
        logger.warning(
            "storage commitment %s: report to %s not delivered (%s); "
            "attempt %d, next in %.1f s",
            transaction.uid,
            transaction.caller,
            error,
            attempts,
            wait,
        )

    def _give_up(self, transaction: Transaction) -> None:
        def expire(stored: Transaction) -> bool:
            stored.state = commitments.EXPIRED
            return True

        commitments.update(self.catalog, transaction.uid, expire)
        logger.error(
            "storage commitment %s: report to %s given up after %d day(s) "
            "(last error: %s)",
            transaction.uid,
            transaction.caller,
            self.config.get("commitment.retention_days"),
            transaction.last_error or "none",
        )

    def _prune(self, now: float) -> None:
        try:
            dropped = commitments.prune(self.catalog, now - self.retention)
        except ApplianceError as exc:
            logger.error("storage commitment: %s", exc)
            return
        if dropped:
            logger.info("storage commitment: forgot %d old transaction(s)", dropped)


def backoff(attempts: int, initial: float, longest: float) -> float:
    """Seconds to wait after ``attempts`` failed deliveries: ``initial``
    after the first, doubling after each further one, at most ``longest``."""
    doublings = min(max(0, attempts - 1), 64)  # a month of retries stays finite
    return float(min(longest, initial * 2**doublings))
