"""Command line for the metrics: ``appliance metrics``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from appliance import logs
from appliance.cli_shared import Loader, config_option, data_dir_option

logger = logging.getLogger(__name__)


def register(main: click.Group, load: Loader) -> None:
    """Add the ``metrics`` command to ``main``."""

    @main.command()
    @config_option
    @data_dir_option
    def metrics(config_file: Path | None, data_dir: str | None) -> None:
        """Print what Prometheus would scrape from GET /metrics: the running
        service's counters and the archive's state (docs/metrics.md)."""
        config = load(config_file, {"storage.data_dir": data_dir})
        logs.setup("WARNING", config.get("logging.format"))
        from appliance.metrics import exposition

        body, _content_type = exposition(config)
        click.echo(body.decode(), nl=False)
