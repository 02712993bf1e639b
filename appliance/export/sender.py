"""Associations with an export's receiver and the C-STOREs on them.

Each instance goes as the bytes of its stored file after the file meta, in
the transfer syntax it was stored in (pynetdicom's chunked sending, as a
C-MOVE does): nothing is decoded or re-encoded. The association proposes
one presentation context per (SOP class, transfer syntax) pair the
instances need, each with that one transfer syntax, at most 128 per
association (context IDs are the odd numbers 1 to 255, PS3.8 9.3.2.2).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from appliance.dicom.retrieve import tune_requestor
from appliance.errors import ExportError
from appliance.export.destination import Destination

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
# The C-STORE status reported for an instance whose SOP class, or stored
# transfer syntax, the receiver rejected while the association was
# negotiated: "Refused: SOP Class not supported" (PS3.7 Annex C).
SOP_CLASS_NOT_SUPPORTED = 0x0122

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

Pair = tuple[str, str]


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed per phase (the configuration's ``timeouts``)."""

    association: float
    dimse: float
    network: float
    connect: float


class Link:
    """One association with the receiver, for a set of (SOP class,
    transfer syntax) pairs, and the C-STOREs sent on it."""

    def __init__(self, assoc: Association | None, destination: Destination) -> None:
        self.assoc = assoc
        self.destination = destination
        self.accepted: set[Pair] = set()
        if assoc is not None:
            self.accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
        self._message_id = 0

    def accepts(self, pair: Pair) -> bool:
        return pair in self.accepted

    def send(self, path: Path, uid: str) -> tuple[int | None, str]:
        """C-STORE the stored file at ``path``: the receiver's status and
        error comment, or None and why the instance could not be sent.
        ExportError when the association is lost (aborted by the receiver,
        or no answer within the DIMSE timeout)."""
        assert self.assoc is not None
        self._message_id = self._message_id % 65535 + 1
        try:
            response = self.assoc.send_c_store(path, msg_id=self._message_id)
        except (RuntimeError, ValueError, AttributeError, OSError) as exc:
            if not self.assoc.is_established:
                raise self._lost(uid) from exc
            # The stored file itself (its file meta) cannot be sent.
            logger.warning("cannot send instance %s: %s", uid, exc)
            return None, f"cannot be sent: {exc}"
        if "Status" not in response:
            raise self._lost(uid)
        return int(response.Status), str(response.get("ErrorComment", "") or "")

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def _lost(self, uid: str) -> ExportError:
        if self.assoc is not None and self.assoc.is_established:
            # No answer in time: pynetdicom gives up on the association.
            self.assoc.abort()
        return ExportError(
            f"the association with {self.destination} ended while instance "
            f"{uid} was sent (aborted by the receiver, or no answer in time)"
        )


class Sender:
    """Opens associations from ``calling_ae`` to ``destination``; over TLS
    with ``tls_args`` (pynetdicom's: a client context and the host name)."""

    def __init__(
        self,
        destination: Destination,
        calling_ae: str,
        timeouts: Timeouts,
        tls_args: tuple[ssl.SSLContext, str] | None = None,
    ) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeouts = timeouts
        self.tls_args = tls_args
        # Stored files go as their bytes, never decoded and re-encoded.
        _config.STORE_SEND_CHUNKED_DATASET = True

    def check(self) -> None:
        """Connect, then associate once with only Verification proposed,
        and release: the receiver is up and accepts these AE titles
        (whether it supports Verification does not matter). ExportError
        saying which of the two failed otherwise."""
        target = self.destination
        try:
            probe = socket.create_connection(
                (target.host, target.port), timeout=self.timeouts.connect
            )
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ExportError(
                f"cannot connect to {target.ae_title} at {target.host}:"
                f"{target.port}: {reason}"
            ) from exc
        probe.close()
        assoc = self._associate([(VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)])
        if assoc.is_established:
            assoc.release()

    def link(self, pairs: Iterable[Pair]) -> Link:
        """An association for at most 128 pairs; those the receiver rejects
        are not in :attr:`Link.accepted`. ExportError when the receiver
        cannot be reached or rejects the association itself."""
        wanted = sorted(set(pairs))
        if len(wanted) > MAX_CONTEXTS:
            raise ValueError(f"{len(wanted)} pairs; at most {MAX_CONTEXTS}")
        assoc = self._associate(wanted)
        if not assoc.is_established:
            # Every context rejected: the association was aborted at once.
            return Link(None, self.destination)
        tune_requestor(assoc)
        return Link(assoc, self.destination)

    def _associate(self, pairs: list[Pair]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeouts.association
        ae.dimse_timeout = self.timeouts.dimse
        ae.network_timeout = self.timeouts.network
        ae.connection_timeout = self.timeouts.connect
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in pairs]
        target = self.destination
        assoc = ae.associate(
            target.host, target.port, ae_title=target.ae_title, tls_args=self.tls_args
        )
        if assoc.is_established or _all_contexts_rejected(assoc):
            return assoc
        raise ExportError(self._refusal(assoc))

    def _refusal(self, assoc: Association) -> str:
        target = self.destination
        where = f"{target.ae_title} at {target.host}:{target.port}"
        answer: Any = assoc.acceptor.primitive
        if assoc.is_rejected and answer is not None:
            return (
                f"{where} rejected the association from {self.calling_ae}: "
                f"{answer.reason_str} ({answer.result_str}, {answer.source_str})"
            )
        if answer is None:
            return (
                f"cannot associate with {where}: no connection, or no answer "
                "to the association request in time"
            )
        return f"{where} aborted the association from {self.calling_ae}"


def _all_contexts_rejected(assoc: Association) -> bool:
    """The receiver accepted the association but none of its contexts
    (pynetdicom then aborts it): the SOP classes are refused, not the node."""
    answer: Any = assoc.acceptor.primitive
    return bool(
        answer is not None
        and getattr(answer, "result", None) == 0x00
        and assoc.rejected_contexts
    )


def chunks(pairs: Iterable[Pair]) -> list[list[Pair]]:
    """The pairs, sorted, in groups that fit one association each."""
    ordered = sorted(set(pairs))
    return [
        ordered[start : start + MAX_CONTEXTS]
        for start in range(0, len(ordered), MAX_CONTEXTS)
    ]
