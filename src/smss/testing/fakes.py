"""Fakes of the instance-side ports: a cluster backend, instance channels, metrics.

Each is typed against its Protocol in :mod:`smss.ports` (see the checks at the
bottom, run by mypy only). They never sleep on their own unless told to
(``FakeChannel(latency_s=...)``): tests control timing through gates
(:class:`asyncio.Event` and per-call releases), so an ordering is decided by the
test, not by the scheduler.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smss.errors import InstanceLost, SmssError, StartFailed
from smss.inventory import Allocation, Capacity, Device, NodeInventory
from smss.ports import (
    Clock,
    ExitCallback,
    InstanceInfo,
    Reply,
    RunningInstance,
    StartedInstance,
    StartTimings,
    Tensors,
)
from smss.spec import FunctionSpec

if TYPE_CHECKING:
    from smss.ports import ChannelFactory, ClusterBackend, InstanceChannel, Metrics

Compute = Callable[[Tensors, tuple[str, ...]], Mapping[str, np.ndarray]]


def echo(inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every requested output is a copy of the first input."""
    first = next(iter(inputs.values()))
    return {name: np.array(first, copy=True) for name in outputs}


# ---------------------------------------------------------------- backend


class FakeBackend:
    """:class:`smss.ports.ClusterBackend` that starts nothing real.

    * ``starts`` names the function of every ``start_instance`` call (failed ones
      included), ``start_times`` the clock's time of each (when given a clock);
      ``stops`` lists ``(instance id, grace_s)`` of every ``stop_instance`` call
      (``stop_times`` their times).
    * ``fail_next(n)`` makes the next ``n`` starts raise :class:`StartFailed`.
    * ``start_gate``: when set to an :class:`asyncio.Event`, starts wait for it
      (clear it to hold starts, set it to let them finish); ``None``: immediate.
    * ``exit(instance_id, code)`` simulates an instance dying: it leaves
      ``running`` and the exit callback fires, as the port promises.
    * ``peak`` is the most instances ever running or starting at once.
    * ``inventories``: the nodes' devices (default: one node of 64 cores, 256 GiB);
      ``placements`` lists the allocation each start was asked to use.
    * ``start_s``: a start takes this long on the clock (``clock.sleep``).
    * ``left_running``: instances an earlier platform left, which ``recover`` returns
      (and counts as running from then on).
    * The weight cache holds each function that started once (``cached``) until
      ``evict_weights`` drops it, which it refuses while an instance runs it.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        nodes: tuple[str, ...] = ("local",),
        *,
        inventories: tuple[NodeInventory, ...] = (),
        start_s: float = 0.0,
    ) -> None:
        self._clock = clock
        self._inventories: dict[str, NodeInventory] = {inv.node: inv for inv in inventories}
        self._nodes = list(self._inventories) or list(nodes)
        self.start_s = start_s
        self._ids = itertools.count(1)
        self._failures: list[str] = []
        self._on_exit: ExitCallback = lambda _id, _code: None
        self._pending = 0
        self.start_gate: asyncio.Event | None = None
        self.starts: list[str] = []
        self.placements: list[Allocation | None] = []
        self.start_times: list[float] = []
        self.stop_times: list[float] = []
        self.stops: list[tuple[str, float]] = []
        self.exits: list[tuple[str, int | None]] = []
        self.running: dict[str, InstanceInfo] = {}
        self.cached: set[str] = set()
        self.peak = 0
        self.closed = False
        self.left_running: list[RunningInstance] = []

    def fail_next(self, n: int = 1, reason: str = "load error") -> None:
        self._failures.extend([reason] * n)

    async def start_instance(
        self, spec: FunctionSpec, artifact_dir: Path, where: Allocation | None = None
    ) -> StartedInstance:
        self.starts.append(spec.name)
        self.placements.append(where)
        if self._clock is not None:
            self.start_times.append(self._clock.monotonic())
        number = next(self._ids)
        instance_id = f"{spec.name}-{number}"
        self._pending += 1
        self.peak = max(self.peak, len(self.running) + self._pending)
        try:
            if self.start_gate is not None:
                await self.start_gate.wait()
            if self.start_s > 0 and self._clock is not None:
                await self._clock.sleep(self.start_s)
            if self._failures:
                raise StartFailed(f"instance {instance_id} failed to start: {self._failures.pop(0)}")
        finally:
            self._pending -= 1
        node = where.node if where is not None else self._nodes[(number - 1) % len(self._nodes)]
        now = self._clock.time() if self._clock is not None else 0.0
        info = InstanceInfo(instance_id, spec.name, node, f"fake:{instance_id}", 10_000 + number, now)
        self.running[instance_id] = info
        self.cached.add(spec.name)
        return StartedInstance(info, StartTimings(spawn_ms=0.0, load_ms=0.0, total_ms=0.0))

    async def stop_instance(self, instance_id: str, grace_s: float) -> None:
        self.stops.append((instance_id, grace_s))
        if self._clock is not None:
            self.stop_times.append(self._clock.monotonic())
        self.running.pop(instance_id, None)

    async def recover(self) -> list[RunningInstance]:
        found, self.left_running = self.left_running, []
        for r in found:
            self.running[r.info.id] = r.info
        return found

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    def exit(self, instance_id: str, code: int | None = 1) -> None:
        """Simulate an unexpected exit of a running instance."""
        if self.running.pop(instance_id, None) is None:
            raise KeyError(f"instance {instance_id} is not running")
        self.exits.append((instance_id, code))
        self._on_exit(instance_id, code)

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def inventory(self) -> list[NodeInventory]:
        return [self._inventories.get(n) or _default_inventory(n) for n in self._nodes]

    def resident(self) -> list[Allocation]:
        return []

    def weight_cache(self) -> dict[str, object]:
        return {node: {"models": sorted(self.cached)} for node in self._nodes}

    def evict_weights(self, function: str) -> bool:
        if function not in self.cached or any(i.function == function for i in self.running.values()):
            return False
        self.cached.discard(function)
        return True

    async def close(self) -> None:
        self.closed = True
        for instance_id in list(self.running):
            await self.stop_instance(instance_id, 0.0)


def _default_inventory(node: str, cpu: float = 64.0, memory_mb: int = 256 * 1024) -> NodeInventory:
    cap = Capacity(cpu=cpu, memory_mb=memory_mb)
    return NodeInventory(node, (Device("cpu", 0, "cpu", cap, cap),))


# ---------------------------------------------------------------- channels


@dataclass(eq=False)
class Call:
    """One ``infer`` held by a blocked :class:`FakeChannel`, until released or failed."""

    inputs: Tensors
    outputs: tuple[str, ...]
    gate: asyncio.Future[None] = field(repr=False)

    def release(self) -> None:
        if not self.gate.done():
            self.gate.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.gate.done():
            self.gate.set_exception(error)


class FakeChannel:
    """:class:`smss.ports.InstanceChannel` whose ``infer`` answers ``compute(inputs, outputs)``.

    * ``blocked = True`` holds every new call in ``held`` until the test releases
      it (``Call.release``, ``release_all``) or fails it (``Call.fail``).
    * ``lose()`` simulates the instance dying: held calls and every later call
      raise :class:`InstanceLost`; so does ``close()`` for held calls, like the
      real channel.
    * ``fail_next(error)`` makes the next call raise ``error``.
    * ``latency_s`` adds a real ``asyncio.sleep`` (a slow instance; keep it to ms).
    * ``service_s(inputs)`` with a ``clock``: each call takes that long on the clock
      (``clock.sleep``), e.g. a trace's duration carried in the input.
    * ``in_flight`` and ``peak`` count concurrent calls, ``calls`` all calls.
    * ``send`` runs the call in a task the channel owns (a done one is dropped; one
      still held when the channel closes fails with :class:`InstanceLost`), so its
      answer comes whether or not the caller still waits for it.
    * ``stall()`` is a stopped process (SIGSTOP): new calls are held and pings go
      unanswered, until ``resume()`` (SIGCONT), ``lose()`` or ``close()``; held
      calls stay held until the test releases them. ``pings`` counts pings.
    """

    def __init__(
        self,
        compute: Compute = echo,
        *,
        latency_s: float = 0.0,
        blocked: bool = False,
        info: InstanceInfo | None = None,
        clock: Clock | None = None,
        service_s: Callable[[Tensors], float] | None = None,
    ) -> None:
        self.compute = compute
        self.latency_s = latency_s
        self._clock = clock
        self._service_s = service_s
        self.blocked = blocked
        self.info = info
        self._held: list[Call] = []
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self._errors: list[BaseException] = []
        self._lost = False
        self._closed = False
        self._tasks: set[asyncio.Task[Reply]] = set()
        self._stalled: asyncio.Future[None] | None = None
        self.pings = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held(self) -> list[Call]:
        """Calls waiting for the test to release or fail them, oldest first."""
        return [call for call in self._held if not call.gate.done()]

    def fail_next(self, error: BaseException) -> None:
        self._errors.append(error)

    def release_all(self) -> None:
        for call in self.held:
            call.release()

    def lose(self) -> None:
        self._lost = True
        self._fail_held()

    def stall(self) -> None:
        self.blocked = True
        if self._stalled is None or self._stalled.done():
            self._stalled = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        self.blocked = False
        self.release_all()
        if self._stalled is not None and not self._stalled.done():
            self._stalled.set_result(None)

    async def ping(self) -> None:
        self.pings += 1
        if self._closed or self._lost:
            raise InstanceLost("instance is gone")
        if self._stalled is not None:
            await asyncio.shield(self._stalled)
        if self._closed or self._lost:
            raise InstanceLost("instance is gone")

    async def send(self, inputs: Tensors, outputs: tuple[str, ...]) -> asyncio.Future[Reply]:
        if self._closed or self._lost:
            self.calls += 1
            raise InstanceLost("instance is gone")
        task = asyncio.get_running_loop().create_task(self._reply(inputs, outputs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _reply(self, inputs: Tensors, outputs: tuple[str, ...]) -> Reply:
        return Reply(await self.infer(inputs, outputs))

    async def infer(self, inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self._closed or self._lost:
            raise InstanceLost("instance is gone")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self._errors:
                raise self._errors.pop(0)
            if self.blocked:
                call = Call(inputs, outputs, asyncio.get_running_loop().create_future())
                self._held.append(call)
                try:
                    await call.gate
                finally:
                    self._held.remove(call)
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
            if self._service_s is not None and self._clock is not None:
                await self._clock.sleep(self._service_s(inputs))
            if self._lost or self._closed:
                raise InstanceLost("instance exited with the request in flight")
            return dict(self.compute(inputs, outputs))
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        self._closed = True
        self._fail_held()

    def _fail_held(self) -> None:
        for call in list(self.held):
            call.fail(InstanceLost("instance exited with the request in flight"))
        if self._stalled is not None and not self._stalled.done():
            self._stalled.set_exception(InstanceLost("instance is gone"))
            self._stalled.exception()  # retrieved: nobody may be pinging


class FakeChannels:
    """:class:`smss.ports.ChannelFactory` making one :class:`FakeChannel` per instance.

    ``make`` builds each channel (default: an echoing one); ``by_id`` keeps them
    by instance id; ``fail_next(error)`` makes the next connect raise ``error``."""

    def __init__(self, make: Callable[[InstanceInfo], FakeChannel] | None = None) -> None:
        self._make = make or (lambda info: FakeChannel(info=info))
        self._errors: list[SmssError] = []
        self.by_id: dict[str, FakeChannel] = {}

    def fail_next(self, error: SmssError) -> None:
        self._errors.append(error)

    async def __call__(self, info: InstanceInfo) -> InstanceChannel:
        if self._errors:
            raise self._errors.pop(0)
        channel = self._make(info)
        self.by_id[info.id] = channel
        return channel


# ---------------------------------------------------------------- metrics


class NullMetrics:
    """:class:`smss.ports.Metrics` that reports nothing."""

    def request_done(self, function: str, status: str, seconds: float) -> None:
        pass

    def cold_start(self, function: str, timings: StartTimings) -> None:
        pass

    def instances(self, function: str, state: str, count: int) -> None:
        pass

    def queue_length(self, function: str, length: int) -> None:
        pass

    def forget(self, function: str) -> None:
        pass


if TYPE_CHECKING:  # the fakes satisfy the ports (checked by mypy, never run)
    _backend: ClusterBackend = FakeBackend()
    _channel: InstanceChannel = FakeChannel()
    _channels: ChannelFactory = FakeChannels()
    _metrics: Metrics = NullMetrics()
