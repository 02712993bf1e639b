"""CPU taken by open associations that do nothing.

Workstations and some modalities keep associations open between studies.
This starts ``appliance serve`` and, as the reference, pynetdicom's own
``storescp`` app, opens 1, 4 and 8 associations to each (storescp takes
10 at most; Verification, one C-ECHO each, then nothing), waits a few
seconds and measures the CPU that the server and its child processes use
over ``--seconds`` while the associations stay idle. The associations are
held by a pynetdicom client in this process with the appliance's reactor
waits installed, so that its own polling does not crowd the servers out
of the two cores.

Usage: ``.venv/bin/python bench/idle.py [--seconds 5] [--counts 1 4 8]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import (
    LOOPBACK,
    Server,
    Servers,
    exit_on_sigterm,
    free_port,
    print_table,
    start_appliance,
    start_pynetdicom_storescp,
    tree_cpu_seconds,
    wait_until_settled,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from appliance.dicom import reactor_waits

# Long enough for the appliance's loops to count the associations as idle.
_SETTLE = 3.0


def hold(port: int, called_ae: str, count: int) -> list[Association]:
    """``count`` established associations, each after one C-ECHO."""
    ae = AE(ae_title="BENCHIDLE")
    ae.add_requested_context(Verification)
    ae.maximum_associations = count + 1
    held = []
    for _ in range(count):
        assoc = ae.associate(LOOPBACK, port, ae_title=called_ae)
        if not assoc.is_established:
            raise RuntimeError(f"no association with {called_ae} on port {port}")
        status = assoc.send_c_echo()
        if int(status.Status) != 0:
            raise RuntimeError(f"C-ECHO answered 0x{int(status.Status):04X}")
        held.append(assoc)
    return held


def measure(
    server: Server, port: int, called_ae: str, count: int, seconds: float
) -> float:
    """Percent of one core that ``server`` uses while ``count`` associations
    to it stay idle."""
    held = hold(port, called_ae, count)
    try:
        time.sleep(_SETTLE)
        before = tree_cpu_seconds(server.process.pid)
        time.sleep(seconds)
        used = tree_cpu_seconds(server.process.pid) - before
    finally:
        for assoc in held:
            assoc.release()
    return used / seconds * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    exit_on_sigterm()
    reactor_waits.install()

    root = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    results: dict[str, dict[int, float]] = {"appliance": {}, "pynetdicom": {}}
    try:
        with Servers() as servers:
            port, reference_port = free_port(), free_port()
            # Its own HTTP port too: the default may be taken on a test box.
            config = root / "appliance.toml"
            config.write_text(f"[web]\nport = {free_port()}\n")
            appliance = start_appliance(servers, root / "appliance-data", port, config)
            output = root / "storescp"
            reference = start_pynetdicom_storescp(servers, output, reference_port)
            wait_until_settled(reference.process.pid)
            for count in args.counts:
                results["appliance"][count] = measure(
                    appliance, port, "APPLIANCE", count, args.seconds
                )
                results["pynetdicom"][count] = measure(
                    reference, reference_port, "ANY-SCP", count, args.seconds
                )
                print(
                    f"  {count} idle: appliance {results['appliance'][count]:.1f}%, "
                    f"storescp {results['pynetdicom'][count]:.1f}% of a core"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for count in args.counts:
        ours, theirs = results["appliance"][count], results["pynetdicom"][count]
        ratio = f"{theirs / ours:.1f}" if ours > 0 else "-"
        rows.append([str(count), f"{ours:.1f}", f"{theirs:.1f}", ratio])
    print_table(
        [
            "idle associations",
            "appliance, % of a core",
            "storescp, % of a core",
            "storescp / appliance",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
