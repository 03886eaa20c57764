"""The seams of SMSS: a Protocol for every side effect.

Decisions in ``smss.control`` and ``smss.workflow`` reach the world only
through these interfaces, so the same objects run in the server, in the
simulator (virtual clock, simulated instances) and in unit tests (fakes from
``smss.testing``). Implementations:

========================  =====================================  ==============================
port                      production                             later / tests
========================  =====================================  ==============================
Clock                     ``SystemClock`` (monotonic)            ``testing.FakeClock``
RegistryStore             ``store.sqlite.SqliteRegistry``        ``PgRegistry``; ``testing.MemoryRegistry``
WorkflowStore             ``store.sqlite_workflows``             ``PgWorkflows`` (``store.postgres``)
EventLog                  ``store.sqlite_log.SqliteEventLog``    ``PgEventLog``; ``testing.MemoryEventLog``
BlobStore                 (blobs in the log's database)          ``store.blob_dir.BlobDirectory``
ClusterBackend            ``node.agent.NodeAgent``               ``cluster.ray``; ``testing.FakeBackend``
TierBackend               ``node.agent.NodeAgent``               ``testing.FakeBackend``
InstanceChannel           ``node.channel.UnixChannel``           TCP; ``testing.FakeChannel``
Metrics                   ``api.metrics.PrometheusMetrics``      ``testing.NullMetrics``
========================  =====================================  ==============================
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np

from smss.inventory import Allocation, NodeInventory, Tier
from smss.spec import FunctionSpec
from smss.workflow.events import (
    Event,
    Record,
    RunStarted,
    RunSummary,
    SessionState,
    StageCompleted,
    StateWrite,
)
from smss.workflow.spec import WorkflowSpec

Tensors = Mapping[str, np.ndarray]


class Clock(Protocol):
    """Time for decisions and for waiting. ``monotonic`` orders leases and timeouts;
    ``time`` (wall clock) is only for humans reading logs and reports. ``sleep`` and
    ``timeout`` wait on the same time as ``monotonic``, so code that waits through
    them runs on a virtual clock in tests (``testing.FakeClock(autojump=True)``)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        """Like :func:`asyncio.timeout`: the block is cancelled after ``seconds`` and
        :class:`TimeoutError` raised from it."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


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

    def next_generation(self, name: str) -> int:
        """The generation the next ``put_function`` of ``name`` will record (never reused)."""
        ...

    def get_function(self, name: str) -> FunctionRecord | None: ...

    def list_functions(self) -> list[FunctionRecord]: ...

    def delete_function(self, name: str) -> bool: ...

    def close(self) -> None: ...


class WorkflowStore(Protocol):
    """Durable workflow definitions, by name. Writes are committed before they return."""

    def put(self, spec: WorkflowSpec) -> None: ...

    def get(self, name: str) -> WorkflowSpec | None: ...

    def list(self) -> list[WorkflowSpec]: ...

    def delete(self, name: str) -> bool: ...

    def close(self) -> None: ...


class BlobStore(Protocol):
    """Content-addressed blobs outside the log's database (``--blob-dir``): ``ref`` is
    the sha256 hex of the bytes. ``put`` returns once every blob is durable; storing
    one twice is a no-op. Whether a blob belongs to the log is the log's to say (its
    references); the store only keeps bytes."""

    def put(self, blobs: Sequence[tuple[str, bytes]]) -> None: ...

    def get(self, ref: str) -> bytes | None:
        """The bytes stored under ``ref`` (unchecked), or None."""
        ...

    def delete(self, refs: Sequence[str]) -> int:
        """Remove these blobs (those present); how many were removed."""
        ...


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

    @property
    def tier(self) -> str:
        """The tier of readiness the start began from, from the phases it ran:
        ``no_runtime`` (the runtime's zygote had to start), ``cold`` (weights read
        from disk), ``resident`` (weights in the store, a template was built),
        ``standby`` (a fork of a resident template), ``process`` (a fresh
        interpreter, the exec mode)."""
        phases = self.phases
        if "zygote" in phases:
            return "no_runtime"
        if "weights" in phases:
            return "cold"
        if "prepare" in phases:
            return "resident"
        if "fork" in phases:
            return "standby"
        return "process"


class StartedInstance(msgspec.Struct, frozen=True):
    info: InstanceInfo
    timings: StartTimings


class RunningInstance(msgspec.Struct, frozen=True):
    """An instance a backend found running when it started (one a killed platform
    left, see ``ClusterBackend.recover``), and the artifacts it was started from."""

    info: InstanceInfo
    artifact_dir: str


ExitCallback = Callable[[str, int | None], None]
"""Called with (instance id, exit code or None when killed by a signal)."""


class ClusterBackend(Protocol):
    """Starts and stops instances on nodes. The local backend forks processes on
    this machine; a Ray backend asks node agents running as actors.

    ``start_instance`` returns once the instance is ready to serve, or raises
    :class:`smss.errors.StartFailed` with the reason (a load error, a timeout);
    any other exception it raises is a failed start too.
    ``on_exit`` fires once per instance that exits for any reason other than
    ``stop_instance``; it may be called from the event loop only.
    """

    async def start_instance(
        self, spec: FunctionSpec, artifact_dir: Path, where: Allocation | None = None
    ) -> StartedInstance:
        """``where``: the placement's allocation (node, CPU share, CUDA device and
        share); None lets the backend choose (its first node, CPU only)."""
        ...

    async def stop_instance(self, instance_id: str, grace_s: float) -> None: ...

    async def recover(self) -> list[RunningInstance]:
        """The instances still running from an earlier platform process (killed), now
        watched by this backend as if it had started them: each is then adopted or
        stopped by the caller. Called once, before any start."""
        ...

    def set_exit_callback(self, callback: ExitCallback) -> None: ...

    def nodes(self) -> list[str]: ...

    def inventory(self) -> list[NodeInventory]:
        """Each node's devices and their capacity, as its agent discovered them."""
        ...

    def resident(self) -> list[Allocation]:
        """What each node keeps resident for functions whether or not an instance
        runs (weight segments, templates, spares), as allocations of host memory."""
        ...

    def weight_cache(self) -> dict[str, object]:
        """What each node's weight store holds: entries, bytes, budget, hits, misses, evictions, models."""
        ...

    def evict_weights(self, function: str) -> bool:
        """Drop a function's weights from the stores where no instance uses them."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Reply:
    """An instance's answer and where its time went there: ``queue_s`` waiting for
    its batch to start, ``compute_s`` in ``predict`` (the batch's). The rest of the
    time the gateway waited is transfer: frames both ways, scheduling, decoding."""

    outputs: dict[str, np.ndarray]
    queue_s: float = 0.0
    compute_s: float = 0.0


class ResidentReading(msgspec.Struct, frozen=True):
    """What one thing kept resident holds, as last measured: ``key`` names it
    (``template:KEY``, ``spare:KEY:PID``, ``weights:KEY``, ``zygote:RUNTIME``,
    ``platform:PID``), ``owner`` is a function's name, ``runtime:NAME`` or ``platform``."""

    key: str
    owner: str
    mb: float


class TierBackend(Protocol):
    """The tiers of readiness on the nodes (:mod:`smss.control.tiers`): what each
    function keeps resident besides instances, and stepping it up and down. A backend
    that has no such control does not implement it (the controller then leaves what is
    resident to the backend). Steps apply to a function with no instance; the node
    refuses to release what an instance of it uses."""

    def holdings(self) -> dict[str, Tier]:
        """What each function holds of its own: ``standby`` (a template), ``resident``
        (weights in a store); functions holding neither are left out."""
        ...

    def runtimes(self) -> list[str]:
        """The runtimes whose zygote runs."""
        ...

    async def step(self, spec: FunctionSpec, artifact_dir: Path, to: Tier) -> None:
        """Build ``spec``'s function up to ``to`` (``standby``: its template, weights
        read first) or release what it holds above ``to``; ``cold`` and ``no_runtime``
        release alike (the zygote is its runtime's: :meth:`stop_runtime`). A failed
        build raises :class:`smss.errors.StartFailed`."""
        ...

    async def set_spares(self, function: str, spares: int) -> None:
        """How many rehearsed spares the function's template keeps (and a template
        built for it later)."""
        ...

    async def stop_runtime(self, runtime: str) -> bool:
        """Stop the runtime's zygote (no function uses it); True if one ran."""
        ...

    def readings(self) -> list[ResidentReading]:
        """What each node keeps resident, as last measured (PSS without the segments a
        process maps; segments by size), for the meter."""
        ...


class InstanceChannel(Protocol):
    """The data plane to one instance: tensors in, tensors out, no re-encoding.

    ``infer`` raises :class:`smss.errors.InstanceLost` when the instance dies
    with the request in flight, :class:`smss.errors.ModelError` when predict()
    raised, :class:`smss.errors.InvalidInput` when the model rejected the input.
    """

    async def infer(self, inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]: ...

    async def send(self, inputs: Tensors, outputs: tuple[str, ...]) -> asyncio.Future[Reply]:
        """Send one request (waiting, for a bounded time, until the instance takes
        what was sent before it) and return the future of its answer, settled as
        ``infer`` returns (with the instance's timings) or raises. The future
        settles when the instance answers or is lost, whether or not anyone still
        waits for it, so a caller that stops
        waiting can still tell when the instance is done with the request.
        Cancelled before it returns: nothing was sent. Raises :class:`InstanceLost`
        when the instance is gone or took nothing for that bounded time."""
        ...

    async def ping(self) -> None:
        """Return once the instance answers a ping (its I/O is alive); raises
        :class:`InstanceLost` when the connection is gone. Never answered by a
        stopped process: the caller bounds the wait."""
        ...

    @property
    def closed(self) -> bool: ...

    async def close(self) -> None: ...


class ChannelFactory(Protocol):
    async def __call__(self, info: InstanceInfo) -> InstanceChannel: ...


# ---------------------------------------------------------------- functions, as workflows see them


class CallResult(msgspec.Struct, frozen=True):
    outputs: dict[str, np.ndarray]
    instance: str = ""
    node: str = ""


class FunctionCaller(Protocol):
    """How the workflow engine reaches functions: through the same dispatchers
    (queue, router, retries) as inference requests. A failure raises the
    SmssError of the call, with ``instance`` / ``node`` attributes when known."""

    def spec_of(self, function: str) -> FunctionSpec: ...

    async def call(
        self, function: str, inputs: Tensors, outputs: tuple[str, ...], timeout_s: float
    ) -> CallResult: ...

    def prewarm(self, function: str) -> None:
        """Start an instance of ``function`` now if it has none (a next stage is coming)."""
        ...


# ---------------------------------------------------------------- workflow log


class AppendResult(msgspec.Struct, frozen=True):
    """``seqs[i]`` is the sequence number of event i, or 0 when the log dropped it
    (a second StageCompleted for a stage). ``state_conflict`` is True when the
    accompanying state write did not match the stored state, ``void`` when a
    completion the append ``requires`` is not the one recorded, ``fenced`` when a
    ``StageCompleted`` or ``StageFailed`` in it is of an attempt older than the
    stage's latest ``StageStarted`` (fencing: the stage was reassigned, so the stale
    attempt's result is rejected, whether or not the new attempt has finished): in
    each case nothing of the batch was written."""

    seqs: tuple[int, ...]
    state_conflict: bool = False
    void: bool = False
    #: A completion or failure in the batch came from a stale attempt of its stage (a
    #: later attempt had started: the stage was reassigned): nothing was written.
    fenced: bool = False

    @property
    def clean(self) -> bool:
        """Everything was written as asked: nothing refused, nothing dropped."""
        return not (self.state_conflict or self.void or self.fenced) and 0 not in self.seqs


class EventLog(Protocol):
    """The durable, append-only workflow log, its blobs and session state.

    Write-ahead: ``start_run`` and ``append`` return only after the events,
    their blobs and the optional state write are durable (one fsync shared by
    every append that arrived meanwhile: group commit). A storage failure
    raises :class:`smss.errors.StorageUnavailable` and leaves nothing
    acknowledged; an fsync failure is fatal to the writer (every later append
    fails too). Blobs are content-addressed: ``blobs`` maps sha256 hex of the
    bytes to the bytes, and storing one twice is a no-op.
    """

    def start_run(
        self, run_id: str, started: RunStarted, blobs: Mapping[str, bytes], *, lazy: bool = False
    ) -> Awaitable[tuple[str, bool]]:
        """Record a new run. With an idempotency key already used, nothing is
        written and the existing run's id is returned with ``False``. ``lazy``: as
        for :meth:`append`."""
        ...

    def append(
        self,
        run_id: str,
        events: Sequence[Event],
        *,
        blobs: Mapping[str, bytes] | None = None,
        state: StateWrite | None = None,
        requires: Sequence[StageCompleted] = (),
        lazy: bool = False,
    ) -> Awaitable[AppendResult]:
        """Append ``events`` (with their blobs and the optional conditional state
        write) as one all-or-nothing request. ``requires``: completions the events
        were computed from; unless each is exactly the completion recorded for its
        stage of this run, nothing is written and the result is ``void``. This lets
        the engine queue a stage's records before the records it depends on are
        durable: a dependency that never takes effect voids its dependents.
        ``lazy``: the caller is in no hurry (it will wait for a later append that is
        not lazy): the log may hold this one back, for a bounded time, to share that
        append's commit. It is acknowledged, as always, only once durable.

        Both writes may queue the request when called (the log's own order is the
        order of the calls) and answer through the awaitable; one that cannot be
        taken may raise at the call."""
        ...

    def read_run(self, run_id: str) -> list[Record]: ...

    def run_summary(self, run_id: str) -> RunSummary | None: ...

    def list_runs(
        self, status: str | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunSummary]: ...

    def unfinished_runs(self) -> list[str]: ...

    def claim_runs(self) -> list[str]:
        """The unfinished runs this process is to drive, oldest first: every one when it
        is the log's only writer (SQLite); with several (PostgreSQL), those it owns and
        those of engines that died (their heartbeat stopped), which it owns from now on
        (a run is driven by one live engine; the others' appends to it are refused)."""
        ...

    def get_blob(self, ref: str) -> bytes: ...

    def get_state(self, workflow: str, session: str) -> SessionState:
        """Version 0 with no tensors when the session has none yet."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters: appends, events, commits (one fsync each), dropped_completions, state_conflicts."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- metrics


class Metrics(Protocol):
    """What the platform reports. The Prometheus implementation lives in ``api``."""

    def request_done(self, function: str, status: str, seconds: float) -> None: ...

    def cold_start(self, function: str, timings: StartTimings) -> None: ...

    def instances(self, function: str, state: str, count: int) -> None: ...

    def queue_length(self, function: str, length: int) -> None: ...

    def forget(self, function: str) -> None: ...
