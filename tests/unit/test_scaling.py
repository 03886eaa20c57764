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
    return FunctionView(
        now=now,
        demand=draw(st.integers(0, 20)),
        ready=ready,
        starting=draw(st.integers(0, 4)),
        min_instances=lo,
        max_instances=hi,
        desired=draw(st.integers(lo, hi)),  # the autoscaler answers within the bounds
        keep_alive_s=draw(st.sampled_from([0.0, 1.0, 30.0, 300.0])),
        backoff_until=draw(st.sampled_from([0.0, now, now + 1.0])),
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


@settings(max_examples=150, deadline=None)
@given(views())
def test_stops_only_instances_idle_for_the_keep_alive(v: FunctionView) -> None:
    p = check(v)
    by_id = {i.id: i for i in v.ready}
    for s in p.stop:
        idle_since = by_id[s].idle_since
        assert idle_since is not None
        assert v.now - idle_since >= v.keep_alive_s


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
    v = replace(v, demand=0, backoff_until=0.0)
    p = check(v)
    assert have(v) + p.start >= v.min_instances


@settings(max_examples=150, deadline=None)
@given(views())
def test_no_start_beyond_min_instances_without_demand(v: FunctionView) -> None:
    v = replace(v, demand=0)
    p = check(v)
    assert p.start <= max(0, v.min_instances - have(v))


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
