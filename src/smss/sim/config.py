"""The settings of one simulation (:func:`smss.sim.simulator.simulate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from smss.control.autoscaler import AutoscalerConfig
from smss.control.cost import PriceTable
from smss.control.placement import ClusterState
from smss.control.tiered import LatencyObjective
from smss.control.tiers import TierProfile
from smss.errors import InvalidSpec
from smss.spec import Resources, Scaling


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulation. Every function of the trace gets the same instance
    size and scaling settings (the trace's functions are synthetic)."""

    policy: str = "tiered"
    #: TTL of ``fixed`` without seconds, and the fallback of ``hybrid``.
    default_ttl_s: float = 600.0
    memory_mb: int = 512
    cpu: float = 1.0
    gpu: float = 0.0
    concurrency: int = 1
    #: None: the controller's default, max(1, 0.7 x concurrency).
    target_concurrency: float | None = None
    min_instances: int = 0
    max_instances: int = 1000
    #: What each tier holds and what a start from it takes (calibrated defaults).
    tiers: TierProfile = field(default_factory=TierProfile)
    #: Overrides of ``tiers``, as before tiers were modelled: every start from a
    #: template (with or without a spare) takes ``cold_start_ms``, and a start that
    #: builds the template ``first_start_ms`` (None: ``cold_start_ms`` too).
    cold_start_ms: float | None = None
    first_start_ms: float | None = None
    #: The latency objective the tiered policy keeps (and the oracle is held to).
    latency_objective_ms: float = 10.0
    latency_percentile: float = 99.0
    tick_s: float = 1.0
    seed: int = 0
    #: Replay K times faster (trace times, durations and the policy's windows / K).
    speedup: float = 1.0
    #: The functions' own keep-alive (``Scaling.keep_alive_s``): overrides the policy.
    keep_alive_s: float | None = None
    #: A cluster of ``nodes`` nodes of ``cpus_per_node`` cores and ``memory_per_node_mb``
    #: each; None: one node that nothing fills (the figures of earlier runs).
    nodes: int | None = None
    cpus_per_node: float = 2.0
    memory_per_node_mb: int = 4096
    #: A request still queued after this long is dropped (``timed_out``), as the live
    #: platform answers 503 at its deadline; None: requests wait as long as it takes.
    request_timeout_s: float | None = None
    prices: PriceTable = field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        if self.memory_mb <= 0 or not self.cpu > 0 or not self.gpu >= 0:
            raise InvalidSpec("need memory_mb > 0, cpu > 0 and gpu >= 0")
        if not 1 <= self.concurrency <= 4096:
            raise InvalidSpec(f"concurrency must be 1-4096, got {self.concurrency}")
        if self.cold_start_ms is not None and not (
            math.isfinite(self.cold_start_ms) and self.cold_start_ms >= 0
        ):
            raise InvalidSpec(f"cold_start_ms must be >= 0, got {self.cold_start_ms}")
        if self.first_start_ms is not None and not (
            math.isfinite(self.first_start_ms) and self.first_start_ms >= 0
        ):
            raise InvalidSpec(f"first_start_ms must be >= 0, got {self.first_start_ms}")
        if not (math.isfinite(self.tick_s) and self.tick_s > 0):
            raise InvalidSpec(f"tick_s must be > 0, got {self.tick_s}")
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise InvalidSpec(f"speedup must be > 0, got {self.speedup}")
        if self.nodes is not None and not (
            self.nodes >= 1 and self.cpus_per_node > 0 and self.memory_per_node_mb > 0
        ):
            raise InvalidSpec("need nodes >= 1, cpus_per_node > 0 and memory_per_node_mb > 0")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise InvalidSpec(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.keep_alive_s is not None and not self.keep_alive_s >= 0:
            raise InvalidSpec(f"keep_alive_s must be >= 0, got {self.keep_alive_s}")
        self.autoscaler_config()  # validates the scaling bounds
        self.objective()

    def objective(self) -> LatencyObjective:
        return LatencyObjective(self.latency_objective_ms, self.latency_percentile)

    def profile(self) -> TierProfile:
        """``tiers`` with the ``cold_start_ms`` / ``first_start_ms`` overrides applied."""
        tiers = self.tiers
        if self.cold_start_ms is not None:
            tiers = replace(tiers, standby_ms=self.cold_start_ms, fork_ms=self.cold_start_ms)
        first = self.first_start_ms if self.first_start_ms is not None else self.cold_start_ms
        if first is not None:
            tiers = replace(tiers, resident_ms=first, cold_ms=first, no_runtime_ms=first)
        return tiers

    def autoscaler_config(self) -> AutoscalerConfig:
        target = self.target_concurrency or max(1.0, 0.7 * self.concurrency)
        return AutoscalerConfig(
            target_concurrency=target, min_instances=self.min_instances, max_instances=self.max_instances
        )

    @property
    def resources(self) -> Resources:
        return Resources(cpu=self.cpu, memory_mb=self.memory_mb, gpu=self.gpu)

    @property
    def scaling(self) -> Scaling:
        """Every function's scaling settings (its spec's, in the live platform)."""
        return Scaling(
            min_instances=self.min_instances,
            max_instances=self.max_instances,
            concurrency=self.concurrency,
            target_concurrency=self.target_concurrency,
            keep_alive_s=self.keep_alive_s,
        )

    def cluster(self) -> ClusterState:
        if self.nodes is None:
            return ClusterState.unbounded()
        return ClusterState.uniform(self.nodes, self.cpus_per_node, self.memory_per_node_mb)
