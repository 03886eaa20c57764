"""The controller: reconciles desired and running instances of every function.

Each tick (or at once when a request finds no free instance) it asks each
function's autoscaler and the keep-alive policy for a :class:`ScalePlan` and
applies it through the :class:`ClusterBackend`. Starts and stops run as tasks
in the controller's own task group, so none outlives it. Guarantees:

* a failed start is retried with exponential back-off (0.5 s doubling to 30 s);
  waiting requests get 503 naming the model instead of hanging;
* an instance that exits unexpectedly is dropped at once (its in-flight
  requests are retried by the dispatcher) and replaced on the next demand;
* ``close`` drains every instance within the grace period and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from smss.config import ServingSettings
from smss.control.autoscaler import Autoscaler, AutoscalerConfig
from smss.control.dispatcher import DispatchHooks, FunctionDispatcher
from smss.control.keepalive import KeepAlivePolicy
from smss.control.metering import Meter
from smss.control.scaling import FunctionView, plan
from smss.errors import InstanceLost, NotFound, StartFailed
from smss.inventory import Capacity, DeviceReport
from smss.ports import (
    ChannelFactory,
    Clock,
    ClusterBackend,
    FunctionRecord,
    InstanceChannel,
    InstanceInfo,
    Metrics,
)

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


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

    @property
    def name(self) -> str:
        return self.record.spec.name


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
    ) -> None:
        self.meter = meter or Meter()
        self._backend = backend
        self._channels = channels
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._keep_alive = keep_alive
        self._functions: dict[str, FunctionRuntime] = {}
        self._wake = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        backend.set_exit_callback(self._on_exit)

    # ------------------------------------------------------------ registry view

    def get(self, name: str) -> FunctionRuntime:
        runtime = self._functions.get(name)
        if runtime is None:
            raise NotFound(f"unknown model {name!r}")
        return runtime

    def functions(self) -> list[FunctionRuntime]:
        return list(self._functions.values())

    def deploy(self, record: FunctionRecord) -> None:
        """Register or replace a function; instances of a replaced one are drained."""
        old = self._functions.get(record.spec.name)
        name = record.spec.name
        hooks = DispatchHooks(
            on_arrival=lambda: self._keep_alive.on_invocation(name, self._clock.monotonic()),
            on_start=lambda iid: self.meter.request_started(name, iid, self._clock.monotonic()),
            on_finish=lambda iid: self.meter.request_finished(name, iid, self._clock.monotonic()),
        )
        dispatcher = FunctionDispatcher(record.spec, self._clock, self._settings, self.wake, hooks=hooks)
        self._functions[record.spec.name] = FunctionRuntime(record, dispatcher, autoscaler_for(record))
        if old is not None:
            old.dispatcher.close(f"model {record.spec.name!r} was redeployed")
            self._stop_all(old)
        self.wake()

    def remove(self, name: str) -> None:
        runtime = self._functions.pop(name, None)
        if runtime is None:
            raise NotFound(f"unknown model {name!r}")
        runtime.dispatcher.close(f"model {name!r} was deleted")
        self._stop_all(runtime)
        self._metrics.forget(name)

    def scale_to_zero(self, name: str) -> None:
        self._stop_all(self.get(name))

    def ensure_instance(self, name: str) -> None:
        """Start one instance now unless one is ready or starting (pre-warm, repository load)."""
        runtime = self.get(name)
        d = runtime.dispatcher
        if not d.ready_views() and d.starting == 0:
            d.starting += 1
            self._spawn(self._start(runtime))

    def wake(self) -> None:
        self._wake.set()

    def devices(self) -> list[DeviceReport]:
        """Every node's devices with what is allocated on each (placeholder: none yet)."""
        return [
            DeviceReport(
                inv.node,
                d.kind,
                d.index,
                d.name,
                d.capacity,
                d.total,
                d.reserved,
                Capacity(),
                (),
                d.free_memory_mb,
            )
            for inv in self._backend.inventory()
            for d in inv.devices
        ]

    # ------------------------------------------------------------ loop

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Controller]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            loop_task = group.create_task(self._loop())
            try:
                yield self
            finally:
                loop_task.cancel()
                for runtime in list(self._functions.values()):
                    runtime.dispatcher.close("the platform is shutting down")
                    self._stop_all(runtime)
        self._group = None
        await self._backend.close()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.tick_s)
            self._wake.clear()
            for runtime in list(self._functions.values()):
                self._reconcile(runtime)

    def _reconcile(self, runtime: FunctionRuntime) -> None:
        now = self._clock.monotonic()
        d = runtime.dispatcher
        spec = runtime.record.spec
        demand = d.demand
        runtime.autoscaler.observe(now, float(demand))
        ready = d.ready_views()
        override = spec.scaling.keep_alive_s  # the function's own TTL, for every instance
        if override is None:
            keep_alive = self._keep_alive.keep_alive_s(spec.name, now)
            surplus = self._keep_alive.surplus_keep_alive_s(spec.name, now)
        else:
            keep_alive = surplus = override
        scale = plan(
            FunctionView(
                now=now,
                demand=demand,
                ready=ready,
                starting=d.starting,
                min_instances=spec.scaling.min_instances,
                max_instances=spec.scaling.max_instances,
                desired=runtime.autoscaler.desired(now, len(ready)),
                keep_alive_s=keep_alive,
                backoff_until=d.backoff_until,
                queued=d.queued,
                concurrency=spec.scaling.concurrency,
                surplus_keep_alive_s=surplus,
            )
        )
        start = scale.start
        if start == 0 and not ready and d.starting == 0 and self._prewarm_due(runtime, now):
            start = 1  # the keep-alive policy expects an invocation soon: be ready for it
            runtime.prewarms += 1
        for _ in range(start):
            d.starting += 1
            self._spawn(self._start(runtime))
        for instance_id in scale.stop:
            self._spawn(self._stop(runtime, instance_id))
        self._metrics.instances(spec.name, "ready", len(ready) - len(scale.stop))
        self._metrics.instances(spec.name, "starting", d.starting)
        self._metrics.queue_length(spec.name, d.queued)

    def _prewarm_due(self, runtime: FunctionRuntime, now: float) -> bool:
        if runtime.record.spec.scaling.keep_alive_s is not None or runtime.dispatcher.backoff_until > now:
            return False
        at = self._keep_alive.prewarm_at(runtime.name, now)
        return at is not None and now >= at - runtime.start_estimate_s

    def _spawn(self, coro: object) -> None:
        if self._group is None:
            raise RuntimeError("controller is not running")
        self._group.create_task(coro)  # type: ignore[arg-type]

    async def _start(self, runtime: FunctionRuntime) -> None:
        d = runtime.dispatcher
        record = runtime.record
        try:
            started = await self._backend.start_instance(record.spec, Path(record.artifact_dir))
            channel = await self._connect(started.info)
        except StartFailed as failure:
            e = StartFailed(f"model {record.spec.name!r} failed to start: {failure.message}")
            runtime.failures += 1
            backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (runtime.failures - 1))
            log.error("model %s failed to start (%d in a row): %s", record.spec.name, runtime.failures, e)
            d.starting -= 1
            d.start_failed(e, backoff)
            return
        except BaseException:
            d.starting -= 1
            raise
        d.starting -= 1
        runtime.failures = 0
        runtime.cold_starts += 1
        runtime.start_estimate_s += 0.3 * (started.timings.total_ms / 1000 - runtime.start_estimate_s)
        if d.closed_reason is not None:  # deleted or redeployed while starting
            await channel.close()
            await self._backend.stop_instance(started.info.id, 0.0)
            return
        d.add(started.info, channel)
        self.meter.instance_started(
            started.info.id, record.spec.name, record.spec.resources, self._clock.monotonic()
        )
        self._metrics.cold_start(record.spec.name, started.timings)

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
        try:
            grace = self._settings.drain_grace_s
            started = self._clock.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.drained.wait(), grace)
            remaining = max(0.0, grace - (self._clock.monotonic() - started))
            await self._backend.stop_instance(instance_id, remaining)
            await slot.channel.close()
        finally:
            runtime.dispatcher.remove(instance_id)
            runtime.stopping.discard(instance_id)
            self.meter.instance_stopped(instance_id, self._clock.monotonic())

    def _stop_all(self, runtime: FunctionRuntime) -> None:
        for instance_id in list(runtime.dispatcher.slots):
            if self._group is not None:
                self._spawn(self._stop(runtime, instance_id))

    def _on_exit(self, instance_id: str, code: int | None) -> None:
        for runtime in self._functions.values():
            slot = runtime.dispatcher.remove(instance_id)
            if slot is not None:
                self.meter.instance_stopped(instance_id, self._clock.monotonic())
                log.warning("instance %s of %s exited (code %s)", instance_id, runtime.name, code)
                self._spawn(slot.channel.close())
        self.wake()
