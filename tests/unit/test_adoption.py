"""Adoption of the instances a killed platform left running: the pure choice, and
:meth:`Controller.restore` with a fake backend on a virtual clock."""

from __future__ import annotations

import asyncio

from test_controller import World, make_record, run, value_of

from smss.config import ServingSettings
from smss.control.adoption import choose
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive
from smss.errors import InstanceLost
from smss.ports import InstanceInfo, RunningInstance
from smss.testing.fakes import FakeBackend, NullMetrics


def left(
    instance_id: str, function: str = "m", artifact_dir: str = "/nonexistent", at: float = 0.0
) -> RunningInstance:
    info = InstanceInfo(instance_id, function, "local", f"fake:{instance_id}", 20_000, at)
    return RunningInstance(info, artifact_dir)


def test_choose_adopts_the_current_generation_up_to_max_instances_and_stops_the_rest() -> None:
    records = {"m": make_record(max_instances=2)}
    found = [
        left("m-c", at=3.0),
        left("m-a", at=1.0),
        left("m-b", at=2.0),
        left("m-old", artifact_dir="/old-generation"),
        left("gone-1", function="gone"),
    ]
    choice = choose(found, records)
    assert [r.info.id for r in choice.adopt] == ["m-a", "m-b"]  # the oldest two
    reasons = {r.info.id: why for r, why in choice.stop}
    assert set(reasons) == {"m-c", "m-old", "gone-1"}
    assert "at most 2" in reasons["m-c"]
    assert "redeployed" in reasons["m-old"]
    assert "not deployed" in reasons["gone-1"]


def test_restore_adopts_instances_into_routing_without_starting_others() -> None:
    async def main() -> None:
        w = World()
        w.backend.left_running = [left("m-a", at=1.0), left("m-b", at=2.0), left("m-c", at=3.0)]
        async with w.controller.running():
            # min_instances 2: a reconcile that did not count the adoptions would start two more.
            await w.controller.restore([make_record(min_instances=2, max_instances=2)])
            await w.pause(1.0)
            d = w.controller.get("m").dispatcher
            assert set(d.slots) == {"m-a", "m-b"}
            assert w.backend.starts == []
            assert [iid for iid, _ in w.backend.stops] == ["m-c"]
            results = await asyncio.gather(*(w.request(float(k)) for k in range(4)))
            assert sorted(value_of(r) for r in results) == [0.0, 1.0, 2.0, 3.0]
            assert w.backend.starts == []
            served = {iid: ch.calls for iid, ch in w.channels.by_id.items()}
            assert set(served) == {"m-a", "m-b"}

    run(main())


def test_an_unreachable_instance_is_stopped_and_a_fresh_one_started() -> None:
    async def main() -> None:
        w = World()
        w.backend.left_running = [left("m-a")]
        w.channels.fail_next(InstanceLost("connection refused"))
        async with w.controller.running():
            await w.controller.restore([make_record(min_instances=1)])
            await w.pause(1.0)
            assert [iid for iid, _ in w.backend.stops] == ["m-a"]
            assert w.backend.starts == ["m"]  # min_instances is met by a new start
            assert value_of(await w.request(5.0)) == 5.0

    run(main())


def test_a_recovery_that_fails_leaves_the_functions_deployed_and_serving() -> None:
    class Broken(FakeBackend):
        async def recover(self) -> list[RunningInstance]:
            raise OSError("the run directory is unreadable")

    async def main() -> None:
        w = World()
        w.backend = Broken(w.clock)
        w.controller = Controller(
            w.backend, w.channels, w.clock, ServingSettings(tick_s=0.2), NullMetrics(), FixedKeepAlive(300.0)
        )
        async with w.controller.running():
            await w.controller.restore([make_record()])
            assert value_of(await w.request(7.0)) == 7.0
            assert w.backend.starts == ["m"]

    run(main())
