"""The controller loop with a fake backend, fake channels and a frozen fake clock.

Decisions read the fake clock (back-off, keep-alive), which moves only when a
test advances it; the loop itself ticks on real asyncio timeouts of 10 ms, so
tests wait for effects with :func:`eventually` (polling every millisecond,
bounded) rather than fixed sleeps. Only :func:`quiet` waits on purpose, a few
ticks, to show that something does *not* happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from smss.config import ServingSettings
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive
from smss.errors import InstanceLost, NotFound, StartFailed
from smss.ports import FunctionRecord, InstanceInfo
from smss.spec import FunctionSpec, Scaling, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.fakes import FakeBackend, FakeChannel, FakeChannels, NullMetrics

T = TypeVar("T")
TICK = 0.01
LONG = 5.0  # a request deadline that is never meant to pass


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10.0))


async def eventually(cond: Callable[[], bool], within_s: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.001)


async def quiet(ticks: int = 5) -> None:
    await asyncio.sleep(ticks * TICK)


def make_record(generation: int = 1, **scaling: Any) -> FunctionRecord:
    spec = FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        scaling=Scaling(**{"keep_alive_s": 300.0, **scaling}),
    ).validate()
    return FunctionRecord(spec, "/nonexistent", 0.0, generation)


class World:
    def __init__(self, make_channel: Callable[[InstanceInfo], FakeChannel] | None = None) -> None:
        self.clock = FakeClock()
        self.backend = FakeBackend(self.clock)
        self.channels = FakeChannels(make_channel)
        self.controller = Controller(
            self.backend,
            self.channels,
            self.clock,
            ServingSettings(tick_s=TICK, drain_grace_s=1.0),
            NullMetrics(),
            FixedKeepAlive(300.0),
        )

    def request(self, value: float, timeout: float = LONG) -> asyncio.Task[dict[str, np.ndarray]]:
        dispatcher = self.controller.get("m").dispatcher
        inputs = {"x": np.array([value], dtype=np.float32)}
        return asyncio.create_task(dispatcher.infer(inputs, ("y",), self.clock.monotonic() + timeout))

    def started(self, n: int) -> Callable[[], bool]:
        return lambda: len(self.backend.starts) == n

    def held(self) -> list[Any]:
        return [call for ch in self.channels.by_id.values() for call in ch.held]


def value_of(result: dict[str, np.ndarray]) -> float:
    return float(result["y"][0])


def blocked(info: InstanceInfo) -> FakeChannel:
    return FakeChannel(info=info, blocked=True)


def test_request_at_zero_starts_exactly_one_instance_and_is_served() -> None:
    async def main() -> None:
        w = World()
        async with w.controller.running():
            w.controller.deploy(make_record())
            await quiet()
            assert w.backend.starts == []  # nothing runs before there is demand
            assert value_of(await w.request(3.0)) == 3.0
            await quiet()
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
            await eventually(lambda: len(w.held()) == 3)
            await quiet()
            assert len(w.backend.starts) == 3
            while not all(t.done() for t in tasks):
                for call in w.held():
                    call.release()
                await asyncio.sleep(0.001)
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
            await eventually(lambda: w.channels.by_id[first].closed)
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
            await eventually(lambda: len(w.held()) == 1)
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
            await eventually(w.started(1))
            for backoff in (0.5, 1.0, 2.0):
                attempts = len(w.backend.starts)
                await quiet()
                w.clock.advance(backoff - 0.01)
                await quiet()
                assert len(w.backend.starts) == attempts  # not before the back-off elapsed
                w.clock.advance(0.01)
                await eventually(w.started(attempts + 1))
            await eventually(lambda: len(w.backend.running) == 1)
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
            await quiet()
            assert len(w.backend.starts) == 1
            w.clock.advance(0.5)
            assert value_of(await w.request(3.0)) == 3.0
            assert len(w.backend.starts) == 2

    run(main())


def test_redeploy_drains_and_stops_the_old_generation() -> None:
    async def main() -> None:
        w = World(lambda info: FakeChannel(info=info, blocked=info.id == "m-1"))
        async with w.controller.running():
            w.controller.deploy(make_record(generation=1))
            old = w.request(1.0)
            await eventually(lambda: len(w.held()) == 1)
            w.controller.deploy(make_record(generation=2))
            await quiet()
            assert w.backend.stops == []  # draining: its request is still in flight
            assert value_of(await w.request(2.0)) == 2.0  # served by the new generation
            assert "m-2" in w.backend.running
            w.channels.by_id["m-1"].release_all()
            assert value_of(await old) == 1.0
            await eventually(lambda: "m-1" not in w.backend.running)
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
            await eventually(lambda: len(w.backend.starts) == 1)
            w.controller.remove("m")
            for t in tasks:
                with pytest.raises(NotFound, match="deleted"):
                    await t
            with pytest.raises(NotFound):
                w.controller.get("m")
            w.backend.start_gate.set()  # the start finishes after the delete...
            await eventually(lambda: w.backend.stops != [])
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
            w.clock.advance(0.5)
            assert value_of(await w.request(2.0)) == 2.0

    run(main())


def test_idle_instance_is_stopped_after_its_keep_alive() -> None:
    async def main() -> None:
        w = World()
        async with w.controller.running():
            w.controller.deploy(make_record(keep_alive_s=30.0))
            assert value_of(await w.request(1.0)) == 1.0
            w.clock.advance(29.9)
            await quiet()
            assert w.backend.stops == []
            w.clock.advance(0.1)
            await eventually(lambda: w.backend.running == {})
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
            await eventually(lambda: len(w.held()) == 1)
            w.clock.advance(60.0)  # a minute with one request in flight
            await quiet()
            assert w.controller.get("m").autoscaler.desired(w.clock.monotonic(), 1) == 1
            burst = [w.request(float(k)) for k in range(1, 4)]
            await eventually(lambda: len(w.held()) == 4)
            assert len(w.backend.starts) == 4
            for call in w.held():
                call.release()
            results = [value_of(await t) for t in (first, *burst)]
            assert results == [0.0, 1.0, 2.0, 3.0]

    run(main())
