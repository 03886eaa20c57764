"""Health checks and bounded start retries of the controller, on a virtual clock.

A stopped instance (``FakeChannel.stall()``: pings and requests go unanswered, as
after SIGSTOP) and a hung predict (a held request whose instance still answers
pings) are both taken out of rotation, killed (``stop_instance`` with no grace)
and replaced, and the requests they held are retried elsewhere or answered 503.
The clock autojumps, so the health interval, ping timeout and stall grace all
pass in virtual time.
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
from smss.errors import DeadlineExceeded, StartFailed, Unavailable
from smss.ports import FunctionRecord, InstanceInfo
from smss.spec import FunctionSpec, Scaling, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.fakes import FakeBackend, FakeChannel, FakeChannels, NullMetrics

T = TypeVar("T")
LONG = 1e6
SETTINGS = ServingSettings(
    tick_s=0.2,
    drain_grace_s=1.0,
    health_interval_s=1.0,
    ping_timeout_s=2.0,
    stall_grace_s=3.0,
    max_start_failures=4,
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30.0))  # wall-time guard only


def make_record(idempotent: bool = True, **scaling: Any) -> FunctionRecord:
    spec = FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        scaling=Scaling(**{"keep_alive_s": 300.0, "concurrency": 1, **scaling}),
        idempotent=idempotent,
    ).validate()
    return FunctionRecord(spec, "/nonexistent", 0.0, 1)


class World:
    def __init__(self, make_channel: Callable[[InstanceInfo], FakeChannel] | None = None) -> None:
        self.clock = FakeClock(autojump=True)
        self.backend = FakeBackend(self.clock)
        self.channels = FakeChannels(make_channel)
        self.controller = Controller(
            self.backend, self.channels, self.clock, SETTINGS, NullMetrics(), FixedKeepAlive(300.0)
        )

    async def pause(self, seconds: float) -> None:
        await self.clock.sleep(seconds)

    def request(self, value: float, timeout: float = LONG) -> asyncio.Task[dict[str, np.ndarray]]:
        dispatcher = self.controller.get("m").dispatcher
        inputs = {"x": np.array([value], dtype=np.float32)}
        return asyncio.create_task(dispatcher.infer(inputs, ("y",), self.clock.monotonic() + timeout))

    def killed(self) -> list[str]:
        """Instances stopped with no grace (killed)."""
        return [iid for iid, grace in self.backend.stops if grace == 0.0]


def value_of(result: dict[str, np.ndarray]) -> float:
    return float(result["y"][0])


def first_blocked(info: InstanceInfo) -> FakeChannel:
    return FakeChannel(info=info, blocked=info.id == "m-1")


def test_a_stopped_instance_is_replaced_and_its_request_served_elsewhere() -> None:
    async def main() -> None:
        w = World(first_blocked)
        async with w.controller.running():
            w.controller.deploy(make_record())
            task = w.request(5.0)
            await w.pause(0.5)
            first = w.channels.by_id["m-1"]
            assert len(first.held) == 1
            first.stall()  # SIGSTOP: no more pings answered
            stopped_at = w.clock.monotonic()
            assert value_of(await task) == 5.0  # retried on a replacement
            took = w.clock.monotonic() - stopped_at
            assert took <= SETTINGS.health_interval_s + SETTINGS.ping_timeout_s + SETTINGS.tick_s
            assert w.killed() == ["m-1"]
            assert "m-1" not in w.controller.get("m").dispatcher.slots
            assert w.channels.by_id["m-2"].calls == 1
            assert w.controller.get("m").replaced == 1
            assert value_of(await w.request(6.0)) == 6.0  # and it keeps serving

    run(main())


def test_a_stopped_idle_instance_is_replaced_before_it_takes_requests() -> None:
    async def main() -> None:
        w = World()
        async with w.controller.running():
            w.controller.deploy(make_record())
            assert value_of(await w.request(1.0)) == 1.0
            w.channels.by_id["m-1"].stall()
            await w.pause(SETTINGS.health_interval_s + SETTINGS.ping_timeout_s + 0.1)
            assert w.killed() == ["m-1"]
            assert w.controller.get("m").dispatcher.slots == {}
            assert value_of(await w.request(2.0)) == 2.0
            assert w.channels.by_id["m-1"].calls == 1

    run(main())


def test_a_hung_predict_gets_504_then_its_instance_is_replaced() -> None:
    """Pings are answered (the I/O thread lives) but predict never returns: the
    request gets its 504 at the deadline; the instance keeps its slot (it is still
    computing) until deadline + stall grace, then is killed and replaced."""

    async def main() -> None:
        w = World(first_blocked)
        async with w.controller.running():
            w.controller.deploy(make_record(max_instances=1))
            with pytest.raises(DeadlineExceeded):
                await w.request(1.0, timeout=2.0)
            deadline = w.clock.monotonic()
            slot = w.controller.get("m").dispatcher.slots["m-1"]
            assert slot.in_flight == 1  # held: the instance is still computing
            queued = w.request(2.0)  # waits: the only instance it may have is busy
            await w.pause(SETTINGS.stall_grace_s - 0.1)
            assert w.killed() == []
            assert w.channels.by_id["m-1"].calls == 1
            assert value_of(await queued) == 2.0  # served by the replacement
            assert w.killed() == ["m-1"]
            replaced_after = w.clock.monotonic() - deadline
            assert replaced_after <= SETTINGS.stall_grace_s + SETTINGS.health_interval_s + SETTINGS.tick_s
            assert w.channels.by_id["m-1"].pings > 0  # it did answer them
            assert w.channels.by_id["m-2"].calls == 1

    run(main())


def test_a_non_idempotent_request_on_a_stopped_instance_gets_503_naming_why() -> None:
    async def main() -> None:
        w = World(first_blocked)
        async with w.controller.running():
            w.controller.deploy(make_record(idempotent=False))
            task = w.request(5.0)
            await w.pause(0.5)
            w.channels.by_id["m-1"].stall()
            with pytest.raises(Unavailable, match="instance was lost") as e:
                await task
            assert e.value.retry_after_s is not None
            assert w.killed() == ["m-1"]
            assert value_of(await w.request(6.0)) == 6.0

    run(main())


def test_an_instance_lost_without_exiting_is_killed() -> None:
    """Its connection ended (or stopped taking requests) but no exit was seen: the
    process may live on, so the controller stops it rather than leak it."""

    async def main() -> None:
        w = World(first_blocked)
        async with w.controller.running():
            w.controller.deploy(make_record())
            task = w.request(5.0)
            await w.pause(0.5)
            w.channels.by_id["m-1"].lose()
            assert value_of(await task) == 5.0
            await w.pause(0.1)
            assert w.killed() == ["m-1"]
            assert "m-1" not in w.backend.running

    run(main())


def test_start_failures_give_up_after_the_limit_and_report_it() -> None:
    async def main() -> None:
        w = World()
        w.backend.fail_next(SETTINGS.max_start_failures, reason="weights truncated")
        async with w.controller.running():
            w.controller.deploy(make_record(min_instances=1))
            await w.pause(600.0)
            assert len(w.backend.starts) == SETTINGS.max_start_failures  # then no more
            d = w.controller.get("m").dispatcher
            assert d.gave_up
            with pytest.raises(StartFailed, match="weights truncated") as e:
                await w.request(1.0)
            assert "4 times in a row" in e.value.message
            assert len(w.backend.starts) == SETTINGS.max_start_failures  # a request starts nothing
            w.controller.load("m")  # the model was fixed: an explicit load tries again
            await w.pause(1.0)
            assert not d.gave_up
            assert value_of(await w.request(2.0)) == 2.0
            assert len(w.backend.starts) == SETTINGS.max_start_failures + 1

    run(main())
