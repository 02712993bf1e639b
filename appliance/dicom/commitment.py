"""Storage Commitment Push Model SCP in a worker (PS3.4 J.3).

The N-ACTION handler checks the request and records the transaction in
the catalog before it answers Success, so that an accepted request
survives any crash. Right after the answer the referenced instances are
judged; when the result is known at once, the report (N-EVENT-REPORT)
follows on the requester's own association: pynetdicom's reactor is
still inside the service class then, so nothing else reads the messages
that arrive meanwhile. A report that cannot go that way (the requester
released the association, answered with a failure, did not answer), or a
transaction that waits for off-site copies, is left to the service's
commitment process, which opens a new association.
"""

from __future__ import annotations

import logging
import time
from io import BytesIO
from typing import TYPE_CHECKING, Any

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class_n import StorageCommitmentServiceClass

from appliance.catalog import commitments
from appliance.catalog.commitments import Transaction
from appliance.commitment import messages
from appliance.commitment.judge import State, judge, settle
from appliance.commitment.messages import BadRequest
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.dicom.node import Node

logger = logging.getLogger(__name__)

# Message ID of the report sent on the requester's association.
_REPORT_MESSAGE_ID = 1
# A report the worker sends on the requester's association is left to the
# commitment process this many seconds after the DIMSE timeout (in case
# the worker dies on the way).
_HOLD_MARGIN = 5.0


def install() -> None:
    """Serve Storage Commitment with :class:`CommitmentService`, through the
    same seam as the retrieve service (pynetdicom's choice of service
    class per SOP class)."""
    previous = pynetdicom.association.uid_to_service_class

    def choose(uid: str) -> type:
        chosen = previous(uid)
        if chosen is StorageCommitmentServiceClass:
            return CommitmentService
        return chosen

    pynetdicom.association.uid_to_service_class = choose  # type: ignore[assignment]


class CommitmentService(StorageCommitmentServiceClass):
    """pynetdicom's Storage Commitment service, then the report."""

    def SCP(self, req: Any, context: PresentationContext) -> None:
        super().SCP(req, context)
        node: Node | None = getattr(self.assoc.ae, "node", None)
        if isinstance(req, N_ACTION) and node is not None:
            node.commitment.report_due(self.assoc, context)


