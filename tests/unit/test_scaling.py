"""The per-tick scale plan (how many to start, which to stop) as properties."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.scaling import FunctionView, InstanceView, ScalePlan, plan


@st.composite
def views(draw: st.DrawFn) -> FunctionView:
    now = draw(st.floats(0, 1000, allow_nan=False))
    hi = draw(st.integers(1, 8))
    lo = draw(st.integers(0, hi))
    ready = []
    for i in range(draw(st.integers(0, 10))):
        busy = draw(st.booleans())
        ready.append(
            InstanceView(
                id=f"i{i}",
                in_flight=draw(st.integers(1, 4)) if busy else 0,
                idle_since=None if busy else draw(st.floats(0, now, allow_nan=False)),
            )
        )
    demand = draw(st.integers(0, 20))
    windows = st.sampled_from([0.0, 1.0, 30.0, 300.0])
    return FunctionView(
        now=now,
        demand=demand,
        ready=ready,
        starting=draw(st.integers(0, 4)),
        min_instances=lo,
        max_instances=hi,
        desired=draw(st.integers(lo, hi)),  # the autoscaler answers within the bounds
        keep_alive_s=draw(windows),
        backoff_until=draw(st.sampled_from([0.0, now, now + 1.0])),
        queued=draw(st.integers(0, demand)),
        concurrency=draw(st.integers(1, 4)),
        surplus_keep_alive_s=draw(st.none() | windows),
    )


def have(v: FunctionView) -> int:
    return len(v.ready) + v.starting


def check(v: FunctionView) -> ScalePlan:
    p = plan(v)
    assert p.start >= 0
    assert len(set(p.stop)) == len(p.stop)
    return p


@settings(max_examples=150, deadline=None)
@given(views())
def test_never_starts_above_max_instances(v: FunctionView) -> None:
    p = check(v)
    assert p.start == 0 or have(v) + p.start <= v.max_instances


@settings(max_examples=150, deadline=None)
@given(views())
def test_never_stops_below_min_instances(v: FunctionView) -> None:
    p = check(v)
    assert not p.stop or len(v.ready) - len(p.stop) >= v.min_instances


@settings(max_examples=150, deadline=None)
@given(views())
def test_never_stops_a_busy_instance(v: FunctionView) -> None:
    p = check(v)
    by_id = {i.id: i for i in v.ready}
    assert all(by_id[s].in_flight == 0 and by_id[s].idle_since is not None for s in p.stop)


def surplus(v: FunctionView) -> float:
    return v.keep_alive_s if v.surplus_keep_alive_s is None else v.surplus_keep_alive_s


@settings(max_examples=150, deadline=None)
@given(views())
def test_stops_only_instances_idle_for_their_window(v: FunctionView) -> None:
    """The function's last instance idles ``keep_alive_s`` before it goes; any other,
    ``surplus_keep_alive_s``."""
    p = check(v)
    by_id = {i.id: i for i in v.ready}
    idle = [v.now - i for i in sorted(by_id[s].idle_since or 0.0 for s in p.stop)]
    if not idle:
        return
    for seconds in idle:
        assert seconds >= min(v.keep_alive_s, surplus(v))
    if len(p.stop) == len(v.ready):  # to zero: the most recently idle one was the last
        assert idle[-1] >= v.keep_alive_s
        idle = idle[:-1]
    for seconds in idle:
        assert seconds >= surplus(v)


@settings(max_examples=150, deadline=None)
@given(views())
def test_stops_the_longest_idle_first(v: FunctionView) -> None:
    p = check(v)
    stopped = {i.idle_since for i in v.ready if i.id in p.stop}
    kept_idle = [i.idle_since for i in v.ready if i.id not in p.stop and i.idle_since is not None]
    if stopped:
        assert all(k is not None and k >= max(s for s in stopped if s is not None) for k in kept_idle)


@settings(max_examples=150, deadline=None)
@given(views())
def test_no_start_while_backing_off(v: FunctionView) -> None:
    p = check(v)
    if v.now < v.backoff_until:
        assert p.start == 0


@settings(max_examples=150, deadline=None)
@given(views())
def test_starts_to_reach_min_instances_without_demand(v: FunctionView) -> None:
    v = replace(v, demand=0, queued=0, backoff_until=0.0)
    p = check(v)
    assert have(v) + p.start >= v.min_instances


@settings(max_examples=150, deadline=None)
@given(views())
def test_no_start_beyond_min_instances_without_demand(v: FunctionView) -> None:
    v = replace(v, demand=0, queued=0)
    p = check(v)
    assert p.start <= max(0, v.min_instances - have(v))


def free_capacity(v: FunctionView) -> int:
    slots = sum(max(v.concurrency - i.in_flight, 0) for i in v.ready)
    return slots + v.starting * v.concurrency


@settings(max_examples=150, deadline=None)
@given(views())
def test_queued_requests_beyond_free_and_starting_capacity_start_instances_at_once(
    v: FunctionView,
) -> None:
    """Whatever the autoscaler's averaged answer, each ``concurrency`` requests queued
    beyond the free slots and the starting instances' slots start an instance now."""
    v = replace(v, desired=min(v.desired, len(v.ready)))  # the windows see no burst yet
    p = check(v)
    excess = v.queued - free_capacity(v)
    if v.now < v.backoff_until or excess <= 0:
        return
    needed = -(-excess // v.concurrency)
    assert p.start >= min(needed, v.max_instances - have(v))


@settings(max_examples=150, deadline=None)
@given(views())
def test_no_start_for_queued_requests_the_capacity_covers(v: FunctionView) -> None:
    v = replace(v, desired=v.min_instances, backoff_until=0.0)
    if v.queued > free_capacity(v):
        return
    assert check(v).start == max(0, min(v.min_instances, v.max_instances) - have(v))


@settings(max_examples=150, deadline=None)
@given(views())
def test_with_demand_starts_up_to_desired(v: FunctionView) -> None:
    if v.demand == 0 or v.now < v.backoff_until:
        return
    p = check(v)
    assert have(v) + p.start >= min(max(v.desired, v.min_instances), v.max_instances)


def test_an_idle_pool_scales_to_zero_after_the_keep_alive() -> None:
    idle = [InstanceView("a", 0, 10.0), InstanceView("b", 0, 20.0)]
    base = {"demand": 0, "ready": idle, "starting": 0, "min_instances": 0, "max_instances": 4}
    early = plan(FunctionView(now=25.0, desired=0, keep_alive_s=10.0, **base))  # type: ignore[arg-type]
    assert early == ScalePlan(start=0, stop=("a",))
    late = plan(FunctionView(now=30.0, desired=0, keep_alive_s=10.0, **base))  # type: ignore[arg-type]
    assert late == ScalePlan(start=0, stop=("a", "b"))


def test_a_burst_behind_a_busy_instance_starts_one_instance_per_queued_request() -> None:
    """The autoscaler still answers 1 (its windows average the burst away), but four
    requests wait behind one busy instance: four start now, up to max_instances."""
    busy = [InstanceView("a", 1, None)]
    base = {"ready": busy, "min_instances": 0, "desired": 1, "keep_alive_s": 60.0}
    view = FunctionView(now=5.0, demand=5, starting=0, max_instances=8, queued=4, **base)  # type: ignore[arg-type]
    assert plan(view) == ScalePlan(start=4, stop=())
    # Two are starting already: two more.
    assert plan(replace(view, starting=2)).start == 2
    # Capped by max_instances (1 ready + 2 starting + 1 more = 4).
    assert plan(replace(view, starting=2, max_instances=4)).start == 1
    # With concurrency 2 the starting instance's spare slots count: 4 queued, 1 starting
    # (2 slots) and 1 free slot on "a": one more instance for the last request.
    assert plan(replace(view, starting=1, concurrency=2)).start == 1


def test_extra_instances_go_after_the_surplus_window_the_last_after_the_keep_alive() -> None:
    idle = [InstanceView("a", 0, 10.0), InstanceView("b", 0, 20.0), InstanceView("c", 0, 28.0)]
    base = {"demand": 0, "ready": idle, "starting": 0, "min_instances": 0, "max_instances": 4}
    view = FunctionView(now=30.0, desired=0, keep_alive_s=60.0, surplus_keep_alive_s=5.0, **base)  # type: ignore[arg-type]
    assert plan(view) == ScalePlan(start=0, stop=("a", "b"))  # c idled 2 s only
    assert plan(replace(view, now=40.0)).stop == ("a", "b")  # c is the last: it has 60 s
    assert plan(replace(view, now=88.0)).stop == ("a", "b", "c")
    # Without a surplus window every instance has the keep-alive (one TTL per instance).
    assert plan(replace(view, now=75.0, surplus_keep_alive_s=None)).stop == ("a",)
