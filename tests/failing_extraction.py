"""An extraction that fails for one instance, for the worker processes of a
restore under test: they import it by name, and inherit from the test the
environment that says which instance fails and how."""

from __future__ import annotations

import os

from appliance.hsm.extraction import MemberJob, Outcome, extract_member
from appliance.hsm.failures import Failure

# The SOP Instance UID whose extraction fails, and how: "raises" an error
# no check expects, or "dies" (the worker process ends at once).
FAILING = "TEST_RESTORE_FAILING_INSTANCE"
FAILING_HOW = "TEST_RESTORE_FAILING_HOW"


def failing_extract(job: MemberJob) -> Outcome:
    """Run by the worker processes in place of the real extraction."""
    if job.entry.sop_instance_uid == os.environ.get(FAILING):
        if os.environ[FAILING_HOW] == "dies":
            os._exit(70)
        raise RuntimeError("controller fault")
    return extract_member(job)


def failing_extract_all(jobs: list[MemberJob | Failure]) -> list[Outcome]:
    """Run by the worker processes in place of the real extraction."""
    return [job if isinstance(job, Failure) else failing_extract(job) for job in jobs]
