"""The controller loop with a fake backend, fake channels and a virtual clock.

The clock autojumps (``FakeClock(autojump=True)``, as Trio's ``MockClock``): when
every task waits, virtual time moves to the next wake-up, so the loop's ticks, the
back-off and keep-alive windows and request deadlines all run on virtual time. A
test lets time pass with ``await w.pause(seconds)`` (a sleep on that clock) and then
asserts on the state: whatever the controller does meanwhile has been done, and
nothing waits on wall time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from smss.config import ServingSettings
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive
from smss.errors import InstanceLost, InvalidSpec, NotFound, StartFailed, Unavailable
from smss.inventory import Capacity, Device, NodeInventory
from smss.ports import FunctionRecord, InstanceInfo
from smss.spec import FunctionSpec, Resources, Scaling, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.fakes import FakeBackend, FakeChannel, FakeChannels, NullMetrics

T = TypeVar("T")
TICK = 0.2  # the live default
LONG = 1e6  # a request deadline that is never meant to pass


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30.0))  # wall-time guard only


def make_record(
    generation: int = 1, name: str = "m", resources: Resources | None = None, **scaling: Any
) -> FunctionRecord:
    spec = FunctionSpec(
        name=name,
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        scaling=Scaling(**{"keep_alive_s": 300.0, **scaling}),
        resources=resources or Resources(),
    ).validate()
    return FunctionRecord(spec, "/nonexistent", 0.0, generation)


def node(name: str = "local", cpu: float = 64.0, memory_mb: int = 1 << 18) -> NodeInventory:
    cap = Capacity(cpu=cpu, memory_mb=memory_mb)
    return NodeInventory(name, (Device("cpu", 0, "cpu", cap, cap),))


class World:
    def __init__(
        self,
        make_channel: Callable[[InstanceInfo], FakeChannel] | None = None,
        inventories: tuple[NodeInventory, ...] = (),
    ) -> None:
        self.clock = FakeClock(autojump=True)
        self.backend = FakeBackend(self.clock, inventories=inventories)
        self.channels = FakeChannels(make_channel)
        self.controller = Controller(
            self.backend,
            self.channels,
            self.clock,
            ServingSettings(tick_s=TICK, drain_grace_s=1.0),
            NullMetrics(),
            FixedKeepAlive(300.0),
        )

    async def pause(self, seconds: float = TICK) -> None:
        await self.clock.sleep(seconds)

    def request(
        self, value: float, timeout: float = LONG, name: str = "m"
    ) -> asyncio.Task[dict[str, np.ndarray]]:
        dispatcher = self.controller.get(name).dispatcher
        inputs = {"x": np.array([value], dtype=np.float32)}
        return asyncio.create_task(dispatcher.infer(inputs, ("y",), self.clock.monotonic() + timeout))

    def held(self) -> list[Any]:
        return [call for ch in self.channels.by_id.values() for call in ch.held]

    async def release_until_done(self, tasks: list[asyncio.Task[dict[str, np.ndarray]]]) -> None:
        for _ in range(1000):
            if all(t.done() for t in tasks):
                return
            for call in self.held():
                call.release()
            await self.pause(0.001)
        raise AssertionError("requests never finished")


def value_of(result: dict[str, np.ndarray]) -> float:
    return float(result["y"][0])


def blocked(info: InstanceInfo) -> FakeChannel:
    return FakeChannel(info=info, blocked=True)


def test_request_at_zero_starts_exactly_one_instance_and_is_served() -> None:
    async def main() -> None:
        w = World()
        async with w.controller.running():
            w.controller.deploy(make_record())
            await w.pause(10.0)
            assert w.backend.starts == []  # nothing runs before there is demand
            assert value_of(await w.request(3.0)) == 3.0
            await w.pause()
            assert w.backend.starts == ["m"]
            assert value_of(await w.request(4.0)) == 4.0
            assert w.backend.starts == ["m"]
        assert w.backend.running == {}  # shutdown stopped it

    run(main())


def test_burst_never_starts_more_than_max_instances() -> None:
    async def main() -> None:
        w = World(blocked)
        async with w.controller.running():
            w.controller.deploy(make_record(concurrency=1, max_instances=3))
            tasks = [w.request(float(k)) for k in range(20)]
            await w.pause(5.0)
            assert len(w.held()) == 3
            assert len(w.backend.starts) == 3
            await w.release_until_done(tasks)
            assert [value_of(t.result()) for t in tasks] == [float(k) for k in range(20)]
            assert w.backend.peak == 3
            assert len(w.backend.starts) == 3
            assert max(ch.peak for ch in w.channels.by_id.values()) == 1

    run(main())


def test_exited_instance_is_dropped_and_the_next_request_starts_another() -> None:
    async def main() -> None:
        w = World()
        async with w.controller.running():
            w.controller.deploy(make_record())
            assert value_of(await w.request(1.0)) == 1.0
            (first,) = w.backend.running
            w.backend.exit(first, code=-9)
            assert w.controller.get("m").dispatcher.slots == {}
            await w.pause()
            assert w.channels.by_id[first].closed
            assert value_of(await w.request(2.0)) == 2.0
            assert len(w.backend.starts) == 2
            assert first not in w.backend.running
            assert w.backend.stops == []  # the dead one is not stopped again

    run(main())


def test_exit_mid_flight_is_retried_on_a_replacement() -> None:
    async def main() -> None:
        w = World(lambda info: FakeChannel(info=info, blocked=info.id == "m-1"))
        async with w.controller.running():
            w.controller.deploy(make_record())
            task = w.request(5.0)
            await w.pause()
            assert len(w.held()) == 1
            w.backend.exit("m-1")
            assert value_of(await task) == 5.0
            assert w.backend.starts == ["m", "m"]
            assert w.channels.by_id["m-2"].calls == 1

    run(main())


def test_failed_starts_back_off_exponentially() -> None:
    async def main() -> None:
        w = World()
        w.backend.fail_next(3)
        async with w.controller.running():
            w.controller.deploy(make_record(min_instances=1))
            await w.pause(0.49)
            assert w.backend.start_times == [0.0]  # not before the back-off elapsed
            await w.pause(10.0)
            assert len(w.backend.running) == 1
            # each retry exactly when its back-off (0.5 s doubling) ends
            assert w.backend.start_times == pytest.approx([0.0, 0.5, 1.5, 3.5])

    run(main())


def test_failed_start_fails_waiters_and_new_requests_fast_until_the_back_off_ends() -> None:
    async def main() -> None:
        w = World()
        w.backend.fail_next(1, reason="weights missing")
        async with w.controller.running():
            w.controller.deploy(make_record())
            with pytest.raises(StartFailed, match="weights missing"):
                await w.request(1.0)
            with pytest.raises(StartFailed, match="weights missing") as e:
                await w.request(2.0)
            assert e.value.retry_after_s == pytest.approx(1.0)  # max(retry_after_s, back-off left)
            assert len(w.backend.starts) == 1
            await w.pause(0.5)
            assert value_of(await w.request(3.0)) == 3.0
            assert len(w.backend.starts) == 2

    run(main())


def test_redeploy_drains_and_stops_the_old_generation() -> None:
    async def main() -> None:
        w = World(lambda info: FakeChannel(info=info, blocked=info.id == "m-1"))
        async with w.controller.running():
            w.controller.deploy(make_record(generation=1))
            old = w.request(1.0)
            await w.pause()
            assert len(w.held()) == 1
            w.controller.deploy(make_record(generation=2))
            await w.pause(0.5)
            assert w.backend.stops == []  # draining: its request is still in flight
            assert value_of(await w.request(2.0)) == 2.0  # served by the new generation
            assert "m-2" in w.backend.running
            w.channels.by_id["m-1"].release_all()
            assert value_of(await old) == 1.0
            await w.pause()
            assert "m-1" not in w.backend.running
            assert [iid for iid, _ in w.backend.stops] == ["m-1"]
            assert w.channels.by_id["m-1"].closed
            assert w.controller.get("m").record.generation == 2

    run(main())


def test_remove_fails_queued_requests_and_stops_a_late_start() -> None:
    async def main() -> None:
        w = World()
        w.backend.start_gate = asyncio.Event()
        async with w.controller.running():
            w.controller.deploy(make_record())
            tasks = [w.request(float(k)) for k in range(3)]
            await w.pause()
            assert len(w.backend.starts) == 1
            w.controller.remove("m")
            for t in tasks:
                with pytest.raises(NotFound, match="deleted"):
                    await t
            with pytest.raises(NotFound):
                w.controller.get("m")
            w.backend.start_gate.set()  # the start finishes after the delete...
            await w.pause()
            assert w.backend.stops != []
            assert w.backend.running == {}  # ...and its instance is stopped, not leaked

    run(main())


def test_unreachable_new_instance_is_a_failed_start() -> None:
    """The instance started but its channel cannot connect (the real factory raises
    InstanceLost): the start counts as failed, the instance is stopped, the
    controller keeps running."""

    async def main() -> None:
        w = World()
        w.channels.fail_next(InstanceLost("cannot connect to instance m-1"))
        async with w.controller.running():
            w.controller.deploy(make_record())
            with pytest.raises(StartFailed, match="m-1"):
                await w.request(1.0)
            assert "m-1" not in w.backend.running
            await w.pause(0.5)
            assert value_of(await w.request(2.0)) == 2.0

    run(main())


def test_idle_instance_is_stopped_after_its_keep_alive() -> None:
    async def main() -> None:
        w = World()
        async with w.controller.running():
            w.controller.deploy(make_record(keep_alive_s=30.0))
            assert value_of(await w.request(1.0)) == 1.0
            await w.pause(29.9)
            assert w.backend.stops == []
            await w.pause(0.3)  # the first tick after the keep-alive ran out
            assert w.backend.running == {}
            assert [iid for iid, _ in w.backend.stops] == ["m-1"]
            assert w.controller.get("m").dispatcher.slots == {}
            assert value_of(await w.request(2.0)) == 2.0  # and a new one starts on demand
            assert len(w.backend.starts) == 2

    run(main())


def test_a_burst_behind_a_busy_instance_starts_instances_at_once() -> None:
    """After a minute of steady load the autoscaler's windows average a sudden burst
    away (it still wants one instance); the requests queued behind the busy instance
    start one instance each at once instead of waiting for it."""

    async def main() -> None:
        w = World(blocked)
        async with w.controller.running():
            w.controller.deploy(make_record(concurrency=1, max_instances=8))
            first = w.request(0.0)
            await w.pause(60.0)  # a minute with one request in flight
            assert len(w.held()) == 1
            assert w.controller.get("m").autoscaler.desired(w.clock.monotonic(), 1) == 1
            burst = [w.request(float(k)) for k in range(1, 4)]
            await w.pause(0.001)
            assert len(w.held()) == 4
            assert len(w.backend.starts) == 4
            await w.release_until_done([first, *burst])
            assert [value_of(t.result()) for t in (first, *burst)] == [0.0, 1.0, 2.0, 3.0]

    run(main())


# ---------------------------------------------------------------- placement and capacity


def test_starts_are_capped_by_the_nodes_capacity_and_queued_requests_wait() -> None:
    async def main() -> None:
        w = World(blocked, inventories=(node(cpu=2.0),))
        async with w.controller.running():
            w.controller.deploy(make_record(concurrency=1, max_instances=8, resources=Resources(cpu=1.0)))
            tasks = [w.request(float(k)) for k in range(5)]
            await w.pause(5.0)
            assert len(w.backend.starts) == 2  # two cores: two instances, whatever the queue
            (cpu,) = w.controller.devices()
            assert cpu.allocated.cpu == 2.0
            assert cpu.capacity.cpu == 2.0
            assert len(cpu.placed) == 2
            runtime = w.controller.get("m")
            assert runtime.waiting_for_capacity >= 1
            assert runtime.no_fit is not None
            assert runtime.no_fit.resource == "cpu"
            await w.release_until_done(tasks)
            assert [value_of(t.result()) for t in tasks] == [float(k) for k in range(5)]
            assert w.backend.peak == 2

    run(main())


def test_a_request_waiting_for_capacity_gets_503_naming_it_at_its_deadline() -> None:
    async def main() -> None:
        w = World(blocked, inventories=(node(cpu=1.0),))
        async with w.controller.running():
            w.controller.deploy(make_record(concurrency=1, resources=Resources(cpu=1.0)))
            first = w.request(1.0)
            await w.pause()
            with pytest.raises(Unavailable, match="capacity"):
                await w.request(2.0, timeout=3.0)
            w.channels.by_id["m-1"].release_all()
            assert value_of(await first) == 1.0

    run(main())


def test_an_idle_instance_of_another_function_is_stopped_to_make_room() -> None:
    async def main() -> None:
        w = World(inventories=(node(cpu=1.0),))
        async with w.controller.running():
            w.controller.deploy(make_record(name="a", resources=Resources(cpu=1.0)))
            w.controller.deploy(make_record(name="b", resources=Resources(cpu=1.0)))
            assert value_of(await w.request(1.0, name="a")) == 1.0
            await w.pause(1.0)
            assert value_of(await w.request(2.0, name="b")) == 2.0  # a's idle instance made room
            assert [iid for iid, _ in w.backend.stops] == ["a-1"]
            assert sorted(w.backend.running) == ["b-2"]

    run(main())


def test_a_busy_instance_is_never_evicted() -> None:
    async def main() -> None:
        w = World(blocked, inventories=(node(cpu=1.0),))
        async with w.controller.running():
            w.controller.deploy(make_record(name="a", resources=Resources(cpu=1.0)))
            w.controller.deploy(make_record(name="b", resources=Resources(cpu=1.0)))
            busy = w.request(1.0, name="a")
            await w.pause()
            waiting = w.request(2.0, name="b")
            await w.pause(2.0)
            assert w.backend.stops == []
            assert w.backend.starts == ["a"]
            w.channels.by_id["a-1"].release_all()
            assert value_of(await busy) == 1.0
            await w.pause(0.5)  # a is idle now: b takes its place
            assert w.backend.starts == ["a", "b"]
            w.channels.by_id["b-2"].release_all()
            assert value_of(await waiting) == 2.0

    run(main())


def test_a_deploy_that_can_never_fit_is_refused_naming_the_resource() -> None:
    w = World(inventories=(node(cpu=2.0, memory_mb=4096),))
    with pytest.raises(InvalidSpec, match="memory_mb"):
        w.controller.check_fits(make_record(resources=Resources(cpu=1.0, memory_mb=8192)).spec)
    with pytest.raises(InvalidSpec, match="cpu"):
        w.controller.check_fits(make_record(resources=Resources(cpu=4.0)).spec)
    with pytest.raises(InvalidSpec, match="gpu"):
        w.controller.check_fits(make_record(resources=Resources(gpu=0.5)).spec)
    w.controller.check_fits(make_record(resources=Resources(cpu=2.0, memory_mb=4096)).spec)


class _ExplodingBackend(FakeBackend):
    def __init__(self, clock: FakeClock, error: BaseException) -> None:
        super().__init__(clock)
        self.error: BaseException | None = error

    async def start_instance(self, spec: FunctionSpec, artifact_dir: Any, where: Any = None) -> Any:
        if spec.name == "broken" and self.error is not None:
            self.starts.append(spec.name)
            raise self.error
        return await super().start_instance(spec, artifact_dir, where)


@pytest.mark.parametrize("error", [FileNotFoundError("/data/weights.safetensors"), OSError(28, "No space")])
def test_any_exception_of_a_start_is_that_functions_503_and_the_controller_lives(error: OSError) -> None:
    async def main() -> None:
        w = World()
        w.backend = backend = _ExplodingBackend(w.clock, error)
        w.controller = Controller(
            backend, w.channels, w.clock, ServingSettings(tick_s=TICK), NullMetrics(), FixedKeepAlive(300.0)
        )
        async with w.controller.running():
            w.controller.deploy(make_record(name="broken"))
            w.controller.deploy(make_record(name="ok"))
            with pytest.raises(StartFailed, match="broken") as e:
                await w.request(1.0, name="broken")
            assert "/data" not in e.value.message  # no paths in a client's answer
            assert value_of(await w.request(2.0, name="ok")) == 2.0  # the controller lives on
            await w.pause(1.0)
            backend.error = None
            assert value_of(await w.request(3.0, name="broken")) == 3.0  # and retries after back-off

    run(main())


def test_an_exception_of_a_stop_does_not_end_the_controller() -> None:
    class StopFails(FakeBackend):
        async def stop_instance(self, instance_id: str, grace_s: float) -> None:
            if not self.closed:
                raise RuntimeError("agent gone")
            await super().stop_instance(instance_id, grace_s)

        async def close(self) -> None:
            self.closed = True
            await super().close()

    async def main() -> None:
        w = World()
        w.backend = StopFails(w.clock)
        w.controller = Controller(
            w.backend, w.channels, w.clock, ServingSettings(tick_s=TICK), NullMetrics(), FixedKeepAlive(1.0)
        )
        async with w.controller.running():
            w.controller.deploy(make_record(keep_alive_s=1.0))
            assert value_of(await w.request(1.0)) == 1.0
            await w.pause(2.0)  # the stop raised
            assert w.controller.get("m").dispatcher.slots == {}
            assert value_of(await w.request(2.0)) == 2.0

    run(main())


def test_a_pre_warm_is_made_once_per_named_time() -> None:
    class Prewarm(FixedKeepAlive):
        def prewarm_at(self, function: str, now: float) -> float | None:
            return 10.0

    async def main() -> None:
        w = World()
        w.controller = Controller(
            w.backend, w.channels, w.clock, ServingSettings(tick_s=TICK), NullMetrics(), Prewarm(1.0)
        )
        async with w.controller.running():
            # the function's own keep_alive_s would forbid pre-warming: use the policy's
            w.controller.deploy(make_record(keep_alive_s=None))
            await w.pause(8.9)
            assert w.backend.starts == []
            await w.pause(0.4)  # within the start estimate (1 s) of 10.0
            assert w.backend.starts == ["m"]
            await w.pause(30.0)  # stopped after its keep-alive, not pre-warmed again for 10.0
            assert w.backend.starts == ["m"]
            assert w.backend.running == {}
            assert w.controller.get("m").prewarms == 1
            assert not math.isinf(w.controller.get("m").prewarmed_for)

    run(main())
