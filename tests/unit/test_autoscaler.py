"""The autoscaler on virtual time: properties over random load, and the KPA behaviours."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.autoscaler import Autoscaler, AutoscalerConfig
from smss.errors import InvalidSpec

TICK = 0.2
# Short windows keep each example cheap; the rules do not depend on the lengths.
STABLE = 10.0
PANIC = 1.0


def config(target: float = 1.0, lo: int = 0, hi: int = 50, **kw: float) -> AutoscalerConfig:
    return AutoscalerConfig(
        target_concurrency=target,
        min_instances=lo,
        max_instances=hi,
        stable_window_s=STABLE,
        panic_window_s=PANIC,
        **kw,
    )


def expected(c: float, cfg: AutoscalerConfig) -> int:
    """clamp(ceil(c / target)), rounding up with the autoscaler's 1e-9 tolerance."""
    want = max(1, math.ceil(c / cfg.target_concurrency - 1e-9)) if c > 0 else 0
    return min(max(want, cfg.min_instances), cfg.max_instances)


def run(a: Autoscaler, start: float, seconds: float, load: float, ready: int) -> tuple[float, int]:
    """Drive ``a`` at ``load`` for ``seconds``, with ready instances following its
    answers at once (an ideal controller). Returns (time, ready)."""
    t = start
    for _ in range(round(seconds / TICK)):
        t += TICK
        a.observe(t, load)
        ready = a.desired(t, ready)
    return t, ready


bounds = st.tuples(st.integers(0, 5), st.integers(1, 20)).filter(lambda b: b[0] <= b[1])
targets = st.sampled_from([0.5, 0.7, 1.0, 2.5, 4.2, 5.6, 7.0])
loads = st.floats(0, 200, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    bounds,
    targets,
    st.lists(st.tuples(st.floats(0, 3), loads, st.integers(0, 40)), max_size=80),
)
def test_never_outside_min_max(
    b: tuple[int, int], target: float, steps: list[tuple[float, float, int]]
) -> None:
    cfg = config(target, *b)
    a = Autoscaler(cfg)
    t = 0.0
    for dt, load, ready in steps:
        t += dt
        a.observe(t, load)
        assert cfg.min_instances <= a.desired(t, ready) <= cfg.max_instances


@settings(max_examples=40, deadline=None)
@given(bounds, targets, loads, st.floats(0, 100, allow_nan=False), st.integers(0, 20))
def test_constant_load_converges(
    b: tuple[int, int], target: float, load: float, before: float, ready: int
) -> None:
    cfg = config(target, *b)
    a = Autoscaler(cfg)
    t, ready = run(a, 0.0, STABLE, before, ready)
    # Panic may hold for a stable window after the last over-threshold tick, and the
    # scale-down rate halves at most per decision: three windows are plenty.
    t, ready = run(a, t, 3 * STABLE, load, ready)
    assert ready == expected(load, cfg)
    if math.ceil(load / target - 1e-9) <= cfg.max_instances:  # capped load panics for good
        assert not a.panicking
    assert a.desired(t + TICK, ready) == ready  # and it stays there


@settings(max_examples=40, deadline=None)
@given(targets, st.floats(0.5, 5), st.floats(6, 20))
def test_burst_scales_up_within_panic_window(target: float, base: float, factor: float) -> None:
    """A 6x burst over a base of at least half an instance at least doubles the need,
    which is the panic threshold."""
    cfg = config(target, 0, 1000)
    a = Autoscaler(cfg)
    t, ready = run(a, 0.0, 2 * STABLE, base * target, 0)
    assert ready == expected(base * target, cfg)
    burst = base * target * factor
    t, ready = run(a, t, PANIC + TICK, burst, ready)
    assert a.panicking
    assert ready >= expected(burst, cfg)


def test_panic_never_scales_down_until_a_calm_stable_window() -> None:
    a = Autoscaler(config(1.0))
    t, ready = run(a, 0.0, STABLE, 2, 0)
    t, ready = run(a, t, 2 * PANIC, 20, ready)
    assert a.panicking
    peak = ready
    t, low = run(a, t, STABLE - 2 * PANIC, 2, ready)  # load gone, still within the window
    assert low == peak
    t, low = run(a, t, 3 * STABLE, 2, low)
    assert not a.panicking
    assert low == 2


@settings(max_examples=60, deadline=None)
@given(targets, st.floats(1e-6, 100), st.floats(0, 100), st.booleans())
def test_scale_from_zero_is_immediate(target: float, load: float, idle_s: float, fresh: bool) -> None:
    a = Autoscaler(config(target))
    t = 0.0
    if not fresh:
        t, ready = run(a, 0.0, idle_s, 0.0, 0)
        assert ready == 0  # zero load from the start never starts anything
    t += 0.01
    a.observe(t, load)
    assert a.desired(t, 0) >= 1


