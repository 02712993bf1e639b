"""Metrics for Prometheus: events counted by every process of the service
(:mod:`~appliance.metrics.events`), state read from the catalog and the
state files at each scrape (:mod:`~appliance.metrics.state`).

The HTTP server's ``GET /metrics`` answers with :func:`exposition`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.catalog.store import Catalog
    from appliance.config import Config


def exposition(config: Config, catalog: Catalog | None = None) -> tuple[bytes, str]:
    """(body, content type) of a scrape; see :func:`appliance.metrics.scrape.
    exposition`. Imported here on first use, so that the sites that count
    events (``appliance.metrics.events``) load nothing of the scrape."""
    from appliance.metrics.scrape import exposition as scrape

    return scrape(config, catalog)
