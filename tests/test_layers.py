"""Imports flow one way: front ends -> ingest -> catalog, storage.

The catalog and storage never import the DICOM node, the service or the
command line; the node never imports the command line. The pack format and
the master keys import no tier. The migration policy is pure: it imports
nothing of the appliance and no module that reads files, clocks or sockets.
The bandwidth limiter uses only the errors and the durable-write helpers.
The hardware checks never import the DICOM node, the service or the command
line, and only their probe reads the host.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "appliance"

# module prefix -> prefixes it must not import
FORBIDDEN = {
    "appliance.catalog": (
        "appliance.dicom",
        "appliance.service",
        "appliance.cli",
        "appliance.ingest",
        "appliance.storage",
    ),
    "appliance.storage": (
        "appliance.dicom",
        "appliance.service",
        "appliance.cli",
        "appliance.ingest",
        "appliance.catalog",
    ),
    # The pack format and the master keys sit below every tier that uses them.
    "appliance.storage.packs": (
        "appliance.storage.online",
        "appliance.storage.nearline",
        "appliance.storage.offline",
        "appliance.storage.volumes",
        "appliance.hsm",
    ),
    "appliance.storage.keys": (
        "appliance.storage.online",
        "appliance.storage.nearline",
        "appliance.storage.offline",
        "appliance.storage.volumes",
        "appliance.storage.packs",
        "appliance.hsm",
    ),
    # Volumes move packs as opaque byte streams: no pack format, no keys.
    "appliance.storage.volumes": (
        "appliance.storage.online",
        "appliance.storage.packs",
        "appliance.storage.keys",
        "appliance.hsm",
    ),
    "appliance.part10": ("appliance.",),
    "appliance.ingest": ("appliance.dicom", "appliance.service", "appliance.cli"),
    "appliance.dicom": ("appliance.service", "appliance.cli"),
    "appliance.config": ("appliance.dicom", "appliance.catalog", "appliance.storage"),
    "appliance.hsm": ("appliance.dicom", "appliance.service", "appliance.cli"),
    "appliance.hsm.policy": ("appliance.",),
    # A restore drives the catalog, the tiers and the mirror; nothing above.
    "appliance.restore": ("appliance.dicom", "appliance.service", "appliance.cli"),
    # HL7 is a protocol layer: it records nothing and knows no catalog.
    "appliance.hl7": (
        "appliance.catalog",
        "appliance.storage",
        "appliance.prefetch",
        "appliance.dicom",
        "appliance.service",
        "appliance.cli",
    ),
    "appliance.prefetch": ("appliance.dicom", "appliance.service", "appliance.cli"),
    # The HTTP server is a front end beside the DICOM node: it reuses the
    # node's query code, and nothing below imports it.
    "appliance.web": ("appliance.service", "appliance.cli"),
    # An export sends through the DICOM layer; nothing above it.
    "appliance.export": ("appliance.service", "appliance.cli"),
    # Hardware checks and sizing read the host and the configuration only.
    "appliance.hardware": ("appliance.dicom", "appliance.service", "appliance.cli"),
    # Mirror transports move opaque, already encrypted files: no catalog, no
    # DICOM, no tiers' logic, no pack format or keys, no wiring above them.
    "appliance.replication.transports": (
        "appliance.catalog",
        "appliance.dicom",
        "appliance.hsm",
        "appliance.service",
        "appliance.cli",
        "appliance.ingest",
        "appliance.storage.packs",
        "appliance.storage.keys",
    ),
}

# The standard library modules the pure policy may use, so that its
# decisions depend on its arguments only.
POLICY_MODULES = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "logging",
    "math",
    "typing",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_imports_flow_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        for prefix, forbidden in FORBIDDEN.items():
            if not (module == prefix or module.startswith(prefix + ".")):
                continue
            for imported in _imports(path):
                if imported == "appliance.errors":
                    continue
                if any(imported.startswith(bad) for bad in forbidden):
                    violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_policy_is_pure():
    path = PACKAGE / "hsm" / "policy.py"
    modules = {name.split(".")[0] for name in _imports(path)}
    assert modules <= POLICY_MODULES, sorted(modules - POLICY_MODULES)


# Everything of the appliance that the bandwidth limiter may import.
BANDWIDTH_IMPORTS = ("appliance.errors", "appliance.storage.durable")


def test_the_bandwidth_limiter_stands_alone():
    path = PACKAGE / "replication" / "bandwidth.py"
    ours = {name for name in _imports(path) if name.split(".")[0] == "appliance"}
    allowed = {
        name
        for name in ours
        if any(name == a or name.startswith(a + ".") for a in BANDWIDTH_IMPORTS)
    }
    assert ours == allowed, sorted(ours - allowed)


# Only the probe reads the host (/proc, /sys, limits, programs); the
# parsers, checks and sizing decide from what they are given.
HARDWARE_IO = {"probe.py"}
HOST_MODULES = {"os", "shutil", "resource", "subprocess", "socket", "glob"}


def test_hardware_checks_and_sizing_are_pure():
    impure = {}
    for path in (PACKAGE / "hardware").glob("*.py"):
        if path.name in HARDWARE_IO:
            continue
        found = {name.split(".")[0] for name in _imports(path)} & HOST_MODULES
        if found:
            impure[path.name] = sorted(found)
    assert not impure, impure
