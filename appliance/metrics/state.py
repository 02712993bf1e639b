"""The appliance's state as Prometheus gauges, read at each scrape.

Nothing here is counted in memory: every number comes from the catalog or
from the files the parts of the appliance keep (scrub, drills, restore),
by the same functions ``appliance status``, ``tiers``, ``dr report``,
``prefetch status`` and ``scrub status`` use, so that a dashboard and the
command line never disagree.
"""

from __future__ import annotations

import calendar
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.catalog import copies, requests
from appliance.catalog.store import Catalog
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.hsm import jobs
from appliance.prefetch import readiness
from appliance.restore import drill_records, objectives, progress
from appliance.restore.drill_job import drills_folder
from appliance.scrub import state as scrub_state

logger = logging.getLogger(__name__)

LEVELS = ("patients", "studies", "series", "instances")
# The tiers ``appliance tiers`` lists, and the mirror.
TIERS = ("online", "nearline", "offline", "offsite")
PACK_TIERS = ("nearline", "offline", "offsite")
RESTORE_STATES = (
    "rebuilding",
    "rebuilt",
    "starting",
    "restoring",
    "paused",
    "done",
    "stopped",
)

Metric = GaugeMetricFamily | CounterMetricFamily
Part = Callable[[], Iterable[Metric]]


