"""Prometheus metrics of one node process, in a registry of its own (never prometheus-client's global one).

Two kinds, by cost:

- counted as things happen (a counter increment, a histogram observation): instances and bytes received
  by calling AE, C-STORE refusals by status, series analysed by outcome, per-stage seconds of the
  pipeline, delivery failures by destination. These count what *this process* did since it started.
- read when scraped, from the tables every role shares (so they are right whichever process runs which
  role): associations open, jobs by kind and state, age of the oldest waiting job by kind, series by
  state, deliveries by destination and state, quarantined files, disk free, GPU memory.

Every name starts ``harmonode_``; README's "Operations" section says what each one means.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.web.space import DiskSpace
from storage.store import Store

log = logging.getLogger(__name__)

#: Pipeline stage seconds: from a key lookup (sub-millisecond) to a detector pass on CPU (minutes).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0)


class NodeMetrics:
    """The counters and histograms the node's services feed, and the registry ``/metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "harmonode_instances_received", "Instances stored from C-STORE, by calling AE.", ["calling_ae"], registry=r
        )
        self.bytes_received = Counter(
            "harmonode_bytes_received", "Dataset bytes of stored instances, by calling AE.", ["calling_ae"], registry=r
        )
        self.store_refusals = Counter(
            "harmonode_store_refusals", "C-STORE requests answered with a failure, by status.", ["status"], registry=r
        )
        self.series_analysed = Counter(
            "harmonode_series_analysed", "Series the pipeline finished, by outcome state.", ["state"], registry=r
        )
        self.stage_seconds = Histogram(
            "harmonode_stage_seconds", "Seconds per pipeline stage.", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.delivery_failures = Counter(
            "harmonode_delivery_failures",
            "Delivery attempts that failed, by destination.",
            ["destination"],
            registry=r,
        )
        self._per_ae: dict[str, tuple[Any, Any]] = {}

    def stored(self, calling_ae: str, nbytes: int) -> None:
        """Count one stored instance (the C-STORE hot path: two increments of cached children)."""
        children = self._per_ae.get(calling_ae)
        if children is None:
            children = (self.instances_received.labels(calling_ae), self.bytes_received.labels(calling_ae))
            self._per_ae[calling_ae] = children
        children[0].inc()
        children[1].inc(nbytes)

    def instances_stored(self) -> int:
        """Instances this process stored from C-STORE since it started, all calling AEs together."""
        return int(sum(child._value.get() for child, _ in self._per_ae.values()))  # noqa: SLF001

    def refused(self, status: int) -> None:
        """Count one refused C-STORE by its DICOM status."""
        self.store_refusals.labels(f"0x{status:04X}").inc()

    def series_done(self, state: str, timings: dict[str, float]) -> None:
        """Count one analysed series and observe the seconds of each of its stages."""
        self.series_analysed.labels(state or "unknown").inc()
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(float(seconds))

    def add_collector(self, collector: Collector) -> None:
        """Read ``collector`` at every scrape (the node's shared state)."""
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class StateCollector(Collector):
    """What the shared tables and the disk say now, read at scrape time."""

    def __init__(
        self,
        store: Store,
        disk: DiskSpace,
        associations_open: Callable[[], int | None],
        listener_connections: Callable[[], dict[int, int] | None] = lambda: None,
    ) -> None:
        self.store = store
        self.disk = disk
        self.associations_open = associations_open
        self.listener_connections = listener_connections  # the parent of [node] listeners > 1 knows them

    def describe(self) -> list[Metric]:
        return []  # read only when collected: registering must not query the tables

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must answer even when a table is busy or gone
            log.exception("metrics: reading the node's state failed")

    def _collect(self) -> Iterator[Metric]:
        now = time.time()
        open_now = self.associations_open()
        if open_now is not None:
            yield GaugeMetricFamily("harmonode_associations_open", "DICOM associations open now.", value=open_now)
        handed = self.listener_connections()
        if handed is not None:
            family = GaugeMetricFamily(
                "harmonode_listener_connections",
                "Connections each extra listener process serves now, as the accepting process counts them.",
                labels=["listener"],
            )
            for slot, n in sorted(handed.items()):
                family.add_metric([str(slot + 1)], n)
            yield family
        jobs = GaugeMetricFamily("harmonode_queue_jobs", "Jobs in the durable queue.", labels=["kind", "state"])
        ages = GaugeMetricFamily(
            "harmonode_queue_oldest_age_seconds", "Age of the oldest job waiting or running, by kind.", labels=["kind"]
        )
        with self.store.queue.lock:
            rows = self.store.queue.db.conn.execute(
                "SELECT kind, state, COUNT(*), MIN(created_at) FROM jobs GROUP BY kind, state"
            ).fetchall()
        oldest: dict[str, float] = {}
        for kind, state, n, first in rows:
            jobs.add_metric([kind, state], n)
            if state in ("ready", "running"):
                oldest[kind] = min(oldest.get(kind, now), first)
        for kind, first in oldest.items():
            ages.add_metric([kind], max(0.0, now - first))
        yield jobs
        yield ages
        series = GaugeMetricFamily("harmonode_series", "Series in the index, by state.", labels=["state"])
        for row in self.store.index.query("SELECT state, COUNT(*) n FROM series GROUP BY state"):
            series.add_metric([row["state"] or ""], row["n"])
        yield series
        deliveries = GaugeMetricFamily(
            "harmonode_deliveries", "Result objects by destination and delivery state.", labels=["destination", "state"]
        )
        for row in self.store.index.query(
            "SELECT destination, state, COUNT(*) n FROM deliveries GROUP BY destination, state"
        ):
            deliveries.add_metric([row["destination"], row["state"]], row["n"])
        yield deliveries
        yield GaugeMetricFamily(
            "harmonode_quarantined_files", "Refused inputs kept in quarantine.", value=_count(self.store)
        )
        yield GaugeMetricFamily(
            "harmonode_disk_free_bytes", "Bytes free to the node on the store's disk.", value=self.disk.free_bytes()
        )
        yield GaugeMetricFamily(
            "harmonode_store_accepting",
            "1 when C-STORE is accepted, 0 under disk back-pressure.",
            value=1 if self.disk.accepting() else 0,
        )
        yield from _gpu_memory()


def _count(store: Store) -> int:
    return sum(1 for _ in store.files.quarantine_dir.glob("*.json"))


def _gpu_memory() -> Iterator[Metric]:
    """GPU memory allocated by this process's torch, when torch is loaded and CUDA is present."""
    torch = sys.modules.get("torch")  # never import torch for a scrape (seconds, hundreds of MB)
    if torch is None or not torch.cuda.is_available():
        return
    family = GaugeMetricFamily("harmonode_gpu_memory_bytes", "GPU memory allocated by torch.", labels=["device"])
    for i in range(torch.cuda.device_count()):
        family.add_metric([str(i)], torch.cuda.memory_allocated(i))
    yield family
