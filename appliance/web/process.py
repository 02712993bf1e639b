"""The HTTP server as a child process of the service.

As for HL7, the listener process binds the port itself before it tells
systemd it is ready, so that a port in use, a wrong address or an
unreadable certificate stops the start with a reason; a supervised child
serves the bound socket with uvicorn and an archive handle of its own.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import ssl
from multiprocessing.synchronize import Event
from types import FrameType

import uvicorn

from appliance import logs
from appliance.children import ChildSupervisor, die_with_parent
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.web.header_timeout import with_header_timeout

logger = logging.getLogger(__name__)

# Seconds open requests get to finish when the service stops.
_STOP_GRACE = 10
# Seconds a kept-alive connection may stay idle after an answer before it
# is closed without a line (uvicorn's default, named: docs/web.md says it);
# web.header_timeout closes it sooner if it is shorter.
_KEEP_ALIVE = 5
# Seconds the service waits for the HTTP server to answer before it says it
# is ready without it (a start takes a few seconds: imports, the catalog).
_START_WAIT = 60


class WebService:
    """The bound HTTP port and the supervised child that serves it."""

    def __init__(self, config: Config) -> None:
        _check_tls(config)
        self.sock = bind(config.get("web.bind_address"), config.get("web.port"))
        self.scheme = "https" if config.get("web.tls_certificate") else "http"
        # Set by the child once uvicorn serves: the port listens from the
        # start, but until then a request only waits in its backlog.
        self.serving = multiprocessing.get_context("spawn").Event()
        self.supervisor = ChildSupervisor(
            serve_web,
            (config, self.sock, self.serving),
            "web",
            stop_grace=_STOP_GRACE + 5,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self.supervisor.start()

    def wait_until_serving(self, wait: float = _START_WAIT) -> None:
        """Return once the child answers requests, or after ``wait``
        seconds (and then say so)."""
        if not self.serving.wait(wait):
            logger.warning(
                "HTTP server not answering after %.0f s; going on without waiting",
                wait,
            )

    def stop(self) -> None:
        self.supervisor.stop()
        self.sock.close()


def bind(address: str, port: int) -> socket.socket:
    """A listening TCP socket; ApplianceError naming the keys if it cannot be."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # With the protocol named, asyncio sets TCP_NODELAY on accepted
    # connections; without it a response's body waits for the client's
    # delayed ACK of its headers (some 40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ApplianceError(
            f"cannot listen for HTTP on {address}:{port}: {exc.strerror} "
            "(web.bind_address, web.port)"
        ) from exc
    return sock


def _check_tls(config: Config) -> None:
    certificate = config.get("web.tls_certificate")
    key = config.get("web.tls_key")
    if not certificate:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            certificate, key or None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ApplianceError(
            f"cannot use the TLS certificate {certificate} and key {key or '-'}: "
            f"{exc} (web.tls_certificate, web.tls_key)"
        ) from exc


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, serving: Event | None) -> None:
        super().__init__(config)
        self.serving = serving

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.serving is not None:
            self.serving.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl-C reaches the whole process group; the listener stops this
        # child with SIGTERM once it has stopped accepting DICOM.
        if sig == signal.SIGINT:
            return
        super().handle_exit(sig, frame)


def serve_web(
    config: Config, sock: socket.socket, serving: Event | None = None
) -> None:
    """Serve HTTP on the bound socket until SIGTERM (the child's work);
    ``serving`` is set once requests are answered."""
    die_with_parent()
    logs.setup_service(config)
    from appliance.web.app import build_app

    certificate = config.get("web.tls_certificate")
    settings = uvicorn.Config(
        build_app(config),
        log_config=None,
        # The appliance's own access log names routes, never paths.
        access_log=False,
        server_header=False,
        ssl_certfile=certificate or None,
        ssl_keyfile=config.get("web.tls_key") or None,
        timeout_graceful_shutdown=_STOP_GRACE,
        timeout_keep_alive=_KEEP_ALIVE,
        lifespan="on",
        # h11, named rather than "auto" (which would take httptools if it
        # were installed): the header time limit hooks into h11's protocol.
        http=with_header_timeout(config.get("web.header_timeout")),
    )
    host, port = sock.getsockname()[:2]
    scheme = "https" if certificate else "http"
    logger.info("HTTP listening on %s://%s:%d", scheme, host, port)
    _Server(settings, serving).run(sockets=[sock])
