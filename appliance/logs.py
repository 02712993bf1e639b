"""Log output: plain text for people, one JSON object per line for journald."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import error_log

if TYPE_CHECKING:
    from appliance.config import Config


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the fields journald users filter on."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "INFO", style: str = "text", errors: Path | None = None) -> None:
    """Send every log record of the appliance to standard error, and its
    warnings and errors to the ``errors`` file too when one is given."""
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if errors is not None:
        try:
            root.addHandler(error_log.ErrorFileHandler(errors))
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "recent errors are not kept in %s: %s", errors, exc
            )


def setup_service(config: Config) -> None:
    """:func:`setup` for a process of the running service: the configured
    level and format, and the errors file the admin API reads."""
    setup(
        config.get("logging.level"),
        config.get("logging.format"),
        error_log.path_of(config.data_dir),
    )