def test_scale_from_zero_sizes_for_the_waiting_requests() -> None:
    a = Autoscaler(config(2.0))
    a.observe(5.0, 0)
    a.observe(10.0, 9)
    assert a.desired(10.0, 0) == 5


@settings(max_examples=40, deadline=None)
@given(targets, loads, st.integers(0, 20))
def test_zero_load_for_a_stable_window_scales_to_zero(target: float, load: float, ready: int) -> None:
    a = Autoscaler(config(target))
    t, ready = run(a, 0.0, STABLE, load, ready)
    # One stable window of zeros, then the halving steps of the scale-down rate.
    t, ready = run(a, t, STABLE + 10 * TICK, 0.0, ready)
    assert ready == 0


def test_holds_instances_until_the_whole_window_is_idle() -> None:
    a = Autoscaler(config(1.0))
    t, ready = run(a, 0.0, STABLE, 1.0, 0)
    assert ready == 1
    t, ready = run(a, t, STABLE - TICK, 0.0, ready)
    assert ready == 1
    t, ready = run(a, t, 3 * TICK, 0.0, ready)  # the window edge itself is float-fuzzy
    assert ready == 0


def test_min_instances_kept_without_load() -> None:
    a = Autoscaler(config(1.0, lo=2))
    _, ready = run(a, 0.0, 3 * STABLE, 0.0, 0)
    assert ready == 2


def test_restart_with_running_instances_does_not_drop_to_zero_at_once() -> None:
    a = Autoscaler(config(1.0))
    a.observe(0.0, 0)
    assert a.desired(1.0, 3) >= 1
    assert a.desired(STABLE + 1.0, 1) == 0


def test_scale_down_delay_holds_the_peak() -> None:
    def first_drop(delay: float) -> float:
        a = Autoscaler(config(1.0, scale_down_delay_s=delay))
        t, ready = run(a, 0.0, 2 * STABLE, 4.0, 0)
        assert ready == 4
        while ready == 4:
            t, ready = run(a, t, TICK, 1.0, ready)
        return t

    assert first_drop(5.0) - first_drop(0.0) == pytest.approx(5.0, abs=TICK + 1e-6)


def test_time_weighted_average_ignores_sampling_rate() -> None:
    """Ten samples of 10 in one second and one sample of 0 held for nine seconds
    average 1, not 10/11 x 10."""
    a = Autoscaler(config(1.0, max_scale_up_rate=1000.0))
    a.observe(0.0, 0)
    a.observe(STABLE - 10.0, 0)
    for i in range(10):
        a.observe(STABLE - 10.0 + i * 0.1, 10.0)
    a.observe(STABLE - 9.0, 0.0)
    # 10 x 1 s over the 10 s window: average 1, so with 1 ready the answer is 1.
    assert a.desired(STABLE, 1) == 1


def test_irregular_and_backwards_times_are_tolerated() -> None:
    a = Autoscaler(config(1.0))
    a.observe(10.0, 3)
    a.observe(9.0, 3)  # taken as 10.0
    a.observe(10.0, 5)
    a.observe(10.001, 6)  # merged with the previous sample
    assert a.desired(9.5, 0) >= 1
    assert a.desired(20.0, 6) == 6


def test_long_runs_stay_bounded_in_memory() -> None:
    a = Autoscaler(config(1.0))
    t = 0.0

    def feed(n: int) -> None:
        nonlocal t
        for i in range(n):
            t += 0.05
            a.observe(t, float(i % 7))
            if i % 100 == 0:
                a.desired(t, 3)

    tracemalloc.start()
    try:
        feed(20_000)
        before = tracemalloc.get_traced_memory()[0]
        feed(60_000)  # unbounded history would keep ~5 MB more
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 300_000


@pytest.mark.parametrize(
    "kw",
    [
        {"target_concurrency": 0.0},
        {"target_concurrency": float("nan")},
        {"target_concurrency": 1.0, "min_instances": 3, "max_instances": 2},
        {"target_concurrency": 1.0, "max_instances": 0},
        {"target_concurrency": 1.0, "panic_window_s": 70.0},
        {"target_concurrency": 1.0, "panic_threshold": 0.5},
        {"target_concurrency": 1.0, "max_scale_down_rate": 0.5},
        {"target_concurrency": 1.0, "scale_down_delay_s": -1.0},
    ],
)
def test_bad_config_is_refused(kw: dict[str, float]) -> None:
    with pytest.raises(InvalidSpec):
        AutoscalerConfig(**kw)  # type: ignore[arg-type]


def test_negative_concurrency_is_a_bug() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Autoscaler(config()).observe(0.0, -1.0)
