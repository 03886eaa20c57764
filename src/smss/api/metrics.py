"""Prometheus metrics (implements :class:`smss.ports.Metrics`), one registry per app."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from smss.control.dispatcher import Served
from smss.inventory import KIND_RESOURCES, DeviceReport
from smss.ports import StartTimings

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
#: The parts of ``smss_request_part_seconds``, in the order ``request_split`` observes them.
REQUEST_PARTS = ("queue", "instance", "batch", "compute", "transfer")
_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PrometheusMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._counted: dict[tuple[str, str], Counter] = {}
        self._parts: dict[str, tuple[Histogram, ...]] = {}
        self.requests = Counter(
            "smss_requests", "Inference requests by outcome", ["function", "status"], registry=r
        )
        self.latency = Histogram(
            "smss_request_seconds",
            "End-to-end request latency",
            ["function"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cold_starts = Counter("smss_cold_starts", "Instance starts", ["function"], registry=r)
        self.request_part = Histogram(
            "smss_request_part_seconds",
            "Where answered requests' time went: queue (waiting for a slot), instance "
            "(sent to answered), which is batch (waiting in the instance for its batch) "
            "+ compute (predict) + transfer (the rest: frames both ways, scheduling)",
            ["function", "part"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.start_seconds = Histogram(
            "smss_start_seconds",
            "Instance starts, ask to ready, by the tier of readiness they began from",
            ["function", "tier"],
            buckets=_START_BUCKETS,
            registry=r,
        )
        self.start_phase = Histogram(
            "smss_start_phase_seconds",
            "Duration of each phase of an instance start",
            ["function", "phase"],
            buckets=_START_BUCKETS,
            registry=r,
        )
        self.instance_count = Gauge("smss_instances", "Instances by state", ["function", "state"], registry=r)
        self.queue = Gauge("smss_queue_length", "Requests waiting for an instance", ["function"], registry=r)
        self.store = Gauge(
            "smss_weight_store",
            "Node weight store: entries, bytes, budget_bytes, hits, misses, evictions",
            ["node", "field"],
            registry=r,
        )
        device_labels = ["node", "kind", "index", "resource"]
        self.device_capacity = Gauge(
            "smss_device_capacity",
            "What placement may allocate on a device (cores, MiB, GPUs), after the platform's reserve",
            device_labels,
            registry=r,
        )
        self.device_allocated = Gauge(
            "smss_device_allocated",
            "What is allocated on a device (cores, MiB, GPUs)",
            device_labels,
            registry=r,
        )

    def request_done(self, function: str, status: str, seconds: float) -> None:
        counted = self._counted.get((function, status))
        if counted is None:
            counted = self._counted[function, status] = self.requests.labels(function, status)
        counted.inc()
        self._parts_of(function)[0].observe(seconds)

    def _parts_of(self, function: str) -> tuple[Histogram, ...]:
        """The request histograms of ``function`` (its latency, then each part), looked
        up once: ``labels`` takes a lock and builds a key on every call."""
        parts = self._parts.get(function)
        if parts is None:
            split = (self.request_part.labels(function, part) for part in REQUEST_PARTS)
            parts = self._parts[function] = (self.latency.labels(function), *split)
        return parts

    def request_split(self, function: str, served: Served) -> None:
        """Where an answered request's time went: waiting for a slot, and on the
        instance, split into batch, compute and transfer (the rest of
        ``smss_request_seconds`` is HTTP and codec in the gateway)."""
        _, queue, instance, batch, compute, transfer = self._parts_of(function)
        queue.observe(served.queued_s)
        instance.observe(served.instance_s)
        batch.observe(served.batch_s)
        compute.observe(served.compute_s)
        transfer.observe(served.transfer_s)

    def cold_start(self, function: str, timings: StartTimings) -> None:
        self.cold_starts.labels(function).inc()
        for phase, ms in (*timings.phases.items(), ("total", timings.total_ms)):
            self.start_phase.labels(function, phase).observe(ms / 1000)
        self.start_seconds.labels(function, timings.tier).observe(timings.total_ms / 1000)

    def instances(self, function: str, state: str, count: int) -> None:
        self.instance_count.labels(function, state).set(count)

    def queue_length(self, function: str, length: int) -> None:
        self.queue.labels(function).set(length)

    def forget(self, function: str) -> None:
        for state in ("ready", "starting"):
            self.instance_count.labels(function, state).set(0)
        self.queue.labels(function).set(0)

    def render(
        self,
        weight_cache: Mapping[str, Mapping[str, object]] | None = None,
        devices: Sequence[DeviceReport] = (),
    ) -> bytes:
        """The exposition text, the node gauges first set from what was measured at this scrape."""
        for node, stats in (weight_cache or {}).items():
            for key, value in stats.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.store.labels(node, key).set(value)
        self.devices(devices)
        return generate_latest(self.registry)

    def devices(self, devices: Sequence[DeviceReport]) -> None:
        """Capacity and allocation of each device, per resource of its kind (a device gone
        since the last scrape is gone from the gauges too)."""
        self.device_capacity.clear()
        self.device_allocated.clear()
        for d in devices:
            for resource in KIND_RESOURCES[d.kind]:
                labels = (d.node, d.kind, str(d.index), resource)
                self.device_capacity.labels(*labels).set(d.capacity.get(resource))
                self.device_allocated.labels(*labels).set(d.allocated.get(resource))
