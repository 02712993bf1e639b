"""An ansible callback for the tests: every task result, as JSON lines.

ansible-core no longer ships a JSON stdout callback, so tests/test_ansible.py
enables this one beside the normal screen output. Each line is one result
of one task on one host: its task name, host, status (ok, changed, skipped,
failed, unreachable) and message. The file is named by the environment
variable PACS_ANSIBLE_RESULTS.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase  # type: ignore[import-not-found]

DOCUMENTATION = """
name: record_results
type: aggregate
short_description: Record every task result as a JSON line
description: Writes one JSON object per task result to $PACS_ANSIBLE_RESULTS.
requirements:
  - PACS_ANSIBLE_RESULTS names the file
"""


class CallbackModule(CallbackBase):  # type: ignore[misc]
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record_results"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result: Any, status: str) -> None:
        outcome = result._result
        if status == "ok" and outcome.get("changed"):
            status = "changed"
        entry = {
            "task": result._task.get_name(),
            "host": result._host.get_name(),
            "status": status,
            # A failed command says why on its own output, not in msg.
            "msg": "\n".join(
                str(outcome[key])
                for key in ("msg", "stderr", "stdout")
                if outcome.get(key)
            ),
            "failed_items": [
                str(item.get("msg", ""))
                for item in outcome.get("results", [])
                if isinstance(item, dict) and item.get("failed")
            ],
        }
        with open(os.environ["PACS_ANSIBLE_RESULTS"], "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")

    def v2_runner_on_ok(self, result: Any) -> None:
        self._record(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._record(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._record(result, "unreachable")
