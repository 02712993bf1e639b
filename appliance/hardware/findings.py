"""The outcome of one hardware check: OK, WARN or FAIL, and what to do."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

Status = Literal["OK", "WARN", "FAIL"]


@dataclass(frozen=True)
class Finding:
    """One checked fact. ``action`` says what to do; empty when OK.

    WARN is worth knowing but does not stop the appliance from working as
    configured (a rebuild in progress, a folder not made yet); FAIL is a
    mismatch that puts data or service at risk and must be fixed.
    """

    check: str
    status: Status
    message: str
    action: str = ""

    def line(self) -> str:
        """One line for people: status, check, what was found, what to do."""
        text = f"{self.status:<4}  {self.check}: {self.message}"
        return f"{text}; do: {self.action}" if self.action else text

    def as_dict(self) -> dict[str, Any]:
        """The finding as JSON-ready values."""
        return asdict(self)


def ok(check: str, message: str) -> Finding:
    """A check that found what was expected."""
    return Finding(check, "OK", message)


def warn(check: str, message: str, action: str) -> Finding:
    """A condition worth knowing, and what to do about it."""
    return Finding(check, "WARN", message, action)


def fail(check: str, message: str, action: str) -> Finding:
    """A mismatch to fix, and how."""
    return Finding(check, "FAIL", message, action)


def worst(findings: Iterable[Finding]) -> Status:
    """FAIL if any failed, else WARN if any warned, else OK."""
    statuses = {finding.status for finding in findings}
    if "FAIL" in statuses:
        return "FAIL"
    return "WARN" if "WARN" in statuses else "OK"
