"""One scrape: the counters every process of the service wrote, and the
state read now, in the Prometheus text format."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.metrics.folder import folder_of
from appliance.metrics.state import StateCollector

logger = logging.getLogger(__name__)


def exposition(config: Config, catalog: Catalog | None = None) -> tuple[bytes, str]:
    """The body and content type of a scrape of the appliance ``config``
    describes. The counters are those of the running service (or of the
    last one, when it is stopped); none before it first started."""
    registry = CollectorRegistry()
    folder = folder_of(config.data_dir)
    if folder.is_dir():
        MultiProcessCollector(registry, path=str(folder))
    registry.register(StateCollector(config, catalog))
    return generate_latest(registry), CONTENT_TYPE_LATEST
