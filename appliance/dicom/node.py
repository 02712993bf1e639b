"""The DICOM node of one worker process: its AE, contexts and event handlers.

Verification, Storage (every SOP class, private ones too, with every
transfer syntax the requester proposes), Query/Retrieve (Patient Root
and Study Root: FIND, MOVE, GET) and Storage Commitment Push Model
(``commitment.py``). Each association gets one log line when
it ends, with the caller and what it did; failures get their own line.
"""

from __future__ import annotations

import logging
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket

from appliance import audit, tls
from appliance.audit import dicom as audit_dicom
from appliance.catalog.store import Catalog, Outcome
from appliance.config import Config
from appliance.dicom import (
    command_faults,
    commitment,
    filemeta,
    fragments,
    reactor_waits,
    responses,
    retrieve,
    store_request,
    undecodable,
)
from appliance.dicom.access import AccessControl, Permissions
from appliance.dicom.admission import MAX_REQUEST
from appliance.hsm.recall import Recaller
from appliance.ingest import Ingest
from appliance.metrics import events
from appliance.storage.online import OnlineTier

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
# Patient Root and Study Root Query/Retrieve: FIND, MOVE, GET (PS3.4 C.6).
QUERY_RETRIEVE_CLASSES = (
    "1.2.840.10008.5.1.4.1.2.1.1",
    "1.2.840.10008.5.1.4.1.2.1.2",
    "1.2.840.10008.5.1.4.1.2.1.3",
    "1.2.840.10008.5.1.4.1.2.2.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.1.2.2.3",
)
# Negotiated so that a sender gets a clear C-STORE status; they lack the
# study and series the catalog files instances under, so they are refused.
NON_PATIENT_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
    "1.2.840.10008.5.1.4.39.1",  # Color Palette Storage
    "1.2.840.10008.5.1.4.43.1",  # Generic Implant Template Storage
    "1.2.840.10008.5.1.4.44.1",  # Implant Assembly Template Storage
    "1.2.840.10008.5.1.4.45.1",  # Implant Template Group Storage
    "1.2.840.10008.5.1.4.1.1.200.1",  # CT Defined Procedure Protocol Storage
    "1.2.840.10008.5.1.4.1.1.200.3",  # Protocol Approval Storage
    "1.2.840.10008.5.1.4.1.1.200.7",  # XA Defined Procedure Protocol Storage
    "1.2.840.10008.5.1.4.1.1.201.1",  # Inventory Storage
)
NOT_AUTHORISED = 0x0124
CANNOT_UNDERSTAND = 0xC000
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_NO_REASON = (0x01, 0x01, 0x01)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
_REJECT_LIMIT = (0x02, 0x03, 0x02)
# Out of reach: the association limit is the appliance's own (_refusal).
_PYNETDICOM_LIMIT = 1_000_000
# PDU types of the upper layer protocol: A-ASSOCIATE-RQ to A-ABORT (PS3.8 9.3).
_PDU_TYPES = range(0x01, 0x08)
_P_DATA = 0x04
_HEADER_SIZE = 6  # PDU type, reserved, length (PS3.8 9.3.1)
# The longest PDU other than P-DATA-TF read on an association: as long as
# the longest A-ASSOCIATE-RQ admitted (an A-ASSOCIATE-AC is never longer).
_OTHER_PDU_MAX = MAX_REQUEST
# What pynetdicom logs when it aborts an association for timeouts.network.
_IDLE_MESSAGE = "Network timeout reached"
# The only version of the upper layer protocol (PS3.8 9.3.2), and the start
# of pynetdicom's line when it rejects another.
_PROTOCOL_VERSION = 0x0001
_VERSION_MESSAGE = "A-ASSOCIATE-RQ: Unsupported protocol version"
_went_idle: weakref.WeakSet[Association] = weakref.WeakSet()


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings the appliance relies on."""
    # Receive data sets straight into a file, never whole in memory.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Accept private and future storage SOP classes.
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # pynetdicom would log identifiers, i.e. patient names and IDs.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # A failed connection to a peer is logged in one line by whoever asked
    # for it (C-MOVE, appliance.tls); pynetdicom's lines and traceback
    # would only repeat it.
    logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
    # What is wrong with a UID is said once with the peer: by ingest for a
    # stored instance, by the guard below for a message that cannot be
    # decoded. pynetdicom says it once more, twice for some, without the peer.
    logging.getLogger("pynetdicom.utils").setLevel(logging.CRITICAL)
    # An association left idle is closed with one line of the node's own,
    # which names the peer (Node._on_closed_connection).
    logging.getLogger("pynetdicom.association").addFilter(_not_the_idle_line)
    # A request of another protocol version is logged with the peer when
    # it is read (_log_unsupported_version); pynetdicom's line lacks the peer.
    logging.getLogger("pynetdicom.fsm").addFilter(_not_the_version_line)
    retrieve.install()
    commitment.install()
    store_request.install()
    command_faults.install()
    _guard_message_decoding()
    _guard_pdu_reading()
    _send_store_responses_directly()
    filemeta.install()
    reactor_waits.install()


def _not_the_idle_line(record: logging.LogRecord) -> bool:
    """Drop pynetdicom's line for an idle association, noting the
    association: the line is logged by its own thread, just before the
    abort that closes it."""
    if record.getMessage() != _IDLE_MESSAGE:
        return True
    thread = threading.current_thread()
    if isinstance(thread, Association):
        _went_idle.add(thread)
    return False


def _not_the_version_line(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_VERSION_MESSAGE)


def _guard_message_decoding() -> None:
    """Abort an association whose incoming DIMSE message cannot be decoded
    or written, instead of letting the exception end pynetdicom's network
    thread (which leaves the association hanging).

    Seen with a full online tier. (An overlong Affected SOP Instance UID,
    and an Affected SOP Class UID that is missing, empty or overlong, are
    decoded without it and answered with a status: ``store_request.py``,
    ``command_faults.py``.)
    Fragments out of their order are aborted the same way, before
    pynetdicom reads them (``fragments.py``).
    """
    original = DIMSEServiceProvider.receive_primitive
    to_primitive = DIMSEMessage.message_to_primitive

    def message_to_primitive(message: DIMSEMessage) -> Any:
        try:
            return to_primitive(message)
        except Exception as exc:
            raise _Undecodable(undecodable.reason(exc)) from exc

    def receive_primitive(provider: DIMSEServiceProvider, primitive: Any) -> None:
        pdvs = getattr(primitive, "presentation_data_value_list", [])
        if wrong := fragments.out_of_order(provider.message, pdvs):
            discard_partial_message(provider)
            logger.warning(
                "aborting association with %s: %s", _peer_of(provider.assoc), wrong
            )
            # A-P-ABORT, reason 'unexpected PDU parameter' (PS3.8 9.3.8).
            provider.assoc.acse.send_ap_abort(0x05)
            return
        try:
            original(provider, primitive)
        except OSError as exc:
            # Writing the incoming data set failed, most likely because the
            # online tier is full despite storage.reserved_bytes: nothing
            # was stored, and the sender gets an abort, not a success.
            discard_partial_message(provider)
            logger.error("aborting association: cannot receive a data set: %s", exc)
        except (Exception, _Undecodable) as exc:
            discard_partial_message(provider)
            logger.warning(
                "aborting association with %s: undecodable DIMSE message (%s)",
                _peer_of(provider.assoc),
                exc if isinstance(exc, _Undecodable) else undecodable.reason(exc),
            )
        else:
            return
        # A-P-ABORT, reason 'unrecognized PDU parameter' (PS3.8 9.3.8).
        provider.assoc.acse.send_ap_abort(0x02)

    # The wrapper takes any primitive; pynetdicom's signature names P_DATA.
    setattr(DIMSEServiceProvider, "receive_primitive", receive_primitive)  # noqa: B010
    setattr(DIMSEMessage, "message_to_primitive", message_to_primitive)  # noqa: B010


class _Undecodable(BaseException):
    """A received message that pynetdicom cannot make its primitive of.

    Not an Exception, so that it passes pynetdicom's own handler, which
    would log an error and a traceback, to the guard that logs one line.
    """


def _guard_pdu_reading() -> None:
    """Read every PDU here, its header checked before its body is read.

    pynetdicom reads a PDU of any announced length into memory, so a peer
    announcing gigabytes could exhaust it; and it reads bytes that are no
    PDU six at a time, with an error line and an A-ABORT for every six
    (PS3.8 action AA-7). Here the header is read whole, however it arrives
    and over TLS too; an unrecognised PDU type, or a PDU longer than this
    end accepts, is logged once with the peer and the association aborted
    as the state table says (AA-8), its body unread. What the peer sends
    after that, while the connection waits to be closed (state Sta13), is
    discarded unread. Before an association exists, admission has already
    turned such bytes away.
    """
    original = DULServiceProvider._read_pdu_data

    def read_pdu_data(dul: DULServiceProvider) -> None:
        wrapper = dul.socket
        connection = wrapper.socket if wrapper else None
        if wrapper is None or connection is None:
            original(dul)
        elif dul.state_machine.current_state == "Sta13":
            _discard_readable(dul, connection)
        else:
            _read_pdu(dul, wrapper)

    setattr(DULServiceProvider, "_read_pdu_data", read_pdu_data)  # noqa: B010


def _send_store_responses_directly() -> None:
    """Encode the plain C-STORE-RSP (Success, nothing optional) here.

    Every received instance is answered by one; pynetdicom would build it
    as a pydicom Dataset and pass it through pydicom's writer, which costs
    a tenth of receiving a whole CT image. Anything else, and any message
    someone listens to (EVT_DIMSE_SENT), goes through pynetdicom.
    """
    original = DIMSEServiceProvider.send_msg

    def send_msg(
        provider: DIMSEServiceProvider, primitive: Any, context_id: int
    ) -> None:
        if not _plain_store_response(primitive) or provider.assoc.get_handlers(
            evt.EVT_DIMSE_SENT
        ):
            original(provider, primitive, context_id)
            return
        command = responses.store_command_set(
            primitive.AffectedSOPClassUID,
            primitive.MessageIDBeingRespondedTo,
            primitive.Status,
            primitive.AffectedSOPInstanceUID,
        )
        maximum = provider.maximum_pdu_size
        for pdata in responses.p_data(context_id, command, None, maximum):
            provider.dul.send_pdu(pdata)

    setattr(DIMSEServiceProvider, "send_msg", send_msg)  # noqa: B010


def _plain_store_response(primitive: Any) -> bool:
    return (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status == 0x0000
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
        and bool(primitive.AffectedSOPClassUID)
        and bool(primitive.AffectedSOPInstanceUID)
        # A sender's UID that is not even ASCII is answered as pydicom
        # encodes it.
        and str(primitive.AffectedSOPClassUID).isascii()
        and str(primitive.AffectedSOPInstanceUID).isascii()
    )


def _read_pdu(dul: DULServiceProvider, wrapper: AssociationSocket) -> None:
    """Read one PDU and put its event for the state machine (PS3.8 9.2)."""
    try:
        header = _read_header(dul, wrapper)
        if header is None:
            return
        length = int.from_bytes(header[2:_HEADER_SIZE], "big")
        body = wrapper.recv(length) if length else bytearray()
    except OSError as exc:
        logger.debug("connection with %s lost: %s", _peer_of(dul.assoc), exc)
        dul.event_queue.put("Evt17")  # transport connection closed
        return
    if len(body) < length:
        dul.event_queue.put("Evt17")  # closed within the PDU
        return
    try:
        pdu, event = dul._decode_pdu(header + body)
    except Exception as exc:
        logger.warning(
            "aborting association with %s: undecodable PDU type 0x%02X (%s)",
            _peer_of(dul.assoc),
            header[0],
            undecodable.reason(exc),
        )
        dul.event_queue.put("Evt19")  # invalid PDU
        return

    if isinstance(pdu, A_ASSOCIATE_RQ):
        _log_unsupported_version(dul, pdu)
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _log_unsupported_version(dul: DULServiceProvider, request: A_ASSOCIATE_RQ) -> None:
    """Log the request of a protocol version other than 1, with the peer:
    pynetdicom rejects it (PS3.8 9.3.4, reason 2) in a line without it."""
    version = request.protocol_version
    if version == _PROTOCOL_VERSION:
        return

    # The calling AE title is pynetdicom's decoding of it: checked to be
    # ASCII without control characters.
    title = request.calling_ae_title.strip() or "?"
    logger.warning(
        "association from %s@%s rejected: protocol version 0x%04X, only 0x%04X "
        "is supported",
        title,
        dul.assoc.requestor.address,
        version,
        _PROTOCOL_VERSION,
    )


def _read_header(
    dul: DULServiceProvider, wrapper: AssociationSocket
) -> bytearray | None:
    """The next PDU's six-byte header, read in as many pieces as it comes;
    None, with the event put, when it is no PDU's, is longer than this end
    accepts, or the connection closes first. The type byte is checked
    before the rest is waited for."""
    header = wrapper.recv(1)
    if header and header[0] not in _PDU_TYPES:
        logger.warning(
            "aborting association with %s: not DICOM (PDU type 0x%02X)",
            _peer_of(dul.assoc),
            header[0],
        )
        dul.event_queue.put("Evt19")  # unrecognised PDU
        return None
    if header:
        header += wrapper.recv(_HEADER_SIZE - 1)
    if len(header) < _HEADER_SIZE:
        dul.event_queue.put("Evt17")  # closed within the header
        return None
    if too_long := _overlong(dul, header):
        logger.warning(
            "aborting association with %s: %s", _peer_of(dul.assoc), too_long
        )
        dul.event_queue.put("Evt19")  # invalid PDU
        return None
    return header


def _overlong(dul: DULServiceProvider, header: bytearray) -> str:
    """Why the PDU ``header`` announces is longer than this end accepts, or "".

    A P-DATA-TF may be as long as the maximum this end announced (none
    when 0); the other PDUs on an open association are a few bytes long.
    """
    pdu_type, _reserved, length = struct.unpack(">BBL", header)
    assoc = dul.assoc
    local = assoc.requestor if assoc.is_requestor else assoc.acceptor
    limit = (local.maximum_length or 0) if pdu_type == _P_DATA else _OTHER_PDU_MAX
    if limit and length > limit:
        return (
            f"PDU type 0x{pdu_type:02X} of {length} bytes, more than the "
            f"{limit} this end accepts"
        )
    return ""


def _discard_readable(dul: DULServiceProvider, connection: Any) -> None:
    """Read and drop what has arrived; the end of it closes the connection."""
    try:
        data = connection.recv(65536)
    except OSError:
        data = b""
    if not data:
        dul.event_queue.put("Evt17")  # transport connection closed


def _peer_of(assoc: Association) -> str:
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return f"{(peer.ae_title or '').strip() or '?'}@{peer.address}"


def discard_partial_message(provider: DIMSEServiceProvider) -> None:
    """Drop a DIMSE message that will never complete, and the temporary file
    pynetdicom was receiving its data set into (it only removes that file
    after a complete C-STORE)."""
    message = provider.message
    provider.message = None
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    partial.close()
    Path(partial.name).unlink(missing_ok=True)


@dataclass
class _Activity:
    """What one association did, for its closing log line."""

    caller: str
    permissions: Permissions | None = None
    stored: int = 0
    # Answered Success, but the archive held the same bytes already.
    already_there: int = 0
    refused: int = 0
    queries: int = 0
    logged: bool = False
    stores: audit_dicom.StoreTally = field(default_factory=audit_dicom.StoreTally)
    accepted: bool = False


class ApplianceAE(AE):
    """An AE that knows the node it serves, for the retrieve service class."""

    node: Node


class Node:
    """Everything a worker process needs to serve associations."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        online: OnlineTier,
        ingest: Ingest,
        total_associations: Callable[[], int] = lambda: 0,
        recaller: Recaller | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.online = online
        self.ingest = ingest
        # Stages studies that are not online before a retrieve sends them.
        self.recaller = recaller
        self.ae_title: str = config.get("node.ae_title").strip()
        self.access = AccessControl(config)
        self.audit = audit.Trail.of(config)
        self._total_associations = total_associations
        self._activity: dict[int, _Activity] = {}
        self._aborted: weakref.WeakSet[Association] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.commitment = commitment.CommitmentSCP(self)

    # -- the AE -------------------------------------------------------------

    def application_entity(self) -> ApplianceAE:
        """An AE with every context and timeout the appliance serves with."""
        ae = ApplianceAE(ae_title=self.ae_title)
        ae.node = self
        # node.max_associations is enforced by _refusal, over every worker,
        # with a log line and an alert. pynetdicom's own count (this worker's
        # live threads) would also count callers already rejected whose alert
        # still waits for the audit log, and refuse the next one silently.
        ae.maximum_associations = _PYNETDICOM_LIMIT
        ae.maximum_pdu_size = self.config.get("node.max_pdu_size")
        ae.acse_timeout = self.config.get("timeouts.association")
        ae.dimse_timeout = self.config.get("timeouts.dimse")
        ae.network_timeout = self.config.get("timeouts.network")
        ae.connection_timeout = self.config.get("timeouts.connect")

        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        for uid in QUERY_RETRIEVE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        # Storage contexts serve C-STORE, and C-GET sub-operations, where the
        # appliance takes the SCU role that the requester offers.
        storage = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
        for uid in [*storage, *NON_PATIENT_STORAGE_CLASSES]:
            ae.add_supported_context(
                uid,
                ALL_TRANSFER_SYNTAXES,
                scu_role=True,
                scp_role=True,
            )
        # Storage Commitment Push Model: the requester is the SCU, whose
        # association also carries the report back (PS3.4 J.3).
        ae.add_supported_context(
            STORAGE_COMMITMENT,
            DEFAULT_TRANSFER_SYNTAXES,
            scu_role=True,
            scp_role=False,
        )
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, lambda event: events.association("rejected")),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed_connection),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self.commitment.on_action),
        ]

    # -- associations -----------------------------------------------------------

    def tls_failed(self, host: str, reason: str) -> None:
        """A TLS handshake on the DICOM port failed: a security alert."""
        audit.security_alert(
            self.audit, f"TLS handshake failed: {reason}", audit.Peer("", host)
        )

    def describe(self, assoc: Association) -> str:
        requestor = assoc.requestor
        title = requestor.ae_title
        if not title and requestor.primitive is not None:
            title = requestor.primitive.calling_ae_title
        return f"{(title or '').strip() or '?'}@{requestor.address}"

    def may_query(self, assoc: Association) -> bool:
        activity = self._activity.get(id(assoc))
        return bool(activity and activity.permissions and activity.permissions.query)

    def may_store(self, assoc: Association) -> bool:
        activity = self._activity.get(id(assoc))
        return bool(activity and activity.permissions and activity.permissions.store)

    def count_query(self, assoc: Association) -> None:
        """Count a C-FIND for the association's closing log line."""
        activity = self._activity.get(id(assoc))
        if activity is not None:
            activity.queries += 1

    def _on_requested(self, event: evt.Event) -> None:
        """Access control and the association limit, before negotiation."""
        assoc = event.assoc
        caller = self.describe(assoc)
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED follows the A-ASSOCIATE-RQ
        calling_ae = str(request.calling_ae_title)
        permissions = self.access.permissions(calling_ae, assoc.requestor.address)
        with self._lock:
            self._activity[id(assoc)] = _Activity(caller, permissions)

        wrapper = assoc.dul.socket
        connection = wrapper.socket if wrapper is not None else None
        refusal = self._refusal(request, permissions, connection)
        if refusal is not None:
            message, reason = refusal
            logger.warning("association from %s rejected: %s", caller, message)
            # The caller is answered before the alert is written: the audit
            # log's flush waits for the disk, which under a heavy write load
            # can take longer than a caller waits for its answer.
            self._reject(assoc, reason)
            peer = audit_dicom.peer_of(assoc)
            audit.security_alert(self.audit, f"association rejected: {message}", peer)
            return
        if not permissions.query:
            assoc.acceptor.supported_contexts = [
                cx
                for cx in assoc.acceptor.supported_contexts
                if cx.abstract_syntax not in QUERY_RETRIEVE_CLASSES
            ]

    def _refusal(
        self, request: Any, permissions: Permissions, connection: Any
    ) -> tuple[str, tuple[int, int, int]] | None:
        """Why an association request is rejected, and the A-ASSOCIATE-RJ
        result, source and reason to send (PS3.8 9.3.4), or None."""
        if not permissions.anything:
            return "caller not allowed", _REJECT_CALLING_AE
        calling = str(request.calling_ae_title)
        unbound = tls.binding_problem(self.config.peer(calling), connection)
        if unbound is not None:
            # An AE title bound to a certificate is only as good as the
            # certificate: without it, the title is not recognised.
            return unbound, _REJECT_CALLING_AE
        called = str(request.called_ae_title).strip()
        if self.config.get("node.check_called_ae_title") and called != self.ae_title:
            message = f"it calls AE title {called!r}, this is {self.ae_title!r}"
            return message, _REJECT_CALLED_AE
        proposed = request.presentation_context_definition_list
        if any(not cx.transfer_syntax for cx in proposed):
            # PS3.8 9.3.2.2: every proposed context names a transfer syntax.
            message = "a presentation context proposes no transfer syntax"
            return message, _REJECT_NO_REASON
        if short := fragments.too_short(request.maximum_length_received):
            return short, _REJECT_NO_REASON
        limit = self.config.get("node.max_associations")
        if self._total_associations() > limit:
            return f"{limit} associations already open", _REJECT_LIMIT
        return None

    def _reject(self, assoc: Association, reason: tuple[int, int, int]) -> None:
        """Send A-ASSOCIATE-RJ; the rejection was logged, so no closing line."""
        with self._lock:
            self._activity.pop(id(assoc), None)
        events.association("rejected")
        assoc.acse.send_reject(*reason)
        # As pynetdicom does for its own rejections: wait until the
        # A-ASSOCIATE-RJ is out before the connection is closed.
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        """Say which presentation contexts were refused: the usual reason a
        modality cannot send a kind of object."""
        activity = self._activity.get(id(event.assoc))
        if activity is not None:
            activity.accepted = True
            events.association("accepted")
        rejected = event.assoc.rejected_contexts
        if not rejected:
            return
        names = sorted({_name_of(cx.abstract_syntax or "") for cx in rejected})
        logger.warning(
            "association from %s: %d presentation context(s) rejected: %s",
            self.describe(event.assoc),
            len(rejected),
            ", ".join(names),
        )

    def _on_closed_connection(self, event: evt.Event) -> None:
        # A peer that vanished in the middle of a C-STORE leaves its half.
        discard_partial_message(event.assoc.dimse)
        with self._lock:
            activity = self._activity.pop(id(event.assoc), None)
        if activity is None:
            return
        events.association_closed(activity.accepted)
        idle = event.assoc in _went_idle
        logger.info(
            "association from %s closed%s: %d stored, %d already there, "
            "%d refused, %d queries",
            activity.caller,
            " after it was idle (timeouts.network)" if idle else "",
            activity.stored,
            activity.already_there,
            activity.refused,
            activity.queries,
        )
        peer = audit_dicom.peer_of(event.assoc)
        activity.stores.report(self.audit, self.catalog, peer)

    def _on_aborted(self, event: evt.Event) -> None:
        # pynetdicom may signal one abort twice (sent, then seen by its
        # reactor), and after the connection closed: counted once here.
        with self._lock:
            if event.assoc in self._aborted:
                return
            self._aborted.add(event.assoc)
        events.association("aborted")

    # -- services -----------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset:
        activity = self._activity.get(id(event.assoc))
        caller = activity.caller if activity else self.describe(event.assoc)
        if event.dataset_path is None:
            # Its command said no data set follows (PS3.7 9.3.1.1 needs one).
            logger.warning("C-STORE from %s refused: no data set", caller)
            if activity is not None:
                activity.refused += 1
            return _status(CANNOT_UNDERSTAND, "no data set")
        path = Path(event.dataset_path)
        if (
            activity is None
            or not activity.permissions
            or not activity.permissions.store
        ):
            path.unlink(missing_ok=True)
            logger.warning(
                "C-STORE from %s refused: caller not allowed to store", caller
            )
            return _status(NOT_AUTHORISED, "not authorised to store")
        request, context = cast(C_STORE, event.request), event.context
        wrong, comment = command_faults.store_refusal(
            request, context.context_id, context.abstract_syntax
        )
        if wrong:
            path.unlink(missing_ok=True)
            uid = str(request.AffectedSOPInstanceUID or "(unknown)")
            return self._refuse_on_context(activity, uid, wrong, comment)

        calling_ae = str(event.assoc.requestor.ae_title).strip()
        result = self.ingest.store_received(
            path, caller, calling_ae, refuse_long_uids=True
        )
        if result.outcome is Outcome.IDENTICAL:
            activity.already_there += 1
        elif result.ok:
            activity.stored += 1
        else:
            activity.refused += 1
        activity.stores.add(result.sop_instance_uid, result.ok, result.reason)
        return _status(result.status, result.reason)

    def _refuse_on_context(
        self, activity: _Activity, uid: str, wrong: str, comment: str
    ) -> Dataset:
        """Answer a C-STORE whose SOP class is not its presentation
        context's (or cannot be read), with one log line; nothing was
        stored."""
        logger.warning(
            "C-STORE of instance %s from %s refused: %s", uid, activity.caller, wrong
        )
        activity.refused += 1
        activity.stores.add(uid, False, comment)
        status = store_request.SOP_CLASS_NOT_SUPPORTED
        events.instance_received(events.store_outcome(status, False))
        return _status(status, comment)


def _name_of(uid: str) -> str:
    name = UID(uid).name if uid else "(empty)"
    return name if name != uid else uid


def _status(status: int, comment: str = "") -> Dataset:
    dataset = Dataset()
    dataset.Status = status
    if comment and status != 0x0000:
        dataset.ErrorComment = comment[:64]
    return dataset
