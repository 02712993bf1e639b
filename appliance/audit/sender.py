"""The syslog sender: forwards the audit log to the collector, in order,
from a thread of the service process, never from a request path.

The log is the queue. ``sent.json`` next to it says how far the sender got
(the number of the log file and the byte offset in it after the last record
sent, and how many were sent); it is written durably after every batch, so
a stop and a start send nothing twice and skip nothing. A crash between
sending a batch and saving the offset sends that batch again after the
restart: delivery is exactly once across clean restarts and at least once
across a crash. A rotation of the log renames the file the sender is in
without changing its number, so the sender finishes it and goes on in the
next; a rotated file it has not sent whole is never removed.

While the collector cannot be reached, records wait in the log and the
sender retries with a backoff from 1 s up to ``MAX_RETRY`` seconds. Over
TLS a connection the collector has closed is noticed before the next
message goes out. Over UDP nothing can be noticed: datagrams sent while the
collector is down are lost to it (RFC 5426), though kept in the local log.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit.log import AuditLog, Record
from appliance.audit.rotation import SENT_NAME
from appliance.audit.syslog import (
    DEFAULT_PORTS,
    FACILITIES,
    Destination,
    MessageTooLong,
    TlsSender,
    UdpSender,
    format_message,
    sender_for,
)
from appliance.audit.trail import audit_folder
from appliance.storage.durable import move_into_place

if TYPE_CHECKING:
    from appliance.config import Config

logger = logging.getLogger(__name__)

STATE_NAME = SENT_NAME
FIRST_RETRY = 1.0
MAX_RETRY = 10.0
_BATCH = 100
_POLL = 0.5


class Position:
    """How far the sender got: a log file number, a byte offset in it and
    a count."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_NAME
        self.segment = 1
        self.offset = 0
        self.sent = 0
        try:
            saved = json.loads(self.path.read_text())
            self.offset, self.sent = int(saved["offset"]), int(saved["sent"])
            # Saved before the log was rotated: the first file.
            self.segment = int(saved.get("segment", 1))
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            # Starting over would send the whole log again; say so loudly.
            logger.error(
                "audit: %s unreadable (%s); sending from the start", self.path, exc
            )

    def save(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        saved = {"segment": self.segment, "offset": self.offset, "sent": self.sent}
        temporary.write_text(json.dumps(saved))
        move_into_place(temporary, self.path, self.path.parent)


class Sender:
    """Sends what the audit log holds past the saved position, in a thread."""

    def __init__(
        self,
        log: AuditLog,
        destination: Destination,
        facility: int,
        hostname: str | None = None,
    ) -> None:
        self.log = log
        self.destination = destination
        self.facility = facility
        self.hostname = hostname or socket.gethostname()
        self.position = Position(log.folder)
        self._transport: UdpSender | TlsSender = sender_for(destination)
        self._wake = threading.Event()
        self._draining = False
        self._down_since_logged = False
        self._thread = threading.Thread(
            target=self._run, name="audit-sender", daemon=True
        )

    def start(self) -> None:
        self.log.folder.mkdir(parents=True, exist_ok=True)
        if not self.position.path.exists():
            # From now on a rotated file not sent yet is kept (keep_files).
            self.position.save()
        self._thread.start()

    def stop(self, drain: float = 5.0) -> None:
        """Send what is left (for up to ``drain`` seconds), then stop."""
        self._draining = True
        self._wake.set()
        self._thread.join(drain)
        if self._thread.is_alive():
            logger.warning("audit: sender still busy after %.0f s; stopping", drain)
        self._transport.close()

    def _run(self) -> None:
        self._check_position()
        retry = FIRST_RETRY
        while True:
            position = self.position
            records = self.log.read_from(position.offset, _BATCH, position.segment)
            if not records:
                if self._draining:
                    return
                self._wake.wait(_POLL)
                continue
            try:
                self._send(records)
            except (OSError, ssl.SSLError) as exc:
                self._transport.close()
                self._note_down(exc)
                if self._draining:
                    return
                self._wake.wait(retry)
                retry = min(retry * 2, MAX_RETRY)
                continue
            retry = FIRST_RETRY
            self._note_up()

    def _check_position(self) -> None:
        """A log shorter than the saved offset, or numbered below the saved
        file, was replaced by hand: send it from the start rather than
        nothing at all."""
        live = self.log.live_number()
        if self.position.segment > live:
            logger.error(
                "audit: %s is file %d, below the file sent from (%d); "
                "sending the log from the start",
                self.log.path,
                live,
                self.position.segment,
            )
            self.position.segment, self.position.offset = 1, 0
            return
        size = self.log.size()
        if self.position.segment == live and self.position.offset > size:
            logger.error(
                "audit: %s is shorter (%d bytes) than what was sent (%d); "
                "sending it from the start",
                self.log.path,
                size,
                self.position.offset,
            )
            self.position.offset = 0

    def _send(self, records: list[Record]) -> None:
        """Send ``records`` in order; the position follows each one sent and
        is saved once for the batch, also when the batch breaks off."""
        start = (self.position.segment, self.position.offset)
        try:
            for record in records:
                if not self._transport.connected:
                    self._transport.connect()
                message = format_message(
                    record, self.facility, self.hostname, self.position.sent + 1
                )
                try:
                    self._transport.send(message)
                except MessageTooLong as exc:
                    logger.error(
                        "audit: %s record of %s not sent: %s; it is in %s",
                        record.event,
                        record.time,
                        exc,
                        self.log.path,
                    )
                self.position.segment = record.segment
                self.position.offset = record.end
                self.position.sent += 1
        finally:
            if (self.position.segment, self.position.offset) != start:
                self.position.save()

    def _note_down(self, exc: Exception) -> None:
        if self._down_since_logged:
            return
        self._down_since_logged = True
        logger.warning(
            "audit: cannot send to the syslog collector %s:%d (%s); records wait in %s",
            self.destination.host,
            self.destination.port,
            exc,
            self.log.path,
        )

    def _note_up(self) -> None:
        if self._down_since_logged:
            self._down_since_logged = False
            logger.info(
                "audit: syslog collector %s:%d reachable again",
                self.destination.host,
                self.destination.port,
            )


def from_config(config: Config) -> Sender | None:
    """The sender [audit] asks for, not started; None when there is none."""
    transport = config.get("audit.syslog_transport")
    if transport == "off" or not config.get("audit.enabled"):
        return None
    destination = Destination(
        transport=transport,
        host=config.get("audit.syslog_host"),
        port=config.get("audit.syslog_port") or DEFAULT_PORTS[transport],
        ca_file=_resolved(config, "audit.ca_file"),
        certificate=_resolved(config, "audit.certificate"),
        key=_resolved(config, "audit.key"),
    )
    facility = FACILITIES[config.get("audit.facility")]
    return Sender(AuditLog(audit_folder(config)), destination, facility)


def _resolved(config: Config, key: str) -> str:
    value = config.get(key)
    if not value:
        return ""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else config.base_dir / path)
