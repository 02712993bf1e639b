"""Free loopback ports for the servers the tests start.

Asking the kernel for port 0 and closing the socket gives a port that is
free now, but the kernel may hand the same one out again at the next ask:
a test that takes two ports (an appliance's DICOM and HL7 ports, say) could
be given one twice, and two pytest-xdist workers could draw the same one.
So each worker takes ports from its own block below the kernel's ephemeral
range (which starts at 32768 by default), going round it in turn and
skipping any that something holds or that it handed out lately; outside
xdist the kernel picks, and this process never hands a port out twice.
Two test runs side by side use the same blocks, so each run starts going
round at its own place.

A port handed out is free only until some other process takes it. A
server started at once wins that race nearly always, but a destination the
appliance is configured with at the start and that listens only later, in
one test, can find its port taken by another test run's server: it fails to
listen, and the appliance sends to the stranger. :func:`held_port` keeps
such a port bound (not listening) until the test's server listens on it,
or for the whole test when nothing is to listen there. A server that stops
and starts again on its port (an appliance restarted, a mirror that goes
away and comes back) takes its port with :func:`port_for`, held as long as
the object standing for the server lives. :func:`wait_listening` waits for
the very process started, not for whatever accepts connections there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import time
import weakref
import zlib
from collections import deque
from dataclasses import dataclass, field

import psutil

_FIRST_BLOCK = 20000
_BLOCK_SIZE = 1000
_MOST_WORKERS = 12
# A port handed out this many ports ago belongs to a test long finished, or
# to a server still holding it, which the bind check below sees.
_RECENT = 300
_handed_out: set[int] = set()
_recent: deque[int] = deque(maxlen=_RECENT)
# Workers of one run share its id; another run, beside it, starts elsewhere
# in each block instead of asking for the very ports this one just took.
_turn = itertools.count(
    zlib.crc32(os.environ.get("PYTEST_XDIST_TESTRUNUID", "").encode()) % _BLOCK_SIZE
)


def _worker_index() -> int | None:
    """This xdist worker's number (``gw2`` is 2), or None outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    if name.startswith("gw") and name[2:].isdigit():
        return int(name[2:]) % _MOST_WORKERS
    return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_pick() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port() -> int:
    """A loopback TCP port that is free now and that this process (or,
    under xdist, any other worker) has not handed out before."""
    worker = _worker_index()
    if worker is None:
        for _ in range(1000):
            port = _kernel_pick()
            if port not in _handed_out:
                _handed_out.add(port)
                return port
        raise RuntimeError("the kernel keeps offering ports handed out before")

    start = _FIRST_BLOCK + worker * _BLOCK_SIZE
    for _ in range(_BLOCK_SIZE):
        port = start + next(_turn) % _BLOCK_SIZE
        if port not in _recent and _bindable(port):
            _recent.append(port)
            return port
    raise RuntimeError(f"no free loopback port in {start}..{start + _BLOCK_SIZE - 1}")


@dataclass
class HeldPort:
    """A free port kept bound, not listening, until :meth:`release`.

    The socket has SO_REUSEADDR, as the servers the tests start have
    (pynetdicom, DCMTK): they can bind and listen on the port while it is
    held. A plain bind, which is how this module and the kernel (port 0)
    test a port, fails, so no other test run is handed it meanwhile; and
    with no listener, a connection to it is refused.
    """

    port: int
    _socket: socket.socket = field(repr=False)

    def release(self) -> None:
        self._socket.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def held_port() -> HeldPort:
    """A port as :func:`free_port` gives one, held until released."""
    for _ in range(100):
        port = free_port()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()  # taken since free_port looked: take another
            continue
        return HeldPort(port, sock)
    raise RuntimeError("no port could be held")


def port_for(owner: object) -> int:
    """A port held for as long as ``owner`` (the object that starts a
    server on it) lives.

    The server binds it over the hold whenever it listens; while it is
    stopped, between a stop and the next start, nobody else is handed the
    port and a connection to it is refused.
    """
    held = held_port()
    weakref.finalize(owner, held.release)
    return held.port


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on TCP ``port``."""
    sockets = psutil.Process(pid).net_connections(kind="tcp")
    return any(
        s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port
        for s in sockets
    )


def wait_listening(
    process: subprocess.Popen[bytes], port: int, what: str = "destination"
) -> None:
    """Wait until ``process`` listens on ``port``.

    A connection that is accepted is not enough: another program (another
    test run's server, say) may hold the port, and this one then exits
    for want of it, while the appliance would send to the stranger.
    """
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with socket.socket() as probe:
                taken = probe.connect_ex(("127.0.0.1", port)) == 0
            held = f": port {port} is held by another program" if taken else ""
            raise AssertionError(f"{what} exited{held}")
        with contextlib.suppress(psutil.NoSuchProcess):
            if listens(process.pid, port):
                return
        time.sleep(0.05)
    raise AssertionError(f"the {what} does not listen on port {port}")
