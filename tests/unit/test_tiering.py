"""The live side of the tiers: the controller applying the policy's tier decisions
through a fake tier backend, on a virtual clock, and metering what is resident."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from smss.config import ServingSettings
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive, KeepAlivePolicy
from smss.control.metering import Meter
from smss.control.reconcile import Commands
from smss.control.tiered import TieredKeepAlive
from smss.control.tiering import TierKeeper
from smss.control.tiers import Tier
from smss.errors import Conflict
from smss.ports import FunctionRecord
from smss.spec import FunctionSpec, Resources, Scaling, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.fakes import FakeBackend, FakeChannels, NullMetrics
from smss.testing.tiers import FakeTiers

T = TypeVar("T")
TICK = 0.2
ART = Path("/nonexistent")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30.0))  # wall-time guard only


def record(name: str = "m", runtime: str = "torch") -> FunctionRecord:
    spec = FunctionSpec(
        name=name,
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        runtime=runtime,  # type: ignore[arg-type]
        scaling=Scaling(max_instances=2),
        resources=Resources(),
    ).validate()
    return FunctionRecord(spec, "/nonexistent", 0.0)


class World:
    def __init__(self, policy: KeepAlivePolicy) -> None:
        self.clock = FakeClock(autojump=True)
        self.backend = FakeBackend(self.clock)
        self.tiers = FakeTiers(self.backend)
        self.controller = Controller(
            self.backend,
            FakeChannels(),
            self.clock,
            ServingSettings(tick_s=TICK, drain_grace_s=1.0),
            NullMetrics(),
            policy,
            tiers=self.tiers,
        )

    async def pause(self, seconds: float = TICK) -> None:
        await self.clock.sleep(seconds)

    async def call(self, name: str = "m") -> None:
        d = self.controller.get(name).dispatcher
        await d.infer({"x": np.zeros(1, np.float32)}, ("y",), self.clock.monotonic() + 60.0)


def test_a_function_deployed_under_the_tiered_policy_is_built_to_standby() -> None:
    async def main() -> None:
        w = World(TieredKeepAlive(600.0))
        async with w.controller.running():
            w.controller.deploy(record())
            await w.pause(1.0)
            assert w.tiers.steps == [("m", Tier.STANDBY)]
            assert w.controller.tier("m") == Tier.STANDBY
            assert w.backend.starts == []  # built, not started
            await w.call()
            assert w.controller.tier("m") == Tier.WARM

    run(main())


def test_under_fixed_nothing_is_built_ahead_or_released() -> None:
    async def main() -> None:
        w = World(FixedKeepAlive(1.0))
        async with w.controller.running():
            w.controller.deploy(record())
            await w.pause(1.0)
            assert w.controller.tier("m") == Tier.NO_RUNTIME
            await w.call()
            w.tiers.held["m"] = Tier.STANDBY  # what the node keeps after a start
            await w.pause(30.0)  # scaled to zero long ago
            assert not w.backend.running
            assert w.tiers.steps == []
            assert w.controller.tier("m") == Tier.STANDBY

    run(main())


def test_stepping_down_is_metered_and_the_last_claim_stops_the_runtime() -> None:
    async def main() -> None:
        tiers, meter = FakeTiers(), Meter()
        tasks: list[asyncio.Task[None]] = []
        keeper = TierKeeper(tiers, meter, lambda coro: tasks.append(asyncio.ensure_future(coro)))
        a, b = record("a"), record("b")
        for r in (a, b):
            keeper.track(r.spec)
            keeper.apply(r.spec, ART, Commands(step_to=Tier.STANDBY))
        await asyncio.gather(*tasks)
        keeper.meter(0.0)
        assert keeper.holds("a") == keeper.holds("b") == Tier.STANDBY
        # a: template and weights go; it keeps its claim on the runtime at cold
        keeper.apply(a.spec, ART, Commands(step_to=Tier.COLD))
        await asyncio.gather(*tasks)
        keeper.meter(10.0)
        assert tiers.held == {"b": Tier.STANDBY}
        assert keeper.holds("a") == Tier.COLD
        usage = meter.usage(20.0)
        assert usage["a"].standby_gb_s == pytest.approx(10.0 * (10.0 + 5.0) / 1024)  # nothing after 10 s
        assert usage["b"].standby_gb_s == pytest.approx(20.0 * (10.0 + 5.0) / 1024)
        assert meter.overhead(20.0)["runtime:torch"] == pytest.approx(20.0 * 100.0 / 1024)
        # both give up their claims: the zygote stops, and is metered no more
        for r in (a, b):
            keeper.apply(r.spec, ART, Commands(step_to=Tier.NO_RUNTIME))
        await asyncio.gather(*tasks)
        keeper.settle_runtimes(busy=())
        await asyncio.gather(*tasks)
        keeper.meter(30.0)
        assert tiers.stopped == ["torch"]
        assert keeper.tier("a") == keeper.tier("b") == Tier.NO_RUNTIME
        assert meter.holds() == {}
        assert meter.overhead(40.0)["runtime:torch"] == pytest.approx(30.0 * 100.0 / 1024)

    run(main())


def test_a_runtime_stays_while_a_function_of_it_runs_or_claims_it() -> None:
    async def main() -> None:
        tiers = FakeTiers()
        tasks: list[asyncio.Task[None]] = []
        keeper = TierKeeper(tiers, Meter(), lambda coro: tasks.append(asyncio.ensure_future(coro)))
        a, b = record("a"), record("b", runtime="onnx")
        keeper.track(a.spec)
        keeper.track(b.spec)
        tiers.running.update({"torch", "onnx"})
        keeper.started("a")
        keeper.settle_runtimes(busy=["b"])  # a claims torch; b runs on onnx
        await asyncio.gather(*tasks)
        assert tiers.stopped == []
        keeper.settle_runtimes(busy=[])  # b never claimed onnx and runs no more
        await asyncio.gather(*tasks)
        assert tiers.stopped == ["onnx"]

    run(main())


def test_forcing_a_tier_waits_for_it_and_no_runtime_refuses_while_the_runtime_runs() -> None:
    async def main() -> None:
        w = World(FixedKeepAlive(0.5))
        async with w.controller.running():
            w.controller.deploy(record("a"))
            w.controller.deploy(record("b"))
            await w.controller.step_tier("a", Tier.STANDBY)
            assert w.controller.tier("a") == Tier.STANDBY
            await w.controller.step_tier("a", Tier.RESIDENT)
            assert w.controller.tier("a") == Tier.RESIDENT
            w.controller.ensure_instance("b")
            await w.pause(TICK)
            with pytest.raises(Conflict):
                await w.controller.step_tier("b", Tier.COLD)  # it has an instance
            with pytest.raises(Conflict):
                await w.controller.step_tier("a", Tier.NO_RUNTIME)  # b runs on torch
            await w.pause(5.0)  # b scales to zero
            await w.controller.step_tier("a", Tier.NO_RUNTIME)
            assert w.controller.tier("a") == Tier.NO_RUNTIME
            assert w.tiers.stopped == ["torch"]

    run(main())


def test_a_failed_build_ahead_of_demand_is_not_retried_every_tick() -> None:
    async def main() -> None:
        w = World(TieredKeepAlive(600.0))
        w.tiers.fail_builds = 100
        async with w.controller.running():
            w.controller.deploy(record())
            await w.pause(10.0)  # 50 ticks
            assert w.tiers.steps == [("m", Tier.STANDBY)]
            assert w.controller.tier("m") == Tier.NO_RUNTIME
            await w.pause(30.0)  # the retry is due
            assert len(w.tiers.steps) == 2
            w.tiers.fail_builds = 0
            await w.pause(31.0)
            assert w.controller.tier("m") == Tier.STANDBY

    run(main())
