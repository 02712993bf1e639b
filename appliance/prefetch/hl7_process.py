"""The HL7 listener as a child process of the service.

The listener process binds the HL7 port itself, before it tells systemd it
is ready, so that a port in use or a wrong address stops the start with a
reason; a child process (kept running by a supervisor) serves the bound
socket with the catalog of its own, as the workers serve DICOM: a crash in
HL7 handling takes nothing else with it, and the listener process never
holds the catalog open beside its other users.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

from appliance import logs, tls
from appliance.children import ChildSupervisor, die_with_parent
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.hl7.listener import ListenerSettings, bind

if TYPE_CHECKING:
    from appliance.catalog.store import Catalog

logger = logging.getLogger(__name__)

# Seconds between two prunings of the ACKs kept for resent messages.
_PRUNE_EVERY = 86_400.0


def settings(config: Config) -> ListenerSettings:
    return ListenerSettings(
        max_message_bytes=config.get("hl7.max_message_bytes"),
        idle_timeout=config.get("hl7.idle_timeout"),
        max_connections=config.get("hl7.max_connections"),
        handshake_timeout=config.get("timeouts.association"),
    )


class HL7Service:
    """The bound HL7 port (and MLLP over TLS port, with hl7.tls) and the
    supervised child that serves them."""

    def __init__(self, config: Config) -> None:
        self.sock = _bind(config, "hl7.port")
        self.secure_sock: socket.socket | None = None
        if config.get("hl7.tls"):
            try:
                self.secure_sock = _bind(config, "hl7.tls_port")
            except ApplianceError:
                self.sock.close()
                raise
        self.supervisor = ChildSupervisor(
            serve_hl7, (config, self.sock, self.secure_sock), "hl7", stop_grace=10.0
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def secure_address(self) -> tuple[str, int] | None:
        if self.secure_sock is None:
            return None
        host, port = self.secure_sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self.supervisor.start()

    def stop(self) -> None:
        self.supervisor.stop()
        self.close()

    def close(self) -> None:
        self.sock.close()
        if self.secure_sock is not None:
            self.secure_sock.close()


def _bind(config: Config, port_key: str) -> socket.socket:
    address, port = config.get("hl7.bind_address"), config.get(port_key)
    try:
        return bind(address, port)
    except OSError as exc:
        raise ApplianceError(
            f"cannot listen for HL7 on {address}:{port}: {exc.strerror} "
            f"(hl7.bind_address, {port_key})"
        ) from exc


def serve_hl7(
    config: Config, sock: socket.socket, secure_sock: socket.socket | None = None
) -> None:
    """Serve HL7 until SIGTERM (the child process's work)."""
    die_with_parent()
    logs.setup_service(config)
    from appliance.audit.trail import Trail
    from appliance.catalog.store import Catalog
    from appliance.hl7.listener import Listener
    from appliance.prefetch.intake import Intake

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    intake = Intake(catalog, Trail.of(config))
    listeners = [Listener(sock, intake, settings(config))]
    if secure_sock is not None:
        context = tls.server_context(config)
        listeners.append(
            Listener(secure_sock, intake, settings(config), context, intake.tls_failed)
        )
    try:
        for listener in listeners:
            listener.start()
            host, port = listener.address
            over = " over TLS" if listener.tls_context else ""
            logger.info("HL7 (MLLP%s) listening on %s:%d", over, host, port)
        keep_for = config.get("hl7.ack_days") * 86_400
        while True:
            prune_answers(catalog, time.time() - keep_for)
            if stop.wait(_PRUNE_EVERY):
                break
    finally:
        for listener in listeners:
            listener.stop()
        catalog.close()


def prune_answers(catalog: Catalog, older_than: float) -> None:
    """Delete the ACKs kept since before ``older_than``; a failure is
    logged and tried again at the next pruning."""
    from appliance.catalog import answers

    try:
        deleted = answers.prune(catalog, older_than)
    except ApplianceError as exc:
        logger.error("cannot delete old HL7 answers: %s", exc)
        return
    if deleted:
        logger.info("%d HL7 answer(s) older than hl7.ack_days deleted", deleted)
