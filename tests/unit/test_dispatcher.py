"""The gateway's per-function dispatcher with fake channels on a fake clock.

The dispatcher reads deadlines from the (frozen) fake clock, but its waits are
real asyncio timeouts of ``deadline - now`` seconds; tests that wait for a
deadline use a few milliseconds. Everything else is ordered by the test through
the fake channels' gates, never by sleeping.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.config import ServingSettings
from smss.control.dispatcher import DispatchHooks, FunctionDispatcher
from smss.errors import (
    DeadlineExceeded,
    InstanceLost,
    NotFound,
    Overloaded,
    StartFailed,
    Unavailable,
)
from smss.ports import InstanceInfo, Tensors
from smss.spec import FunctionSpec, Scaling, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.fakes import FakeChannel

T = TypeVar("T")
SHORT = 0.005  # a deadline (virtual time) that is meant to pass
LONG = 1e6  # a deadline (virtual time) that is never meant to pass


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10.0))


async def until(cond: Callable[[], bool], spins: int = 1000) -> None:
    """Let other tasks run until ``cond`` holds (no wall-clock time involved)."""
    for _ in range(spins):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def make_spec(concurrency: int = 1, idempotent: bool = True) -> FunctionSpec:
    return FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        scaling=Scaling(concurrency=concurrency, max_instances=8),
        idempotent=idempotent,
    ).validate()


def info(instance_id: str) -> InstanceInfo:
    return InstanceInfo(instance_id, "m", "local", f"fake:{instance_id}", 1, 0.0)


class Harness:
    def __init__(
        self, concurrency: int = 1, idempotent: bool = True, queue_limit: int = 256, seed: int = 0
    ) -> None:
        self.clock = FakeClock(autojump=True)
        self.demands = 0
        self.d = FunctionDispatcher(
            make_spec(concurrency, idempotent),
            self.clock,
            ServingSettings(queue_limit=queue_limit, retry_after_s=1.5),
            self._on_demand,
            random.Random(seed),
        )

    def _on_demand(self) -> None:
        self.demands += 1

    def add(self, instance_id: str, channel: FakeChannel | None = None) -> FakeChannel:
        channel = channel or FakeChannel()
        self.d.add(info(instance_id), channel)
        return channel

    def request(self, value: float, timeout: float = LONG) -> asyncio.Task[dict[str, np.ndarray]]:
        inputs = {"x": np.array([value], dtype=np.float32)}
        return asyncio.create_task(self.d.infer(inputs, ("y",), self.clock.monotonic() + timeout))


def value_of(result: dict[str, np.ndarray]) -> float:
    return float(result["y"][0])


# ---------------------------------------------------------------- concurrency


@settings(max_examples=25, deadline=None)
@given(
    instances=st.integers(1, 4),
    concurrency=st.integers(1, 3),
    requests=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_never_more_than_concurrency_requests_on_one_instance(
    instances: int, concurrency: int, requests: int, seed: int
) -> None:
    async def main() -> None:
        h = Harness(concurrency=concurrency, seed=seed)
        channels = [h.add(f"i{n}", FakeChannel(blocked=True)) for n in range(instances)]
        tasks = [h.request(float(k)) for k in range(requests)]
        rng = random.Random(seed)
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0)
            assert all(s.in_flight <= concurrency for s in h.d.slots.values())
            held = [call for ch in channels for call in ch.held]
            if held:
                rng.choice(held).release()  # complete in random order
        assert [value_of(t.result()) for t in tasks] == [float(k) for k in range(requests)]
        assert max(ch.peak for ch in channels) <= concurrency
        assert h.d.in_flight == 0
        assert h.d.queued == 0
        # Busy enough to fill every slot: the pool was used up to its limit.
        if requests >= instances * concurrency:
            assert sum(ch.peak for ch in channels) == instances * concurrency

    run(main())


# ---------------------------------------------------------------- admission


def test_full_queue_answers_overloaded_at_once() -> None:
    async def main() -> None:
        h = Harness(queue_limit=2)
        ch = h.add("a", FakeChannel(blocked=True))
        tasks = [h.request(float(k)) for k in range(3)]
        await until(lambda: h.d.queued == 2)
        with pytest.raises(Overloaded) as e:
            await h.request(9.0)
        assert e.value.retry_after_s == 1.5
        for _ in range(3):
            await until(lambda: bool(ch.held))
            ch.release_all()
        assert [value_of(await t) for t in tasks] == [0.0, 1.0, 2.0]

    run(main())


def test_request_still_queued_at_its_deadline_is_unavailable() -> None:
    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(blocked=True))
        first = h.request(1.0)
        await until(lambda: bool(ch.held))
        with pytest.raises(Unavailable) as e:
            await h.request(2.0, timeout=SHORT)
        assert type(e.value) is Unavailable
        assert e.value.retry_after_s == 1.5
        assert h.d.queued == 0
        ch.release_all()
        assert value_of(await first) == 1.0
        assert ch.calls == 1  # the expired request never reached the instance

    run(main())


def test_request_with_no_instance_asks_for_one_then_times_out() -> None:
    async def main() -> None:
        h = Harness()
        with pytest.raises(Unavailable):
            await h.request(1.0, timeout=SHORT)
        assert h.demands == 1

    run(main())


def test_request_in_flight_past_its_deadline_is_deadline_exceeded_and_keeps_its_slot() -> None:
    """The instance is still computing the timed-out request: its slot stays taken
    until it answers, so the next request waits instead of being sent beside it."""

    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(blocked=True))
        with pytest.raises(DeadlineExceeded):
            await h.request(1.0, timeout=SHORT)
        assert h.d.in_flight == 1
        assert h.d.slots["a"].abandoned == 1
        second = h.request(2.0)
        await until(lambda: h.d.queued == 1)
        assert ch.calls == 1  # not sent while the instance still computes the first
        ch.release_all()  # the late answer of the first frees the slot for the second
        await until(lambda: bool(ch.held))
        assert h.d.slots["a"].abandoned == 0
        ch.release_all()
        assert value_of(await second) == 2.0
        assert ch.peak == 1
        assert h.d.in_flight == 0

    run(main())


def test_a_caller_gone_mid_flight_keeps_the_slot_until_the_instance_answers() -> None:
    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(blocked=True))
        gone = h.request(1.0)
        await until(lambda: bool(ch.held))
        gone.cancel()  # the client disconnected
        await asyncio.gather(gone, return_exceptions=True)
        assert h.d.in_flight == 1
        second = h.request(2.0)
        await until(lambda: h.d.queued == 1)
        ch.release_all()
        await until(lambda: bool(ch.held))
        ch.release_all()
        assert value_of(await second) == 2.0
        assert ch.peak == 1

    run(main())


@settings(max_examples=25, deadline=None)
@given(
    concurrency=st.integers(1, 3),
    requests=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_timeouts_never_let_an_instance_hold_more_than_its_concurrency(
    concurrency: int, requests: int, seed: int
) -> None:
    async def main() -> None:
        h = Harness(concurrency=concurrency, seed=seed)
        ch = h.add("a", FakeChannel(blocked=True))
        rng = random.Random(seed)
        tasks = [h.request(float(k), timeout=rng.choice([SHORT, LONG])) for k in range(requests)]
        while not all(t.done() for t in tasks) or ch.held:
            await h.clock.sleep(SHORT / 4)  # virtual time passes: SHORT deadlines expire
            assert ch.in_flight <= concurrency
            if ch.held and rng.random() < 0.3:
                rng.choice(ch.held).release()
        await until(lambda: h.d.in_flight == 0)  # every late answer gave its slot back
        assert ch.peak <= concurrency

    run(main())


# ---------------------------------------------------------------- stalled instances


def test_an_instance_past_a_deadline_plus_grace_is_stalled() -> None:
    async def main() -> None:
        h = Harness(concurrency=2)
        grace = ServingSettings().stall_grace_s
        a = h.add("a", FakeChannel(blocked=True))
        b = h.add("b", FakeChannel(blocked=True))
        with pytest.raises(DeadlineExceeded):
            await h.request(1.0, timeout=1.0)
        await until(lambda: len(a.held) + len(b.held) == 1)
        stuck = "a" if a.held else "b"
        deadline = h.clock.monotonic()  # the request timed out just now
        assert deadline == 1.0
        assert h.d.stalled(deadline + grace - 0.01) == []
        assert [s.info.id for s in h.d.stalled(deadline + grace)] == [stuck]
        (a if a.held else b).release_all()  # it answered after all: not stalled any more
        await until(lambda: h.d.in_flight == 0)
        assert h.d.stalled(deadline + 100.0) == []

    run(main())


def test_a_lost_instance_leaves_rotation_and_is_reported_once() -> None:
    async def main() -> None:
        lost: list[tuple[str, str]] = []
        h = Harness(concurrency=2)
        h.d = FunctionDispatcher(
            make_spec(2),
            h.clock,
            ServingSettings(retry_after_s=1.5),
            lambda: None,
            random.Random(0),
            DispatchHooks(on_lost=lambda slot, why: lost.append((slot.info.id, why))),
        )
        a = h.add("a", FakeChannel(blocked=True))
        tasks = [h.request(1.0), h.request(2.0)]
        await until(lambda: len(a.held) == 2)
        b = h.add("b")
        a.lose()
        assert [value_of(await t) for t in tasks] == [1.0, 2.0]  # both retried on b
        assert b.calls == 2
        assert [iid for iid, _ in lost] == ["a"]
        assert set(h.d.slots) == {"b"}

    run(main())


def test_an_abandoned_request_whose_instance_is_lost_reports_it() -> None:
    """Nobody waits on the request any more, but its failure still says the instance
    is gone: it must leave rotation rather than take the next request."""

    async def main() -> None:
        lost: list[str] = []
        h = Harness()
        h.d = FunctionDispatcher(
            make_spec(1),
            h.clock,
            ServingSettings(),
            lambda: None,
            random.Random(0),
            DispatchHooks(on_lost=lambda slot, why: lost.append(slot.info.id)),
        )
        a = h.add("a", FakeChannel(blocked=True))
        with pytest.raises(DeadlineExceeded):
            await h.request(1.0, timeout=SHORT)
        a.lose()
        await until(lambda: bool(lost))
        assert lost == ["a"]
        assert h.d.slots == {}
        assert h.d.in_flight == 0

    run(main())


# ---------------------------------------------------------------- lost instances


def test_instance_lost_mid_flight_is_retried_on_another_instance() -> None:
    async def main() -> None:
        h = Harness(idempotent=True)
        a = h.add("a", FakeChannel(blocked=True))
        task = h.request(7.0)
        await until(lambda: bool(a.held))
        b = h.add("b")
        a.lose()
        assert value_of(await task) == 7.0
        assert b.calls == 1
        assert set(h.d.slots) == {"b"}  # the dead instance is gone

    run(main())


def test_instance_lost_is_unavailable_when_not_idempotent() -> None:
    async def main() -> None:
        h = Harness(idempotent=False)
        a = h.add("a", FakeChannel(blocked=True))
        task = h.request(7.0)
        await until(lambda: bool(a.held))
        b = h.add("b")
        a.lose()
        with pytest.raises(Unavailable) as e:
            await task
        assert e.value.retry_after_s == 1.5
        assert b.calls == 0

    run(main())


def test_instance_lost_twice_is_unavailable() -> None:
    async def main() -> None:
        h = Harness(idempotent=True)
        a = h.add("a", FakeChannel(blocked=True))
        task = h.request(7.0)
        await until(lambda: bool(a.held))
        b = h.add("b")
        b.fail_next(InstanceLost("b died too"))
        a.lose()
        with pytest.raises(Unavailable):
            await task
        assert b.calls == 1
        assert h.d.slots == {}

    run(main())


def test_instance_lost_with_no_other_instance_waits_for_one() -> None:
    async def main() -> None:
        h = Harness(idempotent=True)
        a = h.add("a", FakeChannel(blocked=True))
        task = h.request(7.0)
        await until(lambda: bool(a.held))
        a.lose()
        await until(lambda: h.d.queued == 1)  # the retry waits and asks for an instance
        assert h.demands == 1
        h.add("b")
        assert value_of(await task) == 7.0

    run(main())


# ---------------------------------------------------------------- start failures


def test_start_failure_fails_waiters_and_new_requests_fail_fast_during_backoff() -> None:
    async def main() -> None:
        h = Harness()
        waiters = [h.request(float(k)) for k in range(3)]
        await until(lambda: h.d.queued == 3)
        h.d.start_failed(StartFailed("model 'm' failed to load: boom"), backoff_s=2.0)
        for w in waiters:
            with pytest.raises(StartFailed, match="boom") as e:
                await w
            assert e.value.retry_after_s == 2.0
        demands = h.demands
        h.clock.advance(0.5)
        with pytest.raises(StartFailed, match="boom") as e:
            await h.request(1.0)  # fails at once: no queueing, no new start asked for
        assert e.value.retry_after_s == pytest.approx(1.5)
        assert h.demands == demands
        assert h.d.queued == 0
        h.clock.advance(1.5)  # back-off over: requests queue and ask for an instance again
        task = h.request(4.0)
        await until(lambda: h.d.queued == 1)
        assert h.demands == demands + 1
        h.add("a")
        assert value_of(await task) == 4.0
        assert h.d.start_error is None

    run(main())


def test_start_failure_keeps_waiters_while_another_start_runs() -> None:
    async def main() -> None:
        h = Harness()
        task = h.request(1.0)
        await until(lambda: h.d.queued == 1)
        h.d.starting = 1  # the controller has a second start under way
        h.d.start_failed(StartFailed("boom"), backoff_s=2.0)
        await asyncio.sleep(0)
        assert not task.done()
        h.d.starting = 0
        h.add("a")
        assert value_of(await task) == 1.0

    run(main())


def test_start_failure_with_a_live_instance_does_not_fail_fast() -> None:
    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(blocked=True))
        first = h.request(1.0)
        await until(lambda: bool(ch.held))
        h.d.start_failed(StartFailed("boom"), backoff_s=2.0)
        second = h.request(2.0)  # queues behind the live instance
        await until(lambda: h.d.queued == 1)
        ch.release_all()
        await until(lambda: bool(ch.held))
        ch.release_all()
        assert [value_of(await first), value_of(await second)] == [1.0, 2.0]

    run(main())


# ---------------------------------------------------------------- close, FIFO, wake-up


def test_close_fails_waiters_with_not_found() -> None:
    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(blocked=True))
        first = h.request(1.0)
        waiters = [h.request(float(k)) for k in range(2, 5)]
        await until(lambda: h.d.queued == 3)
        h.d.close("model 'm' was deleted")
        for w in waiters:
            with pytest.raises(NotFound, match="deleted"):
                await w
        with pytest.raises(NotFound):
            await h.request(5.0)
        ch.release_all()  # what was in flight still completes
        assert value_of(await first) == 1.0

    run(main())


def test_waiters_are_served_fifo_when_a_slot_frees() -> None:
    order: list[float] = []

    def record(inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        order.append(float(inputs["x"][0]))
        return {"y": np.array(inputs["x"])}

    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(record, blocked=True))
        tasks = []
        for k in range(6):
            tasks.append(h.request(float(k)))
            await until(lambda: len(ch.held) + h.d.queued == len(tasks))
        for _ in tasks:
            await until(lambda: bool(ch.held))
            ch.release_all()
        await asyncio.gather(*tasks)
        assert order == [float(k) for k in range(6)]

    run(main())


def test_adding_an_instance_wakes_waiters() -> None:
    async def main() -> None:
        h = Harness(concurrency=2)
        tasks = [h.request(float(k)) for k in range(3)]
        await until(lambda: h.d.queued == 3)
        assert h.demands == 3
        ch = h.add("a", FakeChannel(blocked=True))
        await until(lambda: len(ch.held) == 2)  # two slots: two waiters served at once
        assert h.d.queued == 1
        ch.release_all()
        await until(lambda: len(ch.held) == 1)
        ch.release_all()
        assert [value_of(await t) for t in tasks] == [0.0, 1.0, 2.0]

    run(main())


def test_draining_instance_takes_no_new_requests() -> None:
    async def main() -> None:
        h = Harness()
        a = h.add("a", FakeChannel(blocked=True))
        first = h.request(1.0)
        await until(lambda: bool(a.held))
        slot = h.d.drain("a")
        assert slot is not None
        assert not slot.drained.is_set()
        second = h.request(2.0)
        await until(lambda: h.d.queued == 1)
        a.release_all()
        assert value_of(await first) == 1.0
        assert slot.drained.is_set()
        assert not second.done()
        assert a.calls == 1
        h.add("b")
        assert value_of(await second) == 2.0

    run(main())


def test_cancelled_waiter_does_not_keep_a_slot() -> None:
    """A queued request whose caller went away (client disconnect) must not be
    handed the next free slot: that slot would never be released again."""

    async def main() -> None:
        h = Harness()
        ch = h.add("a", FakeChannel(blocked=True))
        first = h.request(1.0)
        await until(lambda: bool(ch.held))
        abandoned = h.request(2.0)
        await until(lambda: h.d.queued == 1)
        abandoned.cancel()
        await asyncio.gather(abandoned, return_exceptions=True)
        ch.release_all()
        assert value_of(await first) == 1.0
        assert h.d.in_flight == 0
        third = h.request(3.0)
        await until(lambda: bool(ch.held))
        ch.release_all()
        assert value_of(await third) == 3.0

    run(main())


def test_waiter_cancelled_just_after_being_handed_a_slot_gives_it_back() -> None:
    async def main() -> None:
        h = Harness()
        abandoned = h.request(1.0)
        await until(lambda: h.d.queued == 1)
        ch = h.add("a")  # hands the slot to the waiter at once...
        assert h.d.in_flight == 1
        abandoned.cancel()  # ...whose caller goes away before it runs again
        await asyncio.gather(abandoned, return_exceptions=True)
        assert abandoned.cancelled()
        assert h.d.in_flight == 0
        assert ch.calls == 0
        assert value_of(await h.request(2.0)) == 2.0

    run(main())


# ---------------------------------------------------------------- cold starts


def traced(h: Harness, value: float) -> asyncio.Task[Any]:
    inputs = {"x": np.array([value], dtype=np.float32)}
    return asyncio.create_task(h.d.infer_traced(inputs, ("y",), h.clock.monotonic() + LONG))


def test_a_request_taken_by_a_new_instance_is_a_cold_start_and_others_are_not() -> None:
    async def main() -> None:
        h = Harness(concurrency=1)
        first, second = traced(h, 1.0), traced(h, 2.0)  # nothing ready: both queue
        await until(lambda: h.d.queued == 2)
        busy = h.add("i0", FakeChannel(blocked=True))  # becomes ready: takes the first
        await until(lambda: len(busy.held) == 1)
        busy.release_all()
        result, served = await first
        assert value_of(result) == 1.0
        assert served.cold
        assert served.instance.id == "i0"
        # The second waited for a busy instance to finish: queued, not a cold start.
        busy.blocked = False
        _, served = await second
        assert not served.cold
        # A free slot at arrival: not a cold start either.
        _, served = await traced(h, 3.0)
        assert not served.cold

    run(main())


def test_a_new_instance_takes_up_to_its_concurrency_of_waiters_as_cold_starts() -> None:
    async def main() -> None:
        h = Harness(concurrency=2)
        tasks = [traced(h, float(k)) for k in range(3)]
        await until(lambda: h.d.queued == 3)
        h.add("i0")
        h.add("i1")
        results = [await t for t in tasks]
        assert [served.cold for _, served in results] == [True, True, True]
        assert [served.instance.id for _, served in results] == ["i0", "i0", "i1"]

    run(main())
