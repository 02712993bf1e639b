"""Delivering a storage commitment report on a new association.

The appliance calls the requester at the address its ``[[peers]]`` entry
gives, with its own AE title, and proposes the SCP role for Storage
Commitment through SCP/SCU Role Selection (PS3.7 D.3.3.4; PS3.4 J.3.3),
since the association requester is otherwise the SCU.
"""

from __future__ import annotations

import logging

from pynetdicom import AE, build_role
from pynetdicom.association import Association

from appliance import tls
from appliance.catalog.commitments import Transaction
from appliance.commitment import messages
from appliance.commitment.messages import STORAGE_COMMITMENT
from appliance.config import Config, Peer
from appliance.errors import ConfigError

logger = logging.getLogger(__name__)

# The encodings every DICOM peer reads.
_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class Undelivered(Exception):
    """Why a report did not reach the requester."""


def deliver(config: Config, peer: Peer, report: Transaction) -> None:
    """Send ``report`` to ``peer`` and wait for its answer; Undelivered
    unless the peer answered Success."""
    ae = AE(ae_title=config.get("node.ae_title").strip())
    ae.acse_timeout = config.get("timeouts.association")
    ae.dimse_timeout = config.get("timeouts.dimse")
    ae.network_timeout = config.get("timeouts.network")
    ae.connection_timeout = config.get("timeouts.connect")
    ae.add_requested_context(STORAGE_COMMITMENT, _TRANSFER_SYNTAXES)
    role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    try:
        # Over TLS when the requester is configured so (appliance.tls).
        tls_args = tls.client_args(config, peer)
    except ConfigError as exc:
        ae.shutdown()
        raise Undelivered(f"cannot use TLS to {peer.ae_title}: {exc}") from exc
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=[role],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        raise Undelivered(_refusal(assoc))
    try:
        _send(config, assoc, report)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _send(config: Config, assoc: Association, report: Transaction) -> None:
    if not any(
        cx.abstract_syntax == STORAGE_COMMITMENT for cx in assoc.accepted_contexts
    ):
        raise Undelivered("the peer refused the Storage Commitment context")
    information = messages.event_information(
        report, config.get("node.ae_title").strip()
    )
    status, _reply = assoc.send_n_event_report(
        information,
        messages.event_type(report),
        messages.STORAGE_COMMITMENT,
        messages.STORAGE_COMMITMENT_INSTANCE,
    )
    code = status.get("Status")
    if code is None:
        raise Undelivered("no answer to the report")
    if int(code) != 0x0000:
        raise Undelivered(f"the peer answered 0x{int(code):04X}")


def _refusal(assoc: Association) -> str:
    if assoc.is_rejected:
        return "the peer rejected the association"
    # pynetdicom reports a refused or timed-out connection as an abort.
    return "no association: connection refused, timed out or aborted"
