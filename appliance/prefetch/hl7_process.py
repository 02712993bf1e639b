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

from appliance import logs
from appliance.children import ChildSupervisor, die_with_parent
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.hl7.listener import ListenerSettings, bind

logger = logging.getLogger(__name__)


def settings(config: Config) -> ListenerSettings:
    return ListenerSettings(
        max_message_bytes=config.get("hl7.max_message_bytes"),
        idle_timeout=config.get("hl7.idle_timeout"),
        max_connections=config.get("hl7.max_connections"),
    )


class HL7Service:
    """The bound HL7 port and the supervised child that serves it."""

    def __init__(self, config: Config) -> None:
        address, port = config.get("hl7.bind_address"), config.get("hl7.port")
        try:
            self.sock = bind(address, port)
        except OSError as exc:
            raise ApplianceError(
                f"cannot listen for HL7 on {address}:{port}: {exc.strerror} "
                "(hl7.bind_address, hl7.port)"
            ) from exc
        self.supervisor = ChildSupervisor(
            serve_hl7, (config, self.sock), "hl7", stop_grace=10.0
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self.supervisor.start()

    def stop(self) -> None:
        self.supervisor.stop()
        self.sock.close()


def serve_hl7(config: Config, sock: socket.socket) -> None:
    """Serve HL7 until SIGTERM (the child process's work)."""
    die_with_parent()
    logs.setup_service(config)
    from appliance.catalog.store import Catalog
    from appliance.hl7.listener import Listener
    from appliance.prefetch.intake import Intake

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    catalog = Catalog(config.catalog_path, config.get("storage.catalog_max_size"))
    listener = Listener(sock, Intake(catalog), settings(config))
    try:
        listener.start()
        host, port = listener.address
        logger.info("HL7 (MLLP) listening on %s:%d", host, port)
        stop.wait()
    finally:
        listener.stop()
        catalog.close()