class CommitmentSCP:
    """The N-ACTION handler, and what follows its answer: judging the
    instances and the report on the requester's association."""

    def __init__(self, node: Node) -> None:
        self.node = node
        config = node.config
        self.require_offsite: bool = config.get("commitment.require_offsite")
        self.timeout: float = config.get("commitment.timeout")
        self.dimse_timeout: float = config.get("timeouts.dimse")
        self.max_references: int = config.get("commitment.max_references")
        # Association (by id) -> the transaction just answered, and whether
        # it is new (to be judged) or repeated (its report to be sent again).
        self._due: dict[int, tuple[Transaction, bool]] = {}

    def on_action(self, event: evt.Event) -> tuple[Dataset, None]:
        """Answer an N-ACTION (PS3.4 J.3.2): Success once the request is
        recorded, a failure status and one log line otherwise."""
        assoc = event.assoc
        caller = self.node.describe(assoc)
        try:
            request = self._read(event)
            transaction, new = self._record(request, caller)
        except BadRequest as exc:
            logger.warning(
                "storage commitment request from %s refused (0x%04X): %s",
                caller,
                exc.status,
                exc.reason,
            )
            return _status(exc.status, exc.reason), None
        except ApplianceError as exc:
            logger.error("storage commitment request from %s failed: %s", caller, exc)
            return _status(messages.PROCESSING_FAILURE, str(exc)), None
        self._due[id(assoc)] = (transaction, new)
        return _status(messages.SUCCESS), None

    def _read(self, event: evt.Event) -> messages.Request:
        if not self.node.may_store(event.assoc):
            raise BadRequest(messages.NOT_AUTHORISED, "caller may not store")
        request = event.request
        assert isinstance(request, N_ACTION)  # bound to EVT_N_ACTION only
        if request.ActionTypeID != messages.REQUEST_COMMITMENT:
            raise BadRequest(
                messages.NO_SUCH_ACTION, f"action type {request.ActionTypeID}"
            )
        instance = str(request.RequestedSOPInstanceUID or "")
        if instance != messages.STORAGE_COMMITMENT_INSTANCE:
            raise BadRequest(
                messages.NO_SUCH_INSTANCE, f"requested SOP instance {instance!r}"
            )
        self._check_size(request, event.context.transfer_syntax.is_deflated)
        try:
            information = event.action_information
            found = messages.read_request(information)
        except BadRequest:
            raise
        except Exception as exc:
            raise BadRequest(
                messages.PROCESSING_FAILURE,
                f"cannot decode the Action Information: {exc}",
            ) from exc
        messages.check_count(found, self.max_references)
        return found

    def _check_size(self, request: N_ACTION, deflated: bool) -> None:
        """Refuse an Action Information too long for the references allowed
        before pynetdicom decodes it."""
        encoded = request.ActionInformation
        if not isinstance(encoded, BytesIO):
            return
        messages.check_size(encoded.getvalue(), deflated, self.max_references)

    def _hold(self, now: float) -> float:
        """Until when the commitment process leaves a transaction to the
        worker that answered it (longer only if that worker died)."""
        return now + self.dimse_timeout + _HOLD_MARGIN

    def _record(
        self, request: messages.Request, caller: str
    ) -> tuple[Transaction, bool]:
        """Record the request, to be judged once it is answered; a repeated
        Transaction UID finds the first one instead."""
        now = time.time()
        calling_ae = caller.rsplit("@", 1)[0]
        transaction = Transaction(
            request.transaction_uid,
            calling_ae,
            request.references,
            received=now,
            deadline=now + self.timeout,
            deliver_after=self._hold(now),
        )
        stored, new = commitments.open_transaction(self.node.catalog, transaction)
        if new:
            return stored, True
        if stored.references != request.references:
            raise BadRequest(
                messages.PROCESSING_FAILURE,
                f"Transaction UID {stored.uid} was used for other instances",
            )
        logger.info(
            "storage commitment %s from %s repeated (request %d): "
            "answered with the first result, %s",
            stored.uid,
            caller,
            stored.requests,
            stored.state,
        )
        return stored, False

    def report_due(self, assoc: Association, context: PresentationContext) -> None:
        """After the N-ACTION response: judge a new request and send the
        report on the same association if its result is known; else leave
        it to the commitment process."""
        entry = self._due.pop(id(assoc), None)
        if entry is None:
            return
        transaction, new = entry
        try:
            if new:
                transaction = self._judge(transaction, self.node.describe(assoc))
            if transaction.state == commitments.DECIDED:
                self._report(assoc, context, transaction)
        except Exception:
            # Recorded already: the commitment process finishes the work.
            logger.exception("storage commitment %s failed", transaction.uid)

    def _judge(self, transaction: Transaction, caller: str) -> Transaction:
        node = self.node
        findings = judge(
            node.catalog, node.online, transaction.references, self.require_offsite
        )
        now = time.time()
        decided = settle(transaction, findings, now, deliver_after=self._hold(now))

        def record(stored: Transaction) -> bool:
            if stored.state != commitments.WAITING:
                return False
            if decided:
                stored.decide(
                    transaction.committed, transaction.failed, transaction.deliver_after
                )
            else:
                stored.deliver_after = 0.0  # the commitment process waits
            return True

        stored = commitments.update(node.catalog, transaction.uid, record)
        logger.info(
            "storage commitment %s from %s: %d instance(s), %d committed, "
            "%d failed, %d waiting for the mirror",
            transaction.uid,
            caller,
            len(findings),
            len(transaction.committed),
            len(transaction.failed),
            sum(f.state is State.WAITING for f in findings),
        )
        return stored if stored is not None else transaction

    def _report(
        self, assoc: Association, context: PresentationContext, report: Transaction
    ) -> None:
        catalog = self.node.catalog
        caller = self.node.describe(assoc)
        problem = self._send(assoc, context, report)
        if not problem:
            commitments.mark_reported(catalog, report.uid, time.time())
            logger.info(
                "storage commitment %s: report (event type %d) delivered "
                "to %s on its association",
                report.uid,
                messages.event_type(report),
                caller,
            )
            return
        commitments.mark_undelivered(catalog, report.uid, problem, 0.0)
        logger.info(
            "storage commitment %s: report not delivered to %s on its "
            "association (%s); it goes on a new association",
            report.uid,
            caller,
            problem,
        )

    def _send(
        self, assoc: Association, context: PresentationContext, report: Transaction
    ) -> str:
        """Send the report and wait for the answer; '' when it was Success,
        else what went wrong."""
        if not assoc.is_established or _release_requested(assoc):
            return "the association is closing"
        request = N_EVENT_REPORT()
        request.MessageID = _REPORT_MESSAGE_ID
        request.AffectedSOPClassUID = messages.STORAGE_COMMITMENT
        request.AffectedSOPInstanceUID = messages.STORAGE_COMMITMENT_INSTANCE
        request.EventTypeID = messages.event_type(report)
        syntax = context.transfer_syntax[0]
        information = messages.event_information(report, self.node.ae_title)
        encoded = encode(
            information,
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
        if encoded is None:
            return "the report cannot be encoded"
        request.EventInformation = BytesIO(encoded)
        assoc.dimse.send_msg(request, context.context_id)  # type: ignore[arg-type]
        return _await_answer(assoc, self.dimse_timeout)


def _await_answer(assoc: Association, timeout: float) -> str:
    """Wait for the answer to the report, leaving any other message queued
    for pynetdicom's reactor; stop early when the requester releases or
    aborts the association."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Release first: an answer sent before the release is queued by then.
        released = _release_requested(assoc)
        found, answer = _take_answer(assoc)
        if found and answer is None:
            return "the association was aborted"
        if answer is not None:
            status = int(getattr(answer, "Status", -1))
            return "" if status == 0 else f"the requester answered 0x{status:04X}"
        if released:
            return "the requester released the association"
        if not assoc.is_established or not assoc.dul.is_alive():
            return "the association ended"
        time.sleep(0.005)
    return "no answer within timeouts.dimse"


def _take_answer(assoc: Association) -> tuple[bool, Any]:
    """(True, the answer) if the report's answer is queued; (True, None)
    if the queue says the association was aborted; (False, None) else."""
    queue = assoc.dimse.msg_queue
    with queue.mutex:
        for index, (_context, message) in enumerate(queue.queue):
            if message is None:
                return True, None
            answered = getattr(message, "MessageIDBeingRespondedTo", None)
            if isinstance(message, N_EVENT_REPORT) and answered == _REPORT_MESSAGE_ID:
                del queue.queue[index]
                return True, message
    return False, None


def _release_requested(assoc: Association) -> bool:
    """Whether the peer asked to release, without taking the request from
    pynetdicom (its reactor answers it)."""
    waiting = assoc.dul.peek_next_pdu()
    return isinstance(waiting, A_RELEASE) and waiting.result is None


def _status(status: int, comment: str = "") -> Dataset:
    dataset = Dataset()
    dataset.Status = status
    if comment and status != messages.SUCCESS:
        dataset.ErrorComment = comment[:64]
    return dataset
