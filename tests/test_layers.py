"""Imports flow one way: front ends -> ingest -> catalog, storage.

The catalog and storage never import the DICOM node, the service or the
command line; the node never imports the command line.
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
    "appliance.part10": ("appliance.",),
    "appliance.ingest": ("appliance.dicom", "appliance.service", "appliance.cli"),
    "appliance.dicom": ("appliance.service", "appliance.cli"),
    "appliance.config": ("appliance.dicom", "appliance.catalog", "appliance.storage"),
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
