"""The audit trail of one process: where records go and what names the
appliance in them."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit.log import AuditLog, Record
from appliance.audit.messages import AuditMessage, timestamp, to_xml

if TYPE_CHECKING:
    from appliance.config import Config

logger = logging.getLogger(__name__)


def audit_folder(config: Config) -> Path:
    return config.data_dir / "audit"


class Trail:
    """Records audit messages in the local audit log (when enabled)."""

    def __init__(
        self,
        folder: Path,
        ae_title: str,
        source_id: str = "",
        enabled: bool = True,
        rotate_bytes: int = 0,
        keep_files: int = 0,
    ) -> None:
        self.log = AuditLog(folder, rotate_bytes, keep_files)
        self.ae_title = ae_title
        self.source_id = source_id or ae_title
        self.enabled = enabled
        self._host = socket.gethostname()

    @classmethod
    def of(cls, config: Config) -> Trail:
        return cls(
            audit_folder(config),
            config.get("node.ae_title").strip(),
            config.get("audit.source_id").strip(),
            config.get("audit.enabled"),
            config.get("audit.rotate_bytes"),
            config.get("audit.keep_files"),
        )

    def record(self, message: AuditMessage) -> None:
        """Append ``message`` to the log, flushed to disk. A failure to write
        is logged, not raised: the audit trail never stops a transfer."""
        if not self.enabled:
            return
        message.source_id = message.source_id or self.source_id
        record = Record(
            time=timestamp(message.time),
            event=message.name,
            message=to_xml(message),
            outcome=message.outcome,
            pid=os.getpid(),
            host=self._host,
        )
        try:
            self.log.append(record)
        except OSError as exc:
            logger.error(
                "audit record %s of %s lost: cannot write %s: %s",
                message.name,
                record.time,
                self.log.path,
                exc,
            )
