"""Prometheus metrics of the sidecar: per-app registry (no globals), tier gauges read at scrape."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_GAUGES = {"entries": "Entries held", "bytes": "Payload bytes held", "capacity_bytes": "Capacity in bytes",
           "used_bytes": "Bytes allocated (entries, reservations, quarantine)",
           "leases": "Live reader leases", "pending_writes": "Writes queued for disk",
           "quarantined_bytes": "Reservations kept from reuse while their writer process lives",
           "queued_bytes": "Bytes of puts queued for the disk writer (copies host could not take)",
           "max_queued_bytes": "Bound on queued_bytes (then 503)"}
_COUNTERS = {"hits": "Lookups served by the tier", "misses": "Lookups the tier could not serve",
             "evictions": "Entries evicted", "corrupt": "Entries dropped for failing validation",
             "write_backs": "Entries written back to disk on host eviction",
             "evicted_bytes": "Bytes evicted", "no_space": "Puts answered no-space (503)",
             "persist_errors": "Entries whose write to disk failed (kept in host, not persisted)",
             "write_errors": "Disk puts failed by an LMDB error", "too_large": "Puts over the tier's capacity",
             "promotions": "Entries copied up from disk on a read",
             "served_in_place": "Reads served from disk in place (no room in host)",
             "queue_full": "Puts refused (503) because the disk writer's queue was full"}
_HTTP = {"refused": "Connections refused with 503 at the connection cap",
         "evicted_idle": "Idle connections closed to make room at the connection cap",
         "header_timeouts": "Connections closed for not sending a request head in time",
         "write_timeouts": "Responses aborted because the reader did not read in time"}


_NOT_TIERS = ("claims", "events")
"""Sections of ``store.stats()`` that are not tiers."""


class _TierCollector:
    """Turns ``store.stats()`` into ``mmcache_tier_*`` series labelled by tier at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = {tier: values for tier, values in self._stats().items() if tier not in _NOT_TIERS}
        for name, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"mmcache_tier_{name}", doc, labels=["tier"])
            for tier, values in stats.items():
                if name in values:
                    g.add_metric([tier], values[name])
            yield g
        for name, doc in _COUNTERS.items():
            c = CounterMetricFamily(f"mmcache_tier_{name}", doc, labels=["tier"])
            for tier, values in stats.items():
                if name in values:
                    c.add_metric([tier], values[name])
            yield c


class _HttpCollector:
    """``mmcache_http_*_total`` from the app's ``HttpCounters`` (what the HTTP bounds did)."""

    def __init__(self, counters: Callable[[], dict]):
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        values = self._counters()
        for name, doc in _HTTP.items():
            c = CounterMetricFamily(f"mmcache_http_{name}", doc)
            c.add_metric([], values.get(name, 0))
            yield c


class Metrics:
    """One per app: the registry plus the request histogram the middleware records into."""

    def __init__(self, stats: Callable[[], dict], http: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(_TierCollector(stats))
        if http is not None:
            self.registry.register(_HttpCollector(http))
        self.request_seconds = Histogram(
            "mmcache_http_request_seconds", "HTTP request latency by route and status",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
