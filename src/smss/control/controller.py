"""The controller: reconciles desired and running instances of every function.

Each tick (or at once when a request finds no free instance) it builds the
cluster's state (:class:`~smss.control.placement.ClusterState`: every node's
devices, every instance placed or starting, everything kept resident), asks
:func:`~smss.control.reconcile.reconcile` for each function's
:class:`~smss.control.reconcile.Commands` and applies them through the
:class:`ClusterBackend`. The simulator applies the same commands to its virtual
cluster. Starts and stops run as tasks in the controller's own task group, so none
outlives it. Guarantees:

* an instance is placed before it starts and never over-commits a device; a start
  that fits nowhere now waits (its requests stay queued until their deadline) and
  is tried again each tick; one that can never fit fails its requests with 503
  naming the resource;
* a failed start, whatever the reason (a load error, a weights file gone, a full
  ``/dev/shm``, a template that crashed), is that function's failure: it is retried
  with exponential back-off (0.5 s doubling to 30 s) and waiting requests get 503
  naming the model; after ``max_start_failures`` in a row no more starts are tried
  (the function is *failed*: its requests get 503 naming the last failure) until
  it is redeployed or loaded again (:meth:`Controller.load`); no exception of a
  start, a stop or a reconcile ends the controller;
* an instance that exits unexpectedly is dropped at once (its in-flight requests
  are retried by the dispatcher) and replaced on the next demand;
* health checks (every ``health_interval_s``) replace an instance that hangs: one
  that does not answer a ping within ``ping_timeout_s`` (a stopped process), one
  holding a request past its deadline plus ``stall_grace_s`` (a predict that never
  returns), and one the dispatcher found lost (its connection ended or stopped
  taking requests). It is taken out of rotation, its process killed, and its
  requests fail with :class:`InstanceLost` (retried once elsewhere, or 503);
* ``close`` drains every instance within the grace period and stops them;
* on a restart (:meth:`Controller.restore`) the instances a killed platform left
  running are adopted into routing when their function is deployed from the same
  artifacts, up to its ``max_instances`` (:mod:`smss.control.adoption`); the others
  are stopped. An adoption counts as a start until its channel is connected, so no
  reconcile starts a duplicate meanwhile;
* on a cluster, gateways on other nodes route with dispatchers of their own and
  report their load (:meth:`Controller.report`, :mod:`smss.control.gateways`): every
  decision counts it (demand, queued requests, each instance's load and idle time,
  arrivals for the keep-alive policy, busy time for the meter), and an instance a
  gateway found lost is health-checked at once. Listeners (:meth:`Controller.subscribe`)
  are told whenever what gateways route to may have changed.

Waiting goes through the :class:`Clock` port, so tests run the loop on a virtual
clock (``FakeClock(autojump=True)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smss import logcontext
from smss.config import ServingSettings
from smss.control import adoption
from smss.control.autoscaler import Autoscaler, AutoscalerConfig
from smss.control.dispatcher import DispatchHooks, FunctionDispatcher, Slot
from smss.control.gateways import Changes, GatewayLoads, GatewayReport
from smss.control.keepalive import KeepAlivePolicy
from smss.control.metering import Meter
from smss.control.placement import (
    ClusterState,
    Locality,
    NoFit,
    Placement,
    host_part,
    need_of,
)
from smss.control.reconcile import Commands, Observed, Policies, reconcile
from smss.control.router import Proximity
from smss.control.scaling import InstanceView
from smss.control.tiering import TierKeeper
from smss.control.tiers import Tier
from smss.errors import Conflict, InstanceLost, InvalidSpec, NotFound, StartFailed, Unavailable
from smss.inventory import Allocation, Capacity, DeviceReport
from smss.ports import (
    ChannelFactory,
    Clock,
    ClusterBackend,
    FunctionRecord,
    InstanceChannel,
    InstanceInfo,
    Metrics,
    RunningInstance,
    TierBackend,
)
from smss.spec import FunctionSpec

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
#: Locality ranks of a node for a function: its template (and weights) there, its weights only.
TEMPLATE_RANK, WEIGHTS_RANK = 2, 1


@dataclass
class FunctionRuntime:
    record: FunctionRecord
    dispatcher: FunctionDispatcher
    autoscaler: Autoscaler
    failures: int = 0
    cold_starts: int = 0
    prewarms: int = 0
    start_estimate_s: float = 1.0
    stopping: set[str] = field(default_factory=set)
    #: Where each instance runs, by instance id (a start in progress by its start id).
    placed: dict[str, Allocation] = field(default_factory=dict)
    prewarmed_for: float = -math.inf
    #: Instances killed and replaced because they hung or were lost.
    replaced: int = 0
    #: Starts the last reconcile wanted that fit nowhere, and why.
    waiting_for_capacity: int = 0
    no_fit: NoFit | None = None

    @property
    def name(self) -> str:
        return self.record.spec.name

    def policies(self, keep_alive: KeepAlivePolicy) -> Policies:
        spec = self.record.spec
        return Policies(
            spec.scaling,
            need_of(spec.resources),
            self.autoscaler,
            keep_alive,
            self.start_estimate_s,
            self.weights,
        )

    @functools.cached_property
    def weights(self) -> Capacity:
        """The GPU memory of the model's one copy of its weights per GPU (a GPU function's)."""
        return _gpu_weights(self.record.spec, Path(self.record.artifact_dir))


def _gpu_weights(spec: FunctionSpec, artifact_dir: Path) -> Capacity:
    """What the one copy of a GPU function's weights takes on each GPU that serves it
    (the size of its weights file, rounded up to MiB; nothing for a CPU function)."""
    if not spec.resources.on_gpu or spec.weights is None:
        return Capacity()
    try:
        size = (artifact_dir / spec.weights).stat().st_size
    except OSError:
        return Capacity()  # its start fails, naming the file
    return Capacity(gpu_memory_mb=-(-size // (1 << 20)))


def autoscaler_for(record: FunctionRecord) -> Autoscaler:
    scaling = record.spec.scaling
    target = scaling.target_concurrency or max(1.0, 0.7 * scaling.concurrency)
    return Autoscaler(
        AutoscalerConfig(
            target_concurrency=target,
            min_instances=scaling.min_instances,
            max_instances=scaling.max_instances,
        )
    )


class Controller:
    def __init__(
        self,
        backend: ClusterBackend,
        channels: ChannelFactory,
        clock: Clock,
        settings: ServingSettings,
        metrics: Metrics,
        keep_alive: KeepAlivePolicy,
        meter: Meter | None = None,
        *,
        gateways: GatewayLoads | None = None,
        proximity: Callable[[], Proximity] | None = None,
        tiers: TierBackend | None = None,
    ) -> None:
        """``gateways``: the load reported by gateways elsewhere (a cluster), counted in
        every decision; ``proximity``: where this process routes from (a cluster), for
        its own dispatchers; ``tiers``: the backend's tier control, when it has one: the
        keep-alive policy's tier decisions are then applied (:mod:`smss.control.tiering`)
        and what is resident is metered."""
        self.meter = meter or Meter()
        self.gateways = gateways
        self._proximity = proximity
        self._listeners: list[Callable[[], None]] = []
        self._backend = backend
        self._channels = channels
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._keep_alive = keep_alive
        self._functions: dict[str, FunctionRuntime] = {}
        self._wake = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._start_ids = itertools.count(1)
        self._wakeups: set[asyncio.Task[None]] = set()
        self._tiers = None if tiers is None else TierKeeper(tiers, self.meter, self._spawn, clock.monotonic)
        backend.set_exit_callback(self._on_exit)

    # ------------------------------------------------------------ registry view

    def get(self, name: str) -> FunctionRuntime:
        runtime = self._functions.get(name)
        if runtime is None:
            raise NotFound(f"unknown model {name!r}")
        return runtime

    def functions(self) -> list[FunctionRuntime]:
        return list(self._functions.values())

    def check_fits(self, spec: FunctionSpec) -> None:
        """Refuse (:class:`InvalidSpec`, 400) a function that no node could ever hold."""
        never = ClusterState(self._backend.inventory()).never_fits(need_of(spec.resources))
        if never is not None:
            raise InvalidSpec(never.message(spec.name))

    def deploy(self, record: FunctionRecord) -> None:
        """Register or replace a function; instances of a replaced one are drained."""
        old = self._functions.get(record.spec.name)
        name = record.spec.name
        autoscaler = autoscaler_for(record)
        hooks = DispatchHooks(
            on_arrival=lambda: self._keep_alive.on_invocation(
                name, self._clock.monotonic(), dispatcher.demand
            ),
            on_demand_change=lambda demand: autoscaler.observe(
                self._clock.monotonic(), float(demand + sum(self._remote_demand(name)))
            ),
            on_start=lambda iid: self.meter.request_started(name, iid, self._clock.monotonic()),
            on_finish=lambda iid: self.meter.request_finished(name, iid, self._clock.monotonic()),
            # ``runtime`` is bound below, before the dispatcher can serve anything.
            on_lost=lambda slot, reason: self._replace(runtime, slot, reason),
        )
        dispatcher = FunctionDispatcher(
            record.spec, self._clock, self._settings, self.wake, hooks=hooks, proximity=self._proximity
        )
        runtime = FunctionRuntime(record, dispatcher, autoscaler)
        self._functions[record.spec.name] = runtime
        spec = record.spec
        self._keep_alive.describe(
            name, spec.resources, self._clock.monotonic(), concurrency=spec.scaling.concurrency
        )
        if self._tiers is not None:
            self._tiers.track(spec)
        if old is not None:
            old.dispatcher.close(f"model {record.spec.name!r} was redeployed")
            self._stop_all(old)
        self.wake()
        self._changed()

    # ------------------------------------------------------------ gateways elsewhere

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever what gateways route to may have changed: functions,
        instances ready or draining, a start failed, a reconcile ran."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("a controller listener failed")

    def report(self, report: GatewayReport) -> None:
        """A gateway's load (see :mod:`smss.control.gateways`); ignored without ``gateways``."""
        if self.gateways is None:
            return
        changes = self.gateways.update(report, self._clock.monotonic())
        self._apply_changes(changes)
        for function, iid in changes.lost:
            runtime = self._functions.get(function)
            slot = runtime.dispatcher.slots.get(iid) if runtime else None
            if runtime is not None and slot is not None and self._group is not None:
                self._spawn(self._ping(runtime, slot))  # replaced at once if it is gone
        if changes.demand_changed or any(f.queued for f in report.functions):
            self.wake()

    def _apply_changes(self, changes: Changes) -> None:
        now = self._clock.monotonic()
        for function, n in changes.arrivals.items():
            for _ in range(min(n, 1000)):
                self._keep_alive.on_invocation(function, now)
        for (function, iid), n in changes.started.items():
            for _ in range(n):
                self.meter.request_started(function, iid, now)
        for (function, iid), n in changes.finished.items():
            for _ in range(n):
                self.meter.request_finished(function, iid, now)

    def _remote_demand(self, function: str) -> tuple[int, int]:
        return (0, 0) if self.gateways is None else self.gateways.demand(function)

    def _observed_load(self, runtime: FunctionRuntime) -> tuple[int, int, list[InstanceView]]:
        """(demand, queued, ready instances' views) over this process and every gateway."""
        d = runtime.dispatcher
        ready = d.ready_views()
        if self.gateways is None:
            return d.demand, d.queued, ready
        in_flight, queued = self.gateways.demand(runtime.name)
        return d.demand + in_flight + queued, d.queued + queued, self.gateways.merge(runtime.name, ready)

    async def restore(self, records: Sequence[FunctionRecord]) -> None:
        """Deploy the registered functions and adopt the instances an earlier platform
        process left running (or stop them). Call once, inside :meth:`running`, before
        anything else is deployed."""
        try:
            found = await self._backend.recover()
        except Exception:  # what was left running is not adopted; serving goes on without it
            log.exception("could not recover the instances left running by the last platform")
            found = []
        for record in records:
            self.deploy(record)
        # No await from here on: no reconcile runs between the deploys and the adoptions.
        choice = adoption.choose(found, {rt.name: rt.record for rt in self._functions.values()})
        for r, reason in choice.stop:
            log.info("stopping instance %s left running by the last platform: %s", r.info.id, reason)
            self._spawn(self._backend.stop_instance(r.info.id, self._settings.drain_grace_s))
        for r in choice.adopt:
            self._adopt(self._functions[r.info.function], r)

    def _adopt(self, runtime: FunctionRuntime, found: RunningInstance) -> None:
        info = found.info
        alloc = Allocation(
            info.id, runtime.name, "instance", info.node, host_part(need_of(runtime.record.spec.resources))
        )
        runtime.placed[info.id] = alloc
        runtime.dispatcher.starting += 1
        self._spawn(self._take_over(runtime, info))

    async def _take_over(self, runtime: FunctionRuntime, info: InstanceInfo) -> None:
        d = runtime.dispatcher
        try:
            channel = await self._channels(info)
        except BaseException as e:
            d.starting -= 1
            runtime.placed.pop(info.id, None)
            if isinstance(e, Exception):
                log.warning("could not adopt instance %s (%s): stopping it", info.id, _describe(e))
                await self._backend.stop_instance(info.id, 0.0)
                self.wake()
                return
            raise
        d.starting -= 1
        if d.closed_reason is not None:  # deleted or redeployed meanwhile
            runtime.placed.pop(info.id, None)
            await channel.close()
            await self._backend.stop_instance(info.id, 0.0)
            return
        d.add(info, channel)
        self.meter.instance_started(
            info.id, runtime.name, runtime.record.spec.resources, self._clock.monotonic()
        )
        log.info("adopted instance %s of %s (pid %d)", info.id, runtime.name, info.pid)
        self.wake()
        self._changed()

    def remove(self, name: str) -> None:
        runtime = self._functions.pop(name, None)
        if runtime is None:
            raise NotFound(f"unknown model {name!r}")
        runtime.dispatcher.close(f"model {name!r} was deleted")
        self._stop_all(runtime)
        self._metrics.forget(name)
        self._changed()
        if self._tiers is not None:
            self._tiers.forget(name)

    def scale_to_zero(self, name: str) -> None:
        self._stop_all(self.get(name))

    def load(self, name: str) -> None:
        """An explicit load (the repository API): a function whose starts failed (in a
        back-off, or given up) is tried again at once with its failures forgotten;
        otherwise as :meth:`ensure_instance`."""
        runtime = self.get(name)
        if runtime.dispatcher.start_error is not None:
            log.info("%s: trying to start it again, as asked", name)
            runtime.failures = 0
            runtime.dispatcher.retry_starts()
        self.ensure_instance(name)

    def ensure_instance(self, name: str) -> None:
        """Start one instance now unless one is ready or starting (pre-warm, repository
        load), where it fits now; when nothing fits, or the function is in a start
        back-off or failed, nothing starts."""
        runtime = self.get(name)
        d = runtime.dispatcher
        if d.ready_views() or d.starting or self._clock.monotonic() < d.backoff_until:
            return
        cluster = self.cluster_state()
        where = cluster.place(
            name,
            need_of(runtime.record.spec.resources),
            self._locality(name, cluster),
            weights=runtime.weights,
        )
        if isinstance(where, NoFit):
            log.info("not starting %s ahead of demand: %s", name, where.message(name))
            return
        self._launch(runtime, where, cluster)

    def wake(self) -> None:
        self._wake.set()

    def cluster_state(self) -> ClusterState:
        """The nodes' devices and everything placed on them now."""
        placed = [a for rt in self._functions.values() for a in rt.placed.values()]
        return ClusterState(self._backend.inventory(), [*placed, *self._backend.resident()])

    def devices(self) -> list[DeviceReport]:
        """Every node's devices with their capacity, what is allocated and what is placed."""
        return self.cluster_state().reports()

    async def step_tier(self, name: str, tier: Tier) -> None:
        """Put ``name``, which has no instance, in ``tier`` now (``no_runtime``: its
        runtime's zygote stops, and the templates of the other functions of the runtime
        with it): for benchmarks and tests of each tier. :class:`Conflict` while it (or,
        for ``no_runtime``, a function of its runtime) has an instance;
        :class:`Unavailable` on a backend without tiers."""
        runtime = self.get(name)
        if self._tiers is None:
            raise Unavailable("this platform's backend does not keep tiers of readiness")
        busy = {rt.name for rt in self._functions.values() if rt.dispatcher.slots or rt.dispatcher.starting}
        if name in busy:
            raise Conflict(f"model {name!r} has instances: unload it first")
        record = runtime.record
        await self._tiers.force(record.spec, Path(record.artifact_dir), tier, busy)

    def tier(self, name: str) -> Tier | None:
        """The function's tier of readiness now (None: the backend does not say)."""
        d = self.get(name).dispatcher
        if d.slots or d.starting:
            return Tier.WARM
        return None if self._tiers is None else self._tiers.tier(name)

    # ------------------------------------------------------------ loop

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Controller]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            loop_task = group.create_task(self._loop())
            health_task = group.create_task(self._health_loop())
            try:
                yield self
            finally:
                loop_task.cancel()
                health_task.cancel()
                for task in list(self._wakeups):
                    task.cancel()
                for runtime in list(self._functions.values()):
                    runtime.dispatcher.close("the platform is shutting down")
                    self._stop_all(runtime)
        self._group = None
        await self._backend.close()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with self._clock.timeout(self._settings.tick_s):
                    await self._wake.wait()
            self._wake.clear()
            if self.gateways is not None:
                self._apply_changes(self.gateways.expire(self._clock.monotonic()))
            self.tick()

    async def _health_loop(self) -> None:
        while True:
            await self._clock.sleep(self._settings.health_interval_s)
            try:
                await self._check_health()
            except Exception:
                log.exception("a health check failed")

    async def _check_health(self) -> None:
        """One round of health checks: replace every stalled instance, then ping every
        other ready one (all at once) and replace those that do not answer in time."""
        now = self._clock.monotonic()
        grace = self._settings.stall_grace_s
        to_ping: list[tuple[FunctionRuntime, Slot]] = []
        for runtime in list(self._functions.values()):
            d = runtime.dispatcher
            for slot in d.stalled(now):
                late = now - slot.stalled_since() + grace
                self._unhealthy(runtime, slot, f"it held a request {late:.1f} s past its deadline")
            to_ping += [(runtime, s) for s in d.slots.values() if s.info.id not in runtime.stopping]
        if to_ping:
            async with asyncio.TaskGroup() as group:
                for runtime, slot in to_ping:
                    group.create_task(self._ping(runtime, slot))

    async def _ping(self, runtime: FunctionRuntime, slot: Slot) -> None:
        timeout = self._settings.ping_timeout_s
        try:
            async with self._clock.timeout(timeout):
                await slot.channel.ping()
        except TimeoutError:
            self._unhealthy(runtime, slot, f"it did not answer a health check within {timeout:g} s")
        except InstanceLost as e:
            self._unhealthy(runtime, slot, e.message)
        except Exception:
            log.exception("health check of instance %s failed", slot.info.id)

    def _unhealthy(self, runtime: FunctionRuntime, slot: Slot, reason: str) -> None:
        """Take ``slot`` out of rotation (unless it is gone already) and replace it."""
        d = runtime.dispatcher
        if d.slots.get(slot.info.id) is slot:
            d.remove(slot.info.id)
            self._replace(runtime, slot, reason)

    def _replace(self, runtime: FunctionRuntime, slot: Slot, reason: str) -> None:
        """``slot``'s instance, out of rotation, is killed; the next reconcile starts
        another if there is demand. Its requests fail as lost when the channel closes."""
        iid = slot.info.id
        if iid in runtime.stopping:
            return  # a stop is under way, and cleans up
        log.warning("instance %s of %s is unhealthy (%s): replacing it", iid, runtime.name, reason)
        runtime.replaced += 1
        runtime.placed.pop(iid, None)
        self.meter.instance_stopped(iid, self._clock.monotonic())
        if self._group is not None:
            self._spawn(self._kill(slot))
        self.wake()
        self._changed()

    async def _kill(self, slot: Slot) -> None:
        # Its requests fail at once (retried elsewhere), in a task of their own: the stop
        # is asked first, so a backend that learns from it (a cluster's: that node is
        # suspect) knows before the next reconcile places the replacement.
        self._spawn(slot.channel.close())
        await self._backend.stop_instance(slot.info.id, 0.0)

    def tick(self) -> None:
        """Reconcile every function once. A failure of one function's reconcile is
        logged and leaves the others, and the loop, running."""
        try:
            cluster = self.cluster_state()
        except Exception:
            log.exception("could not read the cluster's state; no function reconciled this tick")
            return
        now = self._clock.monotonic()
        tiers = self._tiers
        if tiers is not None:
            tiers.refresh()
        for runtime in list(self._functions.values()):
            try:
                self._reconcile(runtime, cluster, now)
            except Exception:
                log.exception("reconcile of %s failed", runtime.name)
        if tiers is not None:
            try:
                busy = [
                    rt.name
                    for rt in self._functions.values()
                    if rt.dispatcher.slots or rt.dispatcher.starting
                ]
                tiers.settle_runtimes(busy)
                tiers.meter(now)
            except Exception:
                log.exception("could not settle what is kept resident")
        self._changed()

    def _reconcile(self, runtime: FunctionRuntime, cluster: ClusterState, now: float) -> None:
        d = runtime.dispatcher
        spec = runtime.record.spec
        demand, queued, ready = self._observed_load(runtime)
        observed = Observed(
            name=spec.name,
            demand=demand,
            queued=queued,
            ready=ready,
            starting=d.starting,
            backoff_until=d.backoff_until,
            prewarmed_for=runtime.prewarmed_for,
            holds=Tier.STANDBY if self._tiers is None else self._tiers.holds(spec.name),
        )
        commands = reconcile(
            observed,
            runtime.policies(self._keep_alive),
            cluster,
            now,
            locality=self._locality(spec.name, cluster),
            evictable=self._evictable,
        )
        self._apply(runtime, commands, cluster)
        if self._tiers is not None:
            self._tiers.apply(spec, Path(runtime.record.artifact_dir), commands)
        self._metrics.instances(spec.name, "ready", len(ready) - len(commands.stop))
        self._metrics.instances(spec.name, "starting", d.starting)
        self._metrics.queue_length(spec.name, queued)

    def _apply(self, runtime: FunctionRuntime, commands: Commands, cluster: ClusterState) -> None:
        for alloc_id in commands.evict:
            self._evict(alloc_id, cluster)
        for instance_id in commands.stop:
            self._spawn(self._stop(runtime, instance_id))
        if commands.prewarm_for is not None:
            runtime.prewarmed_for = commands.prewarm_for
            runtime.prewarms += 1
        for where in commands.start:
            self._launch(runtime, where, cluster)
        runtime.waiting_for_capacity = commands.waiting_for_capacity
        runtime.no_fit = commands.no_fit
        d = runtime.dispatcher
        d.waiting_for = commands.no_fit.message(runtime.name) if commands.no_fit else None
        if commands.no_fit is not None and commands.no_fit.never and d.queued:
            self._start_failed(runtime, StartFailed(commands.no_fit.message(runtime.name)))

    def _launch(self, runtime: FunctionRuntime, where: Placement, cluster: ClusterState) -> None:
        alloc = where.allocation(
            f"{runtime.name}#start{next(self._start_ids)}",
            runtime.name,
            need_of(runtime.record.spec.resources),
        )
        runtime.placed[alloc.id] = alloc
        cluster.add(alloc)
        runtime.dispatcher.starting += 1
        self._spawn(self._start(runtime, alloc))

    def _locality(self, function: str, cluster: ClusterState) -> Locality:
        ranks: dict[tuple[str, int | None], int] = {}
        for a in cluster.allocations():
            if a.function != function or a.kind == "instance":
                continue
            rank = TEMPLATE_RANK if a.kind in ("template", "spare") else WEIGHTS_RANK
            key = (a.node, a.gpu_index)
            ranks[key] = max(ranks.get(key, 0), rank)
        return ranks

    def _evictable(self, a: Allocation) -> float | None:
        """Since when ``a`` is idle, when placement may stop it for another function."""
        runtime = self._functions.get(a.function)
        if a.kind != "instance":
            # Kept resident for a function with no instance: dropped before any idle instance.
            busy = runtime is not None and (runtime.dispatcher.slots or runtime.dispatcher.starting)
            return None if busy else math.inf
        if runtime is None:
            return None
        slot = runtime.dispatcher.slots.get(a.id)
        _, _, views = self._observed_load(runtime)
        if slot is None or slot.draining or slot.in_flight or a.id in runtime.stopping:
            return None
        if len(views) <= runtime.record.spec.scaling.min_instances:
            return None
        view = next((v for v in views if v.id == a.id), None)
        return None if view is None else view.idle_since

    def _evict(self, alloc_id: str, cluster: ClusterState) -> None:
        a = cluster.remove(alloc_id)
        if a is None:
            return
        if a.kind == "instance":
            runtime = self._functions.get(a.function)
            if runtime is not None:
                log.info("stopping idle instance %s of %s to make room", alloc_id, a.function)
                self._spawn(self._stop(runtime, alloc_id))
            return
        log.info("dropping what is resident for %s (%s) to make room", a.function, a.kind)
        try:
            self._backend.evict_weights(a.function)
        except Exception:
            log.exception("could not drop the resident weights of %s", a.function)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if self._group is None:
            coro.close()
            raise RuntimeError("controller is not running")
        guarded = self._guarded(coro)
        try:
            return self._group.create_task(guarded)
        except RuntimeError:  # the group is shutting down (its body raised)
            guarded.close()
            coro.close()
            raise

    @staticmethod
    async def _guarded(coro: Coroutine[Any, Any, None]) -> None:
        """A start's, stop's or close's unexpected exception is logged, never raised into
        the controller's task group (which would end the controller)."""
        try:
            await coro
        except Exception:
            log.exception("a controller task failed")

    async def _start(self, runtime: FunctionRuntime, alloc: Allocation) -> None:
        # A task of its own: its records are about this function's start, not about the
        # request or instance whose arrival asked for it.
        logcontext.set_ids(function=runtime.name, instance=None)
        d = runtime.dispatcher
        record = runtime.record
        try:
            started = await self._backend.start_instance(record.spec, Path(record.artifact_dir), alloc)
            channel = await self._connect(started.info)
        except Exception as failure:
            runtime.placed.pop(alloc.id, None)
            d.starting -= 1
            reason = failure.message if isinstance(failure, StartFailed) else _describe(failure)
            if not isinstance(failure, StartFailed):
                log.error("start of %s raised", record.spec.name, exc_info=failure)
            self._start_failed(runtime, StartFailed(f"model {record.spec.name!r} failed to start: {reason}"))
            self.wake()
            return
        except BaseException:
            runtime.placed.pop(alloc.id, None)
            d.starting -= 1
            raise
        runtime.placed.pop(alloc.id, None)
        d.starting -= 1
        runtime.failures = 0
        runtime.cold_starts += 1
        if self._tiers is not None:
            self._tiers.started(record.spec.name)
        runtime.start_estimate_s += 0.3 * (started.timings.total_ms / 1000 - runtime.start_estimate_s)
        if d.closed_reason is not None:  # deleted or redeployed while starting
            await channel.close()
            await self._backend.stop_instance(started.info.id, 0.0)
            self.wake()
            return
        runtime.placed[started.info.id] = Allocation(
            started.info.id,
            alloc.function,
            "instance",
            started.info.node,
            alloc.cpu,
            alloc.gpu,
            alloc.gpu_index,
        )
        d.add(started.info, channel)
        self.meter.instance_started(
            started.info.id, record.spec.name, record.spec.resources, self._clock.monotonic()
        )
        self._metrics.cold_start(record.spec.name, started.timings)
        self._changed()

    def _start_failed(self, runtime: FunctionRuntime, error: StartFailed) -> None:
        runtime.failures += 1
        limit = self._settings.max_start_failures
        if runtime.failures >= limit:
            error = StartFailed(
                f"{error.message} (failed to start {runtime.failures} times in a row; no more "
                "starts are tried until it is redeployed or loaded again)"
            )
            log.error("%s", error.message)
            runtime.dispatcher.start_failed(error, math.inf)
            self._changed()
            return
        backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (runtime.failures - 1))
        log.error("%s (%d in a row; next try in %.1f s)", error.message, runtime.failures, backoff)
        runtime.dispatcher.start_failed(error, backoff)
        self._changed()
        if self._group is not None:  # try again when the back-off ends, not a tick later
            task = self._spawn(self._wake_after(backoff))
            self._wakeups.add(task)
            task.add_done_callback(self._wakeups.discard)

    async def _wake_after(self, seconds: float) -> None:
        await self._clock.sleep(seconds)
        self.wake()

    async def _connect(self, info: InstanceInfo) -> InstanceChannel:
        try:
            return await self._channels(info)
        except InstanceLost as e:
            # Started but unreachable: a failed start (back-off, 503), not a crash of
            # the controller's task group, and no instance left running unseen.
            await self._backend.stop_instance(info.id, 0.0)
            raise StartFailed(f"instance {info.id} started but is unreachable: {e.message}") from None

    async def _stop(self, runtime: FunctionRuntime, instance_id: str) -> None:
        slot = runtime.dispatcher.drain(instance_id)
        if slot is None or instance_id in runtime.stopping:
            return
        runtime.stopping.add(instance_id)
        self._changed()  # gateways drain it too
        try:
            grace = self._settings.drain_grace_s
            started = self._clock.monotonic()
            with contextlib.suppress(TimeoutError):
                async with self._clock.timeout(grace):
                    await slot.drained.wait()
            remaining = max(0.0, grace - (self._clock.monotonic() - started))
            await self._backend.stop_instance(instance_id, remaining)
            await slot.channel.close()
        finally:
            runtime.dispatcher.remove(instance_id)
            runtime.stopping.discard(instance_id)
            runtime.placed.pop(instance_id, None)
            self.meter.instance_stopped(instance_id, self._clock.monotonic())
            self.wake()  # capacity freed: a start waiting for it may fit now
            self._changed()

    def _stop_all(self, runtime: FunctionRuntime) -> None:
        for instance_id in list(runtime.dispatcher.slots):
            if self._group is not None:
                self._spawn(self._stop(runtime, instance_id))

    def _on_exit(self, instance_id: str, code: int | None) -> None:
        for runtime in self._functions.values():
            slot = runtime.dispatcher.remove(instance_id)
            runtime.placed.pop(instance_id, None)
            if slot is not None:
                self.meter.instance_stopped(instance_id, self._clock.monotonic())
                log.warning("instance %s of %s exited (code %s)", instance_id, runtime.name, code)
                self._spawn(slot.channel.close())
        self.wake()
        self._changed()


def _describe(error: BaseException) -> str:
    """A client-safe reason for an unexpected start failure (no paths, no traceback)."""
    if isinstance(error, FileNotFoundError):
        return "a file it needs is missing (see the server log)"
    if isinstance(error, OSError):
        return f"{type(error).__name__} on the node (see the server log)"
    message = getattr(error, "message", None)
    return message if isinstance(message, str) else f"{type(error).__name__} (see the server log)"