class _StudyCounts:
    """Studies complete on each tier, counted again only when the catalog
    changed: counting reads every study record (about a second at 100,000
    studies), and a scrape comes every 15 to 60 seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._counts: dict[str, int] = {}

    def of(self, catalog: Catalog) -> dict[str, int]:
        key = (str(catalog.path), int(catalog.env.info()["last_txnid"]))
        with self._lock:
            if key != self._key:
                self._counts = _count_studies(catalog)
                self._key = key
            return dict(self._counts)


def _count_studies(catalog: Catalog) -> dict[str, int]:
    """As ``appliance tiers`` counts them: studies with every instance on
    the tier."""
    studies = dict.fromkeys(TIERS, 0)
    for study in copies.all_study_copies(catalog):
        for tier in TIERS:
            studies[tier] += study.complete_on(tier)
    return studies


_STUDIES = _StudyCounts()


class StateCollector(Collector):
    """Gauges of the tiers, queues, requests, prefetch, drills, scrub and
    restore, for one appliance's configuration.

    ``catalog``: an open catalog to read (a process must not open the same
    LMDB environment twice); without it, each scrape opens the catalog
    read-only and closes it again.
    """

    def __init__(self, config: Config, catalog: Catalog | None = None) -> None:
        self.config = config
        self.catalog = catalog

    def collect(self) -> Iterator[Metric]:
        catalog = self.catalog or self._open()
        yield _gauge(
            "appliance_catalog_available",
            "1 when the catalog could be read for this scrape; 0 leaves out "
            "every metric that comes from it.",
            float(catalog is not None),
        )
        unreadable: dict[str, float] = {}
        try:
            for part, metrics in self._parts(catalog):
                try:
                    found = list(metrics())
                except Exception as exc:
                    # One part that does not read must not cost the others.
                    logger.warning("metrics: cannot read the %s: %s", part, exc)
                    unreadable[part] = 1.0
                    continue
                unreadable[part] = 0.0
                yield from found
        finally:
            if catalog is not None and catalog is not self.catalog:
                catalog.close()
        yield _by_label(
            "appliance_state_unreadable",
            "1 for each part of the state that could not be read for this "
            "scrape (the log says why).",
            "part",
            unreadable,
        )

    def _parts(self, catalog: Catalog | None) -> list[tuple[str, Part]]:
        parts: list[tuple[str, Part]] = [
            ("drills", self._drills),
            ("restore", self._restore),
        ]
        if catalog is None:
            return parts
        counts = functools.lru_cache(maxsize=1)(catalog.counts)
        config = self.config
        return [
            ("catalog", lambda: [_records(counts())]),
            ("tiers", lambda: _tiers(config, catalog, counts())),
            ("replication", lambda: _replication(catalog)),
            ("requests", lambda: [_operator_requests(catalog)]),
            ("prefetch", lambda: _prefetch(catalog)),
            ("scrub", lambda: _scrub(config, catalog, counts())),
            *parts,
        ]

    def _open(self) -> Catalog | None:
        path = self.config.catalog_path
        if not path.exists():
            return None
        try:
            return Catalog(
                path, self.config.get("storage.catalog_max_size"), readonly=True
            )
        except ApplianceError as exc:
            logger.warning("metrics: cannot open the catalog: %s", exc)
            return None

    def _drills(self) -> Iterator[Metric]:
        found = drill_records.recent(drills_folder(self.config), 1)
        if not found:
            return
        last = found[-1]
        stamp = calendar.timegm(time.strptime(last.date, "%Y-%m-%dT%H:%M:%SZ"))
        yield _gauge(
            "appliance_drill_last_timestamp_seconds",
            "When the last restore drill started (Unix time).",
            stamp,
        )
        yield _gauge(
            "appliance_drill_last_success",
            "1 when every instance of the last restore drill's sample came "
            "back intact, 0 when anything failed.",
            float(last.ok),
        )
        yield _gauge(
            "appliance_drill_last_failures",
            "Problems the last restore drill found.",
            last.failures,
        )
        yield _gauge(
            "appliance_drill_last_rate_bytes_per_second",
            "Bytes of instances the last restore drill restored and verified "
            "per second.",
            last.rate,
        )

    def _restore(self) -> Iterator[Metric]:
        folder = self.config.restore_folder
        yield _gauge(
            "appliance_restore_pending",
            "1 while a restore's data phase is still to finish (the service "
            "restores in the background).",
            float(progress.is_pending(folder)),
        )
        snapshot = progress.read(folder)
        if snapshot is None:
            return
        yield _by_label(
            "appliance_restore_state",
            "1 for the state of the last restore (its catalog or data phase).",
            "state",
            {state: float(snapshot.state == state) for state in RESTORE_STATES},
        )
        yield _gauge(
            "appliance_restore_bytes",
            "Bytes the restore's data phase has to bring back.",
            snapshot.bytes,
        )
        yield _gauge(
            "appliance_restore_done_bytes",
            "Bytes the restore's data phase has brought back.",
            snapshot.bytes_done,
        )
        yield _gauge(
            "appliance_restore_rate_bytes_per_second",
            "Bytes per second the restore brought back over the last minute.",
            snapshot.rate,
        )
        left = snapshot.seconds_left
        if left is not None:
            yield _gauge(
                "appliance_restore_remaining_seconds",
                "Seconds the restore's data phase needs still, at its rate.",
                left,
            )


def _records(counts: dict[str, int]) -> Metric:
    return _by_label(
        "appliance_catalog_records",
        "Patients, studies, series and instances in the catalog.",
        "level",
        {level: counts[level] for level in LEVELS},
    )


def _tiers(
    config: Config, catalog: Catalog, counts: dict[str, int]
) -> Iterator[Metric]:
    yield _by_label(
        "appliance_tier_instance_bytes",
        "Bytes of the instances with a verified copy on the tier (offsite: "
        "the mirror).",
        "tier",
        {tier: counts.get(f"bytes.{tier}", 0) for tier in TIERS},
    )
    yield _by_label(
        "appliance_tier_pack_bytes",
        "Bytes of the packs recorded on the tier.",
        "tier",
        {tier: counts.get(f"packbytes.{tier}", 0) for tier in PACK_TIERS},
    )
    yield _by_label(
        "appliance_tier_studies",
        "Studies with every instance on the tier.",
        "tier",
        _STUDIES.of(catalog),
    )
    usages = {}
    for tier in jobs.WATERMARKED:
        try:
            usage = jobs.tier_usage(config, counts, tier)
        except OSError as exc:
            # Not made yet: the service makes every tier when it starts.
            logger.debug("metrics: no usage of the %s tier: %s", tier, exc)
            continue
        if usage is not None:
            usages[tier] = usage
    yield _by_label(
        "appliance_tier_used_bytes",
        "Bytes used on the tier, as its watermarks count them: the archive's "
        "own with capacity_bytes set, else the whole file system's.",
        "tier",
        {tier: usage.used for tier, usage in usages.items()},
    )
    yield _by_label(
        "appliance_tier_capacity_bytes",
        "Capacity the tier's watermarks refer to (capacity_bytes, else the "
        "file system's size without the blocks reserved for root).",
        "tier",
        {tier: usage.capacity for tier, usage in usages.items()},
    )
    yield _by_label(
        "appliance_tier_high_watermark_ratio",
        "Share of the capacity above which releases start.",
        "tier",
        {tier: usage.high / 100 for tier, usage in usages.items()},
    )
    yield _by_label(
        "appliance_tier_low_watermark_ratio",
        "Share of the capacity releases bring the tier down to.",
        "tier",
        {tier: usage.low / 100 for tier, usage in usages.items()},
    )


def _replication(catalog: Catalog) -> Iterator[Metric]:
    waiting = objectives.recovery_point(catalog)
    yield _gauge(
        "appliance_replication_queue_instances",
        "Instances waiting for the mirror.",
        waiting.instances,
    )
    yield _gauge(
        "appliance_replication_queue_bytes",
        "Bytes of the instances waiting for the mirror.",
        waiting.bytes,
    )
    yield _gauge(
        "appliance_replication_lag_seconds",
        "Age of the oldest instance not yet on the mirror (the recovery "
        "point); 0 when nothing waits.",
        waiting.recovery_point_age,
    )


def _operator_requests(catalog: Catalog) -> Metric:
    pending: dict[str, int] = {requests.LOAD_VOLUME: 0}
    for request in requests.open_requests(catalog):
        pending[request.kind] = pending.get(request.kind, 0) + 1
    return _by_label(
        "appliance_operator_requests_pending",
        "Open operator requests (load_volume: a shelved volume to load).",
        "kind",
        pending,
    )


def _prefetch(catalog: Catalog) -> Iterator[Metric]:
    counted = readiness.tally([plan for plan, _ in readiness.active_plans(catalog)])
    online, retrieved = readiness.hit_rate(catalog, time.time())
    yield _gauge(
        "appliance_prefetch_appointments",
        "Upcoming appointments in the last prefetch plan.",
        counted.appointments,
    )
    yield _gauge(
        "appliance_prefetch_appointments_ready",
        "Upcoming appointments whose priors are all online.",
        counted.ready,
    )
    yield _gauge(
        "appliance_prefetch_priors_late",
        "Priors not online by their appointment's deadline.",
        counted.late,
    )
    yield _gauge(
        "appliance_prefetch_priors_waiting",
        "Priors whose recall waits for a volume to be loaded.",
        counted.waiting,
    )
    yield _gauge(
        "appliance_prefetch_priors_retrieved",
        f"Priors retrieved after their appointment in the last "
        f"{readiness.HIT_RATE_DAYS} days.",
        retrieved,
    )
    yield _gauge(
        "appliance_prefetch_hit_ratio",
        f"Share of the priors retrieved in the last {readiness.HIT_RATE_DAYS} "
        "days that were online at their first retrieval (0 when none was).",
        online / retrieved if retrieved else 0.0,
    )


# Counting the packs of each tier reads every pack record (the catalog keeps
# no count per tier); the pass sizes it gives are rough anyway, so scrapes
# reuse a count for this many seconds rather than read them all each time.
_PACK_COUNT_AGE = 600.0
_pack_counts: dict[str, tuple[float, dict[str, int]]] = {}
_pack_counts_lock = threading.Lock()


def _recent_pack_counts(catalog: Catalog) -> dict[str, int]:
    key = str(catalog.path)
    with _pack_counts_lock:
        now = time.monotonic()
        counted = _pack_counts.get(key)
        if counted is None or now - counted[0] > _PACK_COUNT_AGE:
            counted = _pack_counts[key] = (now, copies.pack_counts(catalog))
        return counted[1]


def _scrub(
    config: Config, catalog: Catalog, counts: dict[str, int]
) -> Iterator[Metric]:
    saved = scrub_state.load(scrub_state.folder_of(config.data_dir))
    yield _gauge(
        "appliance_scrub_instances_without_good_copy",
        "Instances the scrub found with no good copy left on any tier: an "
        "alarm (appliance scrub report lists them).",
        len(saved.lost),
    )
    yield _by_label(
        "appliance_scrub_orphans",
        "Files and packs on the tier that no catalog entry names.",
        "tier",
        {tier: len(found) for tier, found in saved.orphans.items()},
    )
    if not saved.tiers:
        return
    sizes = scrub_state.pass_sizes(counts["instances"], _recent_pack_counts(catalog))
    tiers = {name: saved.tiers[name] for name in sorted(saved.tiers)}
    yield _by_label(
        "appliance_scrub_pass_checked",
        "Copies checked in the tier's pass under way.",
        "tier",
        {name: tier.pass_checked for name, tier in tiers.items()},
    )
    yield _by_label(
        "appliance_scrub_pass_progress_ratio",
        "Share of the tier's pass done (roughly, as appliance scrub status).",
        "tier",
        {
            name: min(1.0, tier.pass_checked / sizes[name]) if sizes.get(name) else 0
            for name, tier in tiers.items()
        },
    )
    yield _by_label(
        "appliance_scrub_last_full_pass_timestamp_seconds",
        "When the tier's last whole pass ended (Unix time; 0: never).",
        "tier",
        {name: tier.last_full_pass for name, tier in tiers.items()},
    )
    for field, what in (
        ("checked", "Copies the scrub checked"),
        ("bad", "Copies the scrub found missing or damaged"),
        ("repaired", "Copies the scrub rebuilt from another copy"),
    ):
        family = CounterMetricFamily(
            f"appliance_scrub_{field}", f"{what}, by tier.", labels=["tier"]
        )
        for name, tier in tiers.items():
            family.add_metric([name], getattr(tier, field))
        yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _by_label(
    name: str, documentation: str, label: str, values: dict[str, Any]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], float(value))
    return family
