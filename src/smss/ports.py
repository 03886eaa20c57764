"""The seams of SMSS: a Protocol for every side effect.

Decisions in ``smss.control`` and ``smss.workflow`` reach the world only
through these interfaces, so the same objects run in the server, in the
simulator (virtual clock, simulated instances) and in unit tests (fakes from
``smss.testing``). Implementations:

========================  =====================================  ==============================
port                      production                             later / tests
========================  =====================================  ==============================
Clock                     ``SystemClock`` (monotonic)            ``testing.FakeClock``
RegistryStore             ``store.sqlite.SqliteRegistry``        PostgreSQL; ``testing.MemoryRegistry``
ClusterBackend            ``cluster.local.LocalBackend``         ``cluster.ray``; ``testing.FakeBackend``
InstanceChannel           ``node.channel.UnixChannel``           TCP; ``testing.FakeChannel``
Metrics                   ``api.metrics.PrometheusMetrics``      ``testing.NullMetrics``
========================  =====================================  ==============================
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np

from smss.spec import FunctionSpec

Tensors = Mapping[str, np.ndarray]


class Clock(Protocol):
    """Time for decisions. ``monotonic`` orders leases and timeouts; ``time``
    (wall clock) is only for humans reading logs and reports."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


# ---------------------------------------------------------------- registry


class FunctionRecord(msgspec.Struct, frozen=True):
    """A deployed function as the registry stores it. ``artifact_dir`` holds the
    code file and weights, inside the platform's data directory."""

    spec: FunctionSpec
    artifact_dir: str
    deployed_at: float
    generation: int = 1


class RegistryStore(Protocol):
    """Durable registry of functions. Writes are committed before they return."""

    def put_function(self, record: FunctionRecord) -> FunctionRecord: ...

    def get_function(self, name: str) -> FunctionRecord | None: ...

    def list_functions(self) -> list[FunctionRecord]: ...

    def delete_function(self, name: str) -> bool: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- instances


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class InstanceInfo(msgspec.Struct, frozen=True):
    """What the backend knows of one instance. ``address`` is where its data
    channel listens (``unix:/path`` on the local backend)."""

    id: str
    function: str
    node: str
    address: str
    pid: int
    started_at: float


class StartTimings(msgspec.Struct, frozen=True):
    """Phases of one instance start, in milliseconds, so a slow cold start can be explained.

    ``phases`` names each step that ran (``weights``: read into the weight store
    on a miss; ``zygote``: start of a runtime zygote; ``prepare``: fork of the
    model's template, attach and build; ``warm``: its first call; ``fork``: fork
    of the instance). ``spawn_ms`` / ``load_ms`` summarise: process creation and
    model loading."""

    spawn_ms: float
    load_ms: float
    total_ms: float
    phases: dict[str, float] = msgspec.field(default_factory=dict)


class StartedInstance(msgspec.Struct, frozen=True):
    info: InstanceInfo
    timings: StartTimings


ExitCallback = Callable[[str, int | None], None]
"""Called with (instance id, exit code or None when killed by a signal)."""


class ClusterBackend(Protocol):
    """Starts and stops instances on nodes. The local backend forks processes on
    this machine; a Ray backend asks node agents running as actors.

    ``start_instance`` returns once the instance is ready to serve, or raises
    :class:`smss.errors.StartFailed` with the reason (a load error, a timeout).
    ``on_exit`` fires once per instance that exits for any reason other than
    ``stop_instance``; it may be called from the event loop only.
    """

    async def start_instance(self, spec: FunctionSpec, artifact_dir: Path) -> StartedInstance: ...

    async def stop_instance(self, instance_id: str, grace_s: float) -> None: ...

    def set_exit_callback(self, callback: ExitCallback) -> None: ...

    def nodes(self) -> list[str]: ...

    def weight_cache(self) -> dict[str, object]:
        """What each node's weight store holds: entries, bytes, budget, hits, misses, evictions, models."""
        ...

    def evict_weights(self, function: str) -> bool:
        """Drop a function's weights from the stores where no instance uses them."""
        ...

    async def close(self) -> None: ...


class InstanceChannel(Protocol):
    """The data plane to one instance: tensors in, tensors out, no re-encoding.

    ``infer`` raises :class:`smss.errors.InstanceLost` when the instance dies
    with the request in flight, :class:`smss.errors.ModelError` when predict()
    raised, :class:`smss.errors.InvalidInput` when the model rejected the input.
    """

    async def infer(self, inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]: ...

    @property
    def closed(self) -> bool: ...

    async def close(self) -> None: ...


class ChannelFactory(Protocol):
    async def __call__(self, info: InstanceInfo) -> InstanceChannel: ...


# ---------------------------------------------------------------- metrics


class Metrics(Protocol):
    """What the platform reports. The Prometheus implementation lives in ``api``."""

    def request_done(self, function: str, status: str, seconds: float) -> None: ...

    def cold_start(self, function: str, timings: StartTimings) -> None: ...

    def instances(self, function: str, state: str, count: int) -> None: ...

    def queue_length(self, function: str, length: int) -> None: ...

    def forget(self, function: str) -> None: ...
