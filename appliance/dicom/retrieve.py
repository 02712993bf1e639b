"""C-MOVE and C-GET SCP: send stored instances exactly as they were received.

pynetdicom's own retrieve loop re-encodes the data sets its handlers yield;
an archive must send the stored bytes. This service class runs the loop
itself: it sends each instance from its file (raw, chunked), answers a
pending response after every sub-operation with the counts of PS3.4
C.4.2.1.5 and C.4.3.1.5, honours C-CANCEL, and ends with 0x0000, 0xB000
(some failed, with the Failed SOP Instance UID List) or 0xA702 (all failed).

A final response that lists failed instances goes out as one P-DATA-TF
holding both its command and its identifier when it fits the requester's
maximum PDU length (PS3.8 9.3.5 allows several PDVs in one PDU). DCMTK's
getscu (3.6.7) reads only the command of a C-GET response: an identifier
in a PDU of its own was left waiting, and getscu took it for the answer
to its A-RELEASE-RQ ("DUL P-Data PDU arrived") and aborted.

A request that cannot be served gets a failure status and the association
stays usable: 0xA801 for a C-MOVE whose Move Destination is not a
configured peer (empty, blank or malformed included), 0xA900 for an
identifier without a valid level and unique key, 0xC000 for one that cannot
be decoded.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pynetdicom.association
import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import uid_to_service_class

from appliance import audit, tls
from appliance.audit import dicom as audit_dicom
from appliance.catalog import pins
from appliance.catalog.coercion import CorrectedPatients, coerce
from appliance.catalog.query import Query, find
from appliance.catalog.records import text_of
from appliance.config import Peer
from appliance.dicom import fragments
from appliance.dicom.find import decode_identifier, levels_of
from appliance.dicom.find import serve as serve_find
from appliance.dicom.handoff import QuickAckSocket
from appliance.dicom.responses import p_data
from appliance.errors import ApplianceError, ConfigError
from appliance.metrics import events
from appliance.storage.online import TIER_NAME

if TYPE_CHECKING:
    from appliance.dicom.node import Node

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCELLED = 0xFE00
SOME_FAILED = 0xB000
ALL_FAILED = 0xA702
UNKNOWN_DESTINATION = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

_UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Seconds between pending responses while a study is recalled.
_RECALL_PENDING_EVERY = 2.0
# A requested association may propose at most 128 presentation contexts.
_MAX_CONTEXTS = 128
# In a PDV's message control header: the fragment is of the command set.
_COMMAND_BIT = 0x01


@dataclass
class _Item:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    path: Path | None
    # The catalog's record of a corrected patient (coerced when sent);
    # None sends the stored bytes as they are.
    patient: dict[str, Any] | None = None


@dataclass
class _Counts:
    remaining: int
    failed: int = 0
    warning: int = 0
    completed: int = 0
    failed_uids: list[str] = field(default_factory=list)


class MoveRequest(C_MOVE):
    """A received C-MOVE request whose Move Destination is taken as it comes.

    pynetdicom's C_MOVE refuses an empty, blank or over-long Move
    Destination while the request is decoded, and the association is
    aborted. Here any value is kept, a missing one as empty, so that the
    request reaches :class:`QueryRetrieveService`, which answers 0xA801
    (PS3.4 C.4.2.1.5) and keeps the association.
    """

    @property
    def MoveDestination(self) -> str:
        return self._move_destination or ""

    @MoveDestination.setter
    def MoveDestination(self, value: str | bytes | None) -> None:
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        self._move_destination = (value or "").strip()


def install() -> None:
    """Route Query/Retrieve requests to :class:`QueryRetrieveService`.

    pynetdicom picks the service class for a request with the module-level
    ``uid_to_service_class`` of its association module; wrapping that one
    function is the narrowest seam that lets this class serve retrieves
    while pynetdicom keeps serving everything else. Likewise, incoming
    C-MOVE messages become :class:`MoveRequest` primitives through the
    table pynetdicom looks their class up in.
    """

    def choose(uid: str) -> type:
        chosen = uid_to_service_class(uid)
        if chosen is QueryRetrieveServiceClass:
            return QueryRetrieveService
        return chosen

    pynetdicom.association.uid_to_service_class = choose  # type: ignore[assignment]
    pynetdicom.dimse_messages._MSG_TO_PRIMITVE["C_MOVE"] = MoveRequest
    # Send stored files as raw bytes, never decoded and re-encoded.
    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom.association").addFilter(_said_by_the_sub_operation)


# Set while a sub-operation's C-STORE is sent: what goes wrong there is
# logged once, by the sub-operation, with the instance's UID.
_SENDING = contextvars.ContextVar("sending_sub_operation", default=False)


def _said_by_the_sub_operation(record: logging.LogRecord) -> bool:
    """Drop pynetdicom's own error line for a C-STORE it refuses to send for
    want of an accepted presentation context: it raises, and the
    sub-operation logs the failure as a warning of its own (a peer that
    declined a transfer syntax is not an error of the archive's)."""
    return not (_SENDING.get() and record.getMessage().startswith("No presentation"))


class QueryRetrieveService(QueryRetrieveServiceClass):
    """Query/Retrieve with the appliance's own C-FIND, C-GET and C-MOVE loops."""

    # Why instances could not be sent: the volumes a recall waits for.
    _waiting = ""

    def SCP(self, req: Any, context: PresentationContext) -> None:
        if isinstance(req, C_GET | C_MOVE):
            with events.timed("get" if isinstance(req, C_GET) else "move"):
                self._retrieve(req, context)
        elif isinstance(req, C_FIND):
            with events.timed("find"):
                serve_find(self, self.node, req, context)
        else:
            super().SCP(req, context)

    @property
    def node(self) -> Node:
        return self.assoc.ae.node  # type: ignore[attr-defined, no-any-return]

    def _retrieve(self, req: C_GET | C_MOVE, context: PresentationContext) -> None:
        caller = self.node.describe(self.assoc)
        if not self.node.may_query(self.assoc):
            # Reached on a storage context: see find.serve.
            logger.warning(
                "retrieve from %s refused: caller not allowed to retrieve", caller
            )
            self._final(req, context, 0x0124, None, "not authorised to retrieve")
            return
        peer = None
        if isinstance(req, C_MOVE):
            # Checked before anything is looked up, let alone recalled.
            peer = self._destination(req, context, caller)
            if peer is None:
                return
        query = self._requested_query(req, context, caller)
        if query is not None:
            self._serve(req, context, query, caller, peer)

    def _serve(
        self,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        query: Query,
        caller: str,
        peer: Peer | None,
    ) -> None:
        items = self._items(query)
        self._waiting = ""
        if items:
            # Touched before anything is sent, so that a watermark release
            # running meanwhile takes other, less recently used studies.
            studies = {item.study_uid for item in items}
            self.node.catalog.touch_studies(studies)
            missing = {item.study_uid for item in items if item.path is None}
            pins.note_retrievals(self.node.catalog, studies, missing, time.time())
        if any(item.path is None for item in items):
            items = self._recall(req, context, query, items)
        if items and all(item.path is None for item in items):
            # Nothing can be sent: say why without opening a sub-association.
            counts = _Counts(0, failed=len(items))
            counts.failed_uids = [item.sop_instance_uid for item in items]
            reason = self._waiting or "no readable copy of these instances"
            logger.warning("retrieve from %s: nothing sent, %s", caller, reason)
            self._final(req, context, ALL_FAILED, counts, reason)
        elif isinstance(req, C_GET):
            counts = self._get(req, context, items, caller)
        elif peer is not None:
            counts = self._move(req, context, items, caller, peer)
        else:
            return
        destination = audit.Peer(peer.ae_title, peer.host) if peer else None
        audit_dicom.retrieved(
            self.node.audit,
            self.node.catalog,
            audit_dicom.peer_of(self.assoc),
            destination,
            items,
            counts.failed_uids,
            counts.remaining,
        )

    def _destination(
        self, req: C_MOVE, context: PresentationContext, caller: str
    ) -> Peer | None:
        """The configured peer the C-MOVE names, or None after answering
        0xA801 (PS3.4 C.4.2.1.5)."""
        destination = str(req.MoveDestination or "").strip()
        peer = self.node.config.peer(destination) if destination else None
        if peer is not None:
            return peer
        if destination:
            logger.warning(
                "C-MOVE from %s to unknown destination %r", caller, destination
            )
            comment = "unknown move destination"
        else:
            logger.warning("C-MOVE from %s without a move destination", caller)
            comment = "no move destination given"
        self._final(req, context, UNKNOWN_DESTINATION, None, comment)
        return None

    def _requested_query(
        self, req: C_GET | C_MOVE, context: PresentationContext, caller: str
    ) -> Query | None:
        """The catalog query for what the identifier names, or None after
        answering 0xC000 (undecodable) or 0xA900 (no valid level or key)."""
        try:
            identifier = decode_identifier(req, context.transfer_syntax[0])
        except ValueError as exc:
            logger.warning(
                "retrieve from %s refused: cannot decode the identifier: %s",
                caller,
                exc,
            )
            comment = "cannot decode the identifier"
            self._final(req, context, UNABLE_TO_PROCESS, None, comment)
            return None
        try:
            return _query(identifier, str(req.AffectedSOPClassUID))
        except ValueError as exc:
            logger.warning("retrieve from %s refused: %s", caller, exc)
            self._final(req, context, IDENTIFIER_DOES_NOT_MATCH, None, str(exc))
        except Exception as exc:  # pydicom could not decode an element's value
            logger.warning(
                "retrieve from %s refused: cannot decode the identifier: %s",
                caller,
                exc,
            )
            comment = "cannot decode the identifier"
            self._final(req, context, UNABLE_TO_PROCESS, None, comment)
        return None

    def _items(self, query: Query) -> list[_Item]:
        catalog = self.node.catalog
        items = []
        # Instances of patients registration corrected are sent coerced.
        corrected = CorrectedPatients(catalog)
        for row in find(catalog, query, lambda: False):
            uid = row["SOPInstanceUID"] or ""
            with catalog.read() as txn:
                record = catalog.instance(txn, uid)
                patient = corrected.record(txn, record.patient) if record else None
            if record is None:
                continue
            copy = record.copy_on(TIER_NAME)
            path = self.node.online.path_of(copy.location) if copy else None
            items.append(
                _Item(
                    sop_instance_uid=uid,
                    sop_class_uid=record.attributes.get("SOPClassUID", ""),
                    transfer_syntax=record.transfer_syntax,
                    study_uid=record.study_uid,
                    path=path,
                    patient=patient,
                )
            )
        return items

    def _recall(
        self,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        query: Query,
        items: list[_Item],
    ) -> list[_Item]:
        """Stage studies that are not wholly online, then resolve again.

        While a recall runs, a pending response with the number of
        sub-operations goes out every few seconds so that the requester
        sees progress rather than silence.
        """
        recaller = self.node.recaller
        if recaller is None:
            return items
        waiting = _Counts(len(items))
        last = time.monotonic()

        def progress(_done: int, _total: int) -> None:
            nonlocal last
            if time.monotonic() - last >= _RECALL_PENDING_EVERY:
                self._respond(req, context, PENDING, waiting)
                last = time.monotonic()

        volumes: list[str] = []
        refused = False
        for study_uid in sorted({i.study_uid for i in items if i.path is None}):
            try:
                result = recaller.recall(study_uid, progress)
            except ApplianceError as exc:
                # The online tier refused the files (full, read only): what
                # is online is still sent, the rest fails, and the
                # association is answered rather than aborted.
                logger.error("recall of study %s failed: %s", study_uid, exc)
                refused = True
                continue
            volumes += [v for v in result.waiting_for if v not in volumes]
        if volumes:
            # The failure comment is what a workstation shows its user.
            listed = ", ".join(volumes)
            self._waiting = f"on volume {listed}; operator asked to load it"
        elif refused:
            self._waiting = "recall failed; the archive's log says why"
        return self._items(query)

    # -- C-GET: sub-operations on the same association -------------------

    def _get(
        self, req: C_GET, context: PresentationContext, items: list[_Item], caller: str
    ) -> _Counts:
        counts = self._run(req, context, items, self.assoc, originator=None)
        logger.info(
            "C-GET from %s: %d sent, %d failed, %d not attempted",
            caller,
            counts.completed + counts.warning,
            counts.failed,
            counts.remaining,
        )
        return counts

    # -- C-MOVE: sub-operations on a new association to the destination --

    def _move(
        self,
        req: C_MOVE,
        context: PresentationContext,
        items: list[_Item],
        caller: str,
        peer: Peer,
    ) -> _Counts:
        if not items:
            self._final(req, context, SUCCESS, _Counts(0))
            return _Counts(0)

        store, why = self._associate(peer, items)
        if store is None:
            counts = _Counts(0, failed=len(items))
            counts.failed_uids = [item.sop_instance_uid for item in items]
            logger.warning(
                "C-MOVE from %s: cannot associate with %s at %s:%d%s%s",
                caller,
                peer.ae_title,
                peer.host,
                peer.port,
                " over TLS" if peer.tls else "",
                f": {why}" if why else "",
            )
            self._final(req, context, ALL_FAILED, counts, "destination unreachable")
            return counts

        try:
            counts = self._run(req, context, items, store, originator=req)
        finally:
            if store.is_established:
                store.release()
        logger.info(
            "C-MOVE from %s to %s: %d sent, %d failed, %d not attempted",
            caller,
            peer.ae_title,
            counts.completed + counts.warning,
            counts.failed,
            counts.remaining,
        )
        return counts

    def _associate(
        self, peer: Peer, items: list[_Item]
    ) -> tuple[pynetdicom.association.Association | None, str]:
        """The association with the destination, or None and why (when it
        is not already logged)."""
        contexts = _contexts_for(items)
        ae = AE(ae_title=self.node.ae_title)
        timeouts = self.node.config
        ae.acse_timeout = timeouts.get("timeouts.association")
        ae.dimse_timeout = timeouts.get("timeouts.dimse")
        ae.network_timeout = timeouts.get("timeouts.network")
        ae.connection_timeout = timeouts.get("timeouts.connect")
        ae.requested_contexts = contexts
        try:
            # Over TLS when the peer is configured so (appliance.tls).
            tls_args = tls.client_args(self.node.config, peer)
        except ConfigError as exc:
            logger.error("C-MOVE to %s: %s", peer.ae_title, exc.problems[0][1])
            return None, ""
        connected: list[bool] = []
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _: connected.append(True))],
        )
        if not assoc.is_established:
            return None, _why_not_established(assoc, bool(connected))
        if short := fragments.too_short(assoc.acceptor.maximum_length):
            assoc.abort()
            return None, short
        tune_requestor(assoc)
        return assoc, ""

    # -- the loop shared by both -------------------------------------------

    def _run(
        self,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        items: list[_Item],
        store: pynetdicom.association.Association,
        originator: C_MOVE | None,
    ) -> _Counts:
        counts = _Counts(len(items))
        for index, item in enumerate(items):
            if self.is_cancelled(int(req.MessageID or 0)):
                self._final(req, context, CANCELLED, counts)
                return counts
            status = self._send_one(store, item, req, index, originator)
            counts.remaining -= 1
            _count(counts, status, item)
            ended = next((a for a in (self.assoc, store) if _ended(a)), None)
            if ended is not None:
                self._lost(ended, items, counts)
                if ended is self.assoc:
                    return counts  # no one is left to answer
                break
            if counts.remaining:
                self._respond(req, context, PENDING, counts)

        if counts.failed == 0 and counts.warning == 0:
            final = SUCCESS
        elif counts.completed == 0 and counts.warning == 0:
            final = ALL_FAILED
        else:
            final = SOME_FAILED
        comment = self._waiting if final != SUCCESS else None
        self._final(req, context, final, counts, comment)
        return counts

    def _lost(
        self,
        ended: pynetdicom.association.Association,
        items: list[_Item],
        counts: _Counts,
    ) -> None:
        """Count the instances left unsent by an association that ended as
        failed (a final response has no Remaining count), and say so once."""
        done = len(items) - counts.remaining
        left = items[done:]
        counts.failed += len(left)
        counts.failed_uids += [item.sop_instance_uid for item in left]
        counts.remaining = 0
        which = (
            "its association"
            if ended is self.assoc
            else f"the association with {ended.acceptor.ae_title}"
        )
        logger.warning(
            "retrieve from %s: %s ended after %d of %d sub-operations; "
            "%d not sent, counted as failed",
            self.node.describe(self.assoc),
            which,
            done,
            len(items),
            len(left),
        )

    def _send_one(
        self,
        store: pynetdicom.association.Association,
        item: _Item,
        req: C_GET | C_MOVE,
        index: int,
        originator: C_MOVE | None,
    ) -> int | None:
        if item.path is None:
            logger.warning("instance %s has no online copy", item.sop_instance_uid)
            return None
        message_id = (int(req.MessageID or 0) + index + 1) % 65536 or 1
        sending = _SENDING.set(True)
        try:
            sent = _what_to_send(item, item.path)
            if originator is None:
                response = store.send_c_store(sent, msg_id=message_id)
            else:
                response = store.send_c_store(
                    sent,
                    msg_id=message_id,
                    originator_aet=self.assoc.requestor.ae_title,
                    originator_id=originator.MessageID,
                )
        except (
            ValueError,
            AttributeError,
            OSError,
            RuntimeError,
            InvalidDicomError,
        ) as exc:
            if not _ended(store):  # else the loop says once what ended
                logger.warning(
                    "C-STORE sub-operation for %s failed: %s",
                    item.sop_instance_uid,
                    exc,
                )
            return None
        finally:
            _SENDING.reset(sending)
        if "Status" not in response:
            if _ended(store):
                return None
            logger.warning(
                "C-STORE sub-operation for %s: no response from %s",
                item.sop_instance_uid,
                store.acceptor.ae_title,
            )
            return None
        status = int(response.Status)
        if status != SUCCESS:
            comment = response.get("ErrorComment", "")
            logger.warning(
                "C-STORE sub-operation for %s: status 0x%04X from %s %s",
                item.sop_instance_uid,
                status,
                store.acceptor.ae_title,
                comment,
            )
        return status

    def _respond(
        self,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        status: int,
        counts: _Counts | None,
        comment: str | None = None,
        identifier: Dataset | None = None,
    ) -> None:
        response = C_GET() if isinstance(req, C_GET) else C_MOVE()
        response.MessageIDBeingRespondedTo = req.MessageID
        response.AffectedSOPClassUID = req.AffectedSOPClassUID
        response.Status = status
        if counts is not None:
            if status in (PENDING, CANCELLED):
                response.NumberOfRemainingSuboperations = counts.remaining
            response.NumberOfFailedSuboperations = counts.failed
            response.NumberOfWarningSuboperations = counts.warning
            response.NumberOfCompletedSuboperations = counts.completed
        if comment:
            # pynetdicom types this optional parameter as always None.
            response.ErrorComment = comment[:64]  # type: ignore[assignment]
        if identifier is not None:
            syntax = context.transfer_syntax[0]
            encoded = encode(
                identifier,
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
            response.Identifier = BytesIO(encoded or b"")
            self._send_together(response, int(context.context_id or 0))
            return
        self.dimse.send_msg(response, int(context.context_id or 0))

    def _send_together(self, response: C_GET | C_MOVE, context_id: int) -> None:
        """Send a response and its identifier in one P-DATA-TF when they fit
        the requester's maximum PDU length (see the module's docstring)."""
        message = C_GET_RSP() if isinstance(response, C_GET) else C_MOVE_RSP()
        message.primitive_to_message(response)
        message.context_id = context_id
        # As pynetdicom's own sending does, for anyone listening.
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        limit = self.dimse.maximum_pdu_size
        command, identifier = _parts_of(message.encode_msg(context_id, limit))
        for primitive in p_data(context_id, command, identifier, limit):
            self.assoc.dul.send_pdu(primitive)

    def _final(
        self,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        status: int,
        counts: _Counts | None,
        comment: str | None = None,
    ) -> None:
        identifier = None
        if counts is not None and counts.failed_uids and status != SUCCESS:
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = counts.failed_uids
        self._respond(req, context, status, counts, comment, identifier)


def _parts_of(pieces: Iterator[P_DATA]) -> tuple[bytes, bytes | None]:
    """A message's command set and data set, from the P-DATA requests that
    pynetdicom cut it into (the first byte of each PDV says which it holds,
    PS3.8 E.2)."""
    command = bytearray()
    data = bytearray()
    for piece in pieces:
        for _context_id, value in piece.presentation_data_value_list:
            (command if value[0] & _COMMAND_BIT else data).extend(value[1:])
    return bytes(command), bytes(data) or None


def _what_to_send(item: _Item, path: Path) -> Path | Dataset:
    """The stored file as it is, or, for a patient registration corrected,
    the instance with the catalog's patient attributes (the file stays)."""
    if item.patient is None:
        return path
    coerced = coerce(path, item.patient)
    return path if coerced is None else coerced


def _query(identifier: Dataset, sop_class: str) -> Query:
    """The instances a retrieve identifier names (PS3.4 C.4.2.2.1): by the
    unique key of its level; ValueError when it names none."""
    level = (text_of(identifier, "QueryRetrieveLevel") or "").strip()
    allowed = levels_of(sop_class)
    unique = _UNIQUE_KEYS.get(level) if level in allowed else None
    if unique is None:
        raise ValueError(
            f"QueryRetrieveLevel {level!r} is not one of {', '.join(allowed)}"
        )
    value = text_of(identifier, unique)
    if not value:
        raise ValueError(f"{unique} is required at {level} level")
    if "*" in value or "?" in value:
        # A retrieve names instances by unique keys; a wildcard could pull
        # a whole archive in one request.
        raise ValueError(f"{unique} may not hold wildcards in a retrieve")

    keys: dict[str, str | None] = {unique: value}
    if level == "PATIENT":
        keys["IssuerOfPatientID"] = text_of(identifier, "IssuerOfPatientID")
    return Query(level="IMAGE", keys=keys)


def _ended(assoc: pynetdicom.association.Association) -> bool:
    """Whether ``assoc`` can carry no more messages: released, aborted by
    either end, or its connection lost. An A-ABORT or a lost connection
    waits in the DUL's queue until the association's reactor sees it, and
    on the requester's association that reactor is the thread running this
    retrieve: sending on regardless would wait out the DIMSE timeout for
    every instance left."""
    return (
        not assoc.is_established or assoc.acse.is_aborted() or not assoc.dul.is_alive()
    )


def _why_not_established(
    assoc: pynetdicom.association.Association, connected: bool
) -> str:
    """Which step failed, for the C-MOVE's log line. pynetdicom does not
    log a connection that failed (its transport logger is silenced), and
    without a reason a destination that is down reads like one that
    answered, or like a program of another kind on its port."""
    answer: Any = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        return (
            f"rejected: {answer.reason_str} ({answer.result_str}, {answer.source_str})"
        )
    if not connected:
        return (
            "no connection (refused, none within timeouts.connect, "
            "or the TLS handshake failed)"
        )
    if answer is None:
        return "no answer to the association request within timeouts.association"
    return "the association was aborted"


def _count(counts: _Counts, status: int | None, item: _Item) -> None:
    """Count a sub-operation: Cxxx, Axxx, no answer are failures, Bxxx
    warnings (PS3.4 B.2.3)."""
    if status == SUCCESS:
        counts.completed += 1
    elif status is not None and (status & 0xF000) == 0xB000:
        counts.warning += 1
    else:
        counts.failed += 1
        counts.failed_uids.append(item.sop_instance_uid)


def _contexts_for(items: list[_Item]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax), at most 128."""
    pairs = sorted({(item.sop_class_uid, item.transfer_syntax) for item in items})
    if len(pairs) > _MAX_CONTEXTS:
        logger.warning(
            "%d SOP class and transfer syntax pairs to send; only the first %d "
            "fit one association",
            len(pairs),
            _MAX_CONTEXTS,
        )
    return [build_context(sop, [syntax]) for sop, syntax in pairs[:_MAX_CONTEXTS]]


def tune_requestor(assoc: pynetdicom.association.Association) -> None:
    """Make an association we requested safe and fast for sub-operations.

    Things pynetdicom does not do on its own: set TCP_NODELAY (without it
    the peer's delayed ACKs hold every small write for tens of
    milliseconds), acknowledge at once what a destination that leaves
    Nagle's algorithm on sends (see QuickAckSocket), and keep the
    association's reactor thread from taking a
    C-STORE response that ``send_c_store`` is waiting for. The reactor can
    pass its pause point just before ``send_c_store`` pauses it; when a
    fast peer answers in that window the reactor treats the response as an
    unexpected message and drops it, and the sub-operation times out. A
    response seen while a send is in progress is put back for the sender.
    """
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock is not None and not isinstance(sock, ssl.SSLSocket):
        # Same object layout; only recv and recv_into change. (A TLS socket
        # reads through OpenSSL, which these would bypass.)
        sock.__class__ = QuickAckSocket

    keep_responses_for_the_sender(assoc)


def keep_responses_for_the_sender(assoc: pynetdicom.association.Association) -> None:
    """Keep ``assoc``'s reactor thread from taking a response that a
    ``send_*`` call waits for (see :func:`tune_requestor`): a response it
    finds while a send is in progress is put back for the sender."""
    serve: Callable[[Any, int], None] = assoc._serve_request

    def serve_requests_only(msg: Any, context_id: int) -> None:
        sending = not assoc._reactor_checkpoint.is_set()
        if sending and not msg.is_valid_request:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_requests_only  # type: ignore[method-assign]
