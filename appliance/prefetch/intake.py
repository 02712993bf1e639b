"""From an HL7 message to a recorded appointment and the ACK to send (ADT
messages, patient updates and merges, go to :mod:`appliance.patients.intake`).

The ACK says AA only after the appointment is committed to the catalog. A
message the appliance cannot use gets AR (not a message it takes) or AE
(taken as HL7, but wrong or incomplete), one warning line in the log, and
changes nothing. A failure of the catalog gets AE "application internal
error", which tells the RIS to send the message again later.
"""

from __future__ import annotations

import hashlib
import logging

import hl7

from appliance import audit
from appliance.audit import owed
from appliance.audit.offenders import RepeatedRefusals
from appliance.audit.trail import Trail
from appliance.catalog.store import Catalog
from appliance.errors import CatalogError
from appliance.hl7 import acks, adt, messages
from appliance.hl7.messages import APPLICATION_INTERNAL_ERROR, MessageError
from appliance.log_text import printable
from appliance.patients import intake as patient_intake
from appliance.prefetch import appointments

logger = logging.getLogger(__name__)


class Intake:
    """Handles one message at a time; safe to call from several threads."""

    def __init__(self, catalog: Catalog, trail: Trail | None = None) -> None:
        self.catalog = catalog
        self.trail = trail
        if trail is not None:
            # Records a killed process owed for patient changes it committed.
            owed.settle_left_over(catalog, trail)
        # A sender whose messages keep being refused becomes a security alert.
        self.refusals = RepeatedRefusals(trail, "HL7")

    def tls_failed(self, peer: str, reason: str) -> None:
        """A TLS handshake on the HL7 port failed: a security alert."""
        host = peer.rsplit(":", 1)[0]
        audit.security_alert(
            self.trail, f"HL7 TLS handshake failed: {reason}", audit.Peer("", host)
        )

    def __call__(self, raw: bytes, peer: str) -> bytes:
        parsed: hl7.Message | None = None
        try:
            parsed = messages.parse(raw)
            if adt.is_adt(parsed):
                return patient_intake.handle(
                    self.catalog, parsed, raw, peer, self.trail
                )
            schedule = messages.read(parsed)
            digest = hashlib.sha256(raw).hexdigest()
            ack = acks.accept(parsed)
            answer = appointments.apply(self.catalog, schedule, ack, digest)
            self.refusals.accepted(peer)
            return answer
        except MessageError as error:
            parsed = parsed or error.header
            self.refusals.refused(peer, error.reason)
            logger.warning(
                "HL7 from %s refused with %s: %s%s",
                peer,
                error.ack_code,
                error.reason,
                _which(parsed),
            )
            return acks.refuse(parsed, error)
        except CatalogError as exc:
            logger.error("HL7 from %s not recorded%s: %s", peer, _which(parsed), exc)
            return acks.refuse(parsed, _internal("the change could not be saved"))
        except Exception as exc:  # a message no rule above foresaw
            logger.error(
                "HL7 from %s could not be read%s: %r", peer, _which(parsed), exc
            )
            return acks.refuse(parsed, _internal("the message could not be read"))


def _internal(reason: str) -> MessageError:
    return MessageError("AE", APPLICATION_INTERNAL_ERROR, "", reason)


def _which(parsed: hl7.Message | None) -> str:
    """ " (SIU^S12 control ID X)" for the log, when the header was read."""
    if parsed is None:
        return ""
    try:
        kind = f"{parsed['MSH.F9.R1.C1']}^{parsed['MSH.F9.R1.C2']}"
        control = str(parsed["MSH.F10"]) or "none"
        # As the sender wrote them, but never a line break into the log.
        kind, control = printable(kind), printable(control)
    except Exception:  # a header too damaged to name
        return ""
    return f" ({kind}, control ID {control})"
