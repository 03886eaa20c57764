"""The live controller and the simulator make the same decisions on the same trace.

One trace is run twice: through the live controller (its real dispatcher and
router, a fake backend whose starts take ``COLD_S`` on a virtual clock, fake
channels that hold each request for its trace duration on that clock) and through
the simulator with the same settings. Both call :func:`smss.control.reconcile.reconcile`;
this test requires that, per function, they decide the same sequence of starts and
stops at the same times, within one controller tick (the live loop stops an
expired instance at its first tick after the expiry, the simulator at the expiry).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from smss.config import ServingSettings
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive
from smss.inventory import Capacity, Device, NodeInventory
from smss.ports import FunctionRecord, Tensors
from smss.sim.config import SimConfig
from smss.sim.simulator import Simulation
from smss.sim.trace import Trace
from smss.spec import FunctionSpec, Resources, Scaling, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.fakes import FakeBackend, FakeChannel, FakeChannels, NullMetrics

TICK = 0.2
COLD_S = 0.3
TTL_S = 5.0
MAX_INSTANCES = 3

# (arrival s, function, duration s): sparse calls that scale to zero in between,
# functions that overlap in time and, on a small node, compete for its cores.
ROWS = [
    (1.0, "a", 2.0),
    (1.6, "b", 0.5),
    (1.7, "c", 0.5),
    (4.0, "b", 0.5),
    (9.0, "a", 1.0),
    (15.0, "b", 3.0),
    (15.4, "c", 0.2),
    (16.0, "a", 0.5),
    (30.0, "c", 0.2),
    (30.5, "c", 0.2),
    (31.0, "a", 4.0),
]
# A burst of three within 0.2 s panics the autoscaler: both sides must panic alike.
BURSTY = [
    (1.0, "a", 2.0),
    (1.1, "a", 2.0),
    (1.2, "a", 2.0),
    (1.5, "b", 0.5),
    (4.0, "b", 0.5),
    (9.0, "a", 1.0),
    (15.0, "b", 3.0),
    (15.2, "b", 3.0),
    (15.4, "c", 0.2),
    (16.0, "a", 0.5),
    (30.0, "c", 0.2),
    (30.1, "c", 0.2),
    (30.2, "c", 0.2),
    (30.3, "c", 0.2),
    (31.0, "a", 4.0),
]

Decisions = dict[str, list[tuple[str, float]]]


def record(name: str, cpu: float) -> FunctionRecord:
    spec = FunctionSpec(
        name=name,
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        scaling=Scaling(concurrency=1, max_instances=MAX_INSTANCES),
        resources=Resources(cpu=cpu, memory_mb=512),
    ).validate()
    return FunctionRecord(spec, "/nonexistent", 0.0)


def live(nodes: int | None, cpus: float, rows: list[tuple[float, str, float]] = ROWS) -> Decisions:
    async def main() -> Decisions:
        clock = FakeClock(autojump=True)
        inventories = ()
        if nodes is not None:
            cap = Capacity(cpu=cpus, memory_mb=1 << 16)
            inventories = tuple(
                NodeInventory(f"node-{k}", (Device("cpu", 0, "cpu", cap, cap),)) for k in range(nodes)
            )
        backend = FakeBackend(clock, inventories=inventories, start_s=COLD_S)

        def service(inputs: Tensors) -> float:
            return float(inputs["x"][0])

        channels = FakeChannels(lambda info: FakeChannel(info=info, clock=clock, service_s=service))
        controller = Controller(
            backend,
            channels,
            clock,
            ServingSettings(tick_s=TICK, request_timeout_s=1e6),
            NullMetrics(),
            FixedKeepAlive(TTL_S),
        )
        ids: dict[str, str] = {}
        async with controller.running():
            for name in ("a", "b", "c"):
                controller.deploy(record(name, 1.0))
            tasks = []
            for t, name, duration in rows:
                await clock.sleep(t - clock.monotonic())
                d = controller.get(name).dispatcher
                x = {"x": np.array([duration], dtype=np.float32)}
                tasks.append(asyncio.create_task(d.infer(x, ("y",), clock.monotonic() + 1e6)))
            await asyncio.gather(*tasks)
            await clock.sleep(TTL_S + 2.0)  # every instance idles out
            for iid, info in backend.running.items():
                ids[iid] = info.function
        out: Decisions = defaultdict(list)
        for name, at in zip(backend.starts, backend.start_times, strict=True):
            out[name].append(("start", at))
        for (iid, _), at in zip(backend.stops, backend.stop_times, strict=True):
            if at < 1e5:
                out[iid.rsplit("-", 1)[0]].append(("stop", at))
        return {k: sorted(v, key=lambda e: e[1]) for k, v in out.items()}

    return asyncio.run(main())


class RecordingSimulation(Simulation):
    """The simulator, noting each start and stop it applies."""

    def __init__(self, trace: Trace, config: SimConfig) -> None:
        super().__init__(trace, config)
        self.decisions: Decisions = defaultdict(list)

    def _start(self, fn: Any, now: float, alloc: Any) -> None:
        self.decisions[fn.name].append(("start", now))
        super()._start(fn, now, alloc)

    def _stop(self, fn: Any, instance_id: str, now: float) -> None:
        self.decisions[fn.name].append(("stop", now))
        super()._stop(fn, instance_id, now)


def simulated(nodes: int | None, cpus: float, rows: list[tuple[float, str, float]] = ROWS) -> Decisions:
    trace = Trace.from_rows((t * 1000.0, name, d * 1000.0) for t, name, d in rows)
    config = SimConfig(
        policy=f"fixed:{TTL_S}",
        cpu=1.0,
        memory_mb=512,
        concurrency=1,
        max_instances=MAX_INSTANCES,
        cold_start_ms=COLD_S * 1000,
        tick_s=TICK,
        nodes=nodes,
        cpus_per_node=cpus,
        memory_per_node_mb=1 << 16,
    )
    sim = RecordingSimulation(trace, config)
    sim.run()
    return dict(sim.decisions)


def assert_same(live_d: Decisions, sim_d: Decisions) -> None:
    assert sorted(live_d) == sorted(sim_d)
    for name in sim_d:
        sim_seq = sim_d[name]
        live_seq = live_d[name][: len(sim_seq)]  # the simulation ends with its last request
        assert [k for k, _ in live_seq] == [k for k, _ in sim_seq], name
        for (kind, at_live), (_, at_sim) in zip(live_seq, sim_seq, strict=True):
            assert at_sim - 1e-6 <= at_live <= at_sim + TICK + 1e-6, (name, kind, at_live, at_sim)
        assert sum(k == "start" for k, _ in sim_seq) >= 1


@pytest.mark.parametrize(
    ("nodes", "cpus"),
    [(None, 0.0), (1, 2.0)],
    ids=["unbounded", "one node of two cores"],
)
def test_live_controller_and_simulator_decide_the_same_starts_and_stops(
    nodes: int | None, cpus: float
) -> None:
    assert_same(live(nodes, cpus), simulated(nodes, cpus))


def test_a_burst_panics_both_autoscalers_alike() -> None:
    assert_same(live(None, 0.0, BURSTY), simulated(None, 0.0, BURSTY))
