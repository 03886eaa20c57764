"""Keep-alive policies on virtual time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.keepalive import (
    FixedKeepAlive,
    HybridConfig,
    HybridKeepAlive,
    KeepAlivePolicy,
    parse_policy,
    scale_policy,
)
from smss.errors import InvalidSpec

LONG_TTL = 600.0


def feed(policy: KeepAlivePolicy, function: str, times: list[float]) -> None:
    for t in times:
        policy.on_invocation(function, t)


def test_fixed_ttl() -> None:
    policy: KeepAlivePolicy = FixedKeepAlive(42.0)
    feed(policy, "f", [0.0, 10.0, 30.0])
    assert policy.keep_alive_s("f", 31.0) == 42.0
    assert policy.keep_alive_s("never-seen", 31.0) == 42.0
    assert policy.prewarm_at("f", 31.0) is None


@pytest.mark.parametrize("period", [8.0, 60.0, 300.0])
def test_hybrid_learns_a_periodic_pattern(period: float) -> None:
    policy = HybridKeepAlive(LONG_TTL)
    rng = random.Random(7)
    times = [i * period + rng.uniform(-0.2, 0.2) for i in range(30)]
    feed(policy, "f", times)
    last = times[-1]
    next_arrival = last + period

    at = policy.prewarm_at("f", last + 0.5)
    assert at is not None
    # Just before the next arrival: early by about the 10 % margin (plus a bin), no more.
    assert next_arrival - 0.1 * period - 2.0 <= at < next_arrival
    keep = policy.keep_alive_s("f", last + 0.5)
    assert keep < LONG_TTL
    # An instance pre-warmed at ``at`` is still alive when the request comes...
    assert at + keep > next_arrival
    # ...and gone soon after the arrival was due: 20 % of a period at most (margins + bins).
    assert at + keep <= next_arrival + 0.2 * period + 2.0


def test_hybrid_prewarm_expires_when_the_window_passes() -> None:
    policy = HybridKeepAlive(LONG_TTL)
    feed(policy, "f", [i * 60.0 for i in range(20)])
    last = 19 * 60.0
    assert policy.prewarm_at("f", last + 30) is not None
    assert policy.prewarm_at("f", last + 200) is None


def test_hybrid_frequent_function_keeps_alive_without_prewarm() -> None:
    """Idle times under a second: the head is in the first bin, so nothing is unloaded
    and pre-warmed; the instance just stays for the tail (+10 %)."""
    policy = HybridKeepAlive(LONG_TTL)
    rng = random.Random(3)
    t = 0.0
    for _ in range(500):
        t += rng.uniform(0.05, 0.9)
        policy.on_invocation("f", t)
    assert policy.prewarm_at("f", t) is None
    assert policy.keep_alive_s("f", t) == pytest.approx(1.1)


@pytest.mark.parametrize("samples", [0, 1, 5, 9])
def test_hybrid_falls_back_to_fixed_with_few_samples(samples: int) -> None:
    policy = HybridKeepAlive(123.0)
    feed(policy, "f", [i * 60.0 for i in range(samples + 1)])  # n + 1 arrivals, n idle times
    assert policy.keep_alive_s("f", samples * 60.0) == 123.0
    assert policy.prewarm_at("f", samples * 60.0) is None
    policy.on_invocation("f", (samples + 1) * 60.0)
    learned = samples + 1 >= HybridConfig().min_samples
    assert (policy.keep_alive_s("f", (samples + 1) * 60.0) != 123.0) == learned


def test_hybrid_falls_back_when_idle_times_are_spread_evenly() -> None:
    """Idle times uniform over the whole range: the bin counts' CV is under 2."""
    policy = HybridKeepAlive(77.0)
    rng = random.Random(5)
    t = 0.0
    for _ in range(3000):
        t += rng.uniform(0, 600)
        policy.on_invocation("f", t)
    assert policy.keep_alive_s("f", t) == 77.0
    assert policy.prewarm_at("f", t) is None


def test_hybrid_falls_back_when_idle_times_are_out_of_bounds() -> None:
    policy = HybridKeepAlive(77.0, HybridConfig(range_s=60.0))
    feed(policy, "f", [i * 3600.0 for i in range(20)])
    assert policy.keep_alive_s("f", 20 * 3600.0) == 77.0
    assert policy.prewarm_at("f", 20 * 3600.0) is None


def test_hybrid_functions_are_learned_separately() -> None:
    policy = HybridKeepAlive(LONG_TTL)
    feed(policy, "a", [i * 60.0 for i in range(20)])
    feed(policy, "b", [i * 0.5 for i in range(20)])
    assert policy.prewarm_at("a", 1140.5) is not None
    assert policy.prewarm_at("b", 10.0) is None
    assert policy.keep_alive_s("unknown", 0.0) == LONG_TTL
    policy.forget("a")
    assert policy.keep_alive_s("a", 1140.5) == LONG_TTL


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1000, allow_nan=False), max_size=60), st.floats(0, 1e4))
def test_hybrid_answers_are_sane(gaps: list[float], ttl: float) -> None:
    policy = HybridKeepAlive(ttl)
    t = 0.0
    for gap in gaps:
        t += gap
        policy.on_invocation("f", t)
        keep = policy.keep_alive_s("f", t)
        at = policy.prewarm_at("f", t)
        assert keep >= 0
        assert at is None or at > t


@pytest.mark.parametrize(
    ("text", "ttl"),
    [("fixed:600", 600.0), (" fixed : 30s ", 30.0), ("fixed", 99.0), ("FIXED:0", 0.0)],
)
def test_parse_fixed(text: str, ttl: float) -> None:
    policy = parse_policy(text, default_ttl_s=99.0)
    assert isinstance(policy, FixedKeepAlive)
    assert policy.keep_alive_s("f", 0.0) == ttl


def test_parse_hybrid() -> None:
    policy = parse_policy("hybrid", default_ttl_s=99.0)
    assert isinstance(policy, HybridKeepAlive)
    assert policy.config == HybridConfig()
    assert policy.fallback_ttl_s == 99.0
    policy = parse_policy("hybrid:bin_s=60, range_s=14400,min_samples=3", default_ttl_s=99.0)
    assert isinstance(policy, HybridKeepAlive)
    assert policy.config == HybridConfig(bin_s=60.0, range_s=14400.0, min_samples=3)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "unknown keep-alive policy"),
        ("lru", "unknown keep-alive policy"),
        ("fixed:", "is not seconds"),
        ("fixed:ten", "is not seconds"),
        ("fixed:-5", "must be a finite number >= 0"),
        ("fixed:inf", "must be a finite number >= 0"),
        ("fixed:nan", "must be a finite number >= 0"),
        ("hybrid:bins=3", "bad option 'bins=3'"),
        ("hybrid:bin_s", "bad option"),
        ("hybrid:bin_s=x", "bin_s='x' is not a number"),
        ("hybrid:min_samples=2.5", "is not a number"),
        ("hybrid:bin_s=0", "bin_s must be > 0"),
        ("hybrid:margin=1", "margin must be in [0, 1)"),
        ("hybrid:head_percentile=99.5", "head_percentile <= tail_percentile"),
    ],
)
def test_parse_errors(text: str, words: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_policy(text, default_ttl_s=99.0)
    assert words in str(info.value)


def test_hybrid_extra_instances_have_their_own_window() -> None:
    """The learned windows are the function's (its last instance); any other instance
    is the autoscaler's capacity and idles ``surplus_s``, learned or not."""
    policy = HybridKeepAlive(LONG_TTL, HybridConfig(surplus_s=42.0))
    assert policy.surplus_keep_alive_s("f", 0.0) == 42.0
    rng = random.Random(3)
    t = 0.0
    for _ in range(500):
        t += rng.uniform(0.05, 0.9)
        policy.on_invocation("f", t)
    assert policy.keep_alive_s("f", t) == pytest.approx(1.1)
    assert policy.surplus_keep_alive_s("f", t) == 42.0
    fixed = FixedKeepAlive(30.0)
    assert fixed.surplus_keep_alive_s("f", 0.0) == fixed.keep_alive_s("f", 0.0) == 30.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fixed:600", "fixed:60.0"), ("fixed", "fixed:30.0"), ("fixed:0", "fixed:0.0")],
)
def test_scale_policy_fixed(text: str, expected: str) -> None:
    assert scale_policy(text, 300.0, 0.1) == (expected, pytest.approx(30.0))


def test_scale_policy_hybrid_scales_durations_only() -> None:
    text, ttl = scale_policy("hybrid:bin_s=2,min_samples=5", 600.0, 0.1)
    assert ttl == pytest.approx(60.0)
    policy = parse_policy(text, ttl)
    assert isinstance(policy, HybridKeepAlive)
    cfg = policy.config
    assert (cfg.bin_s, cfg.range_s, cfg.surplus_s) == pytest.approx((0.2, 60.0, 6.0))
    assert cfg.min_samples == 5
    d = HybridConfig()
    unscaled = ("head_percentile", "tail_percentile", "margin", "cv_threshold", "oob_threshold")
    assert all(getattr(cfg, name) == getattr(d, name) for name in unscaled)
    with pytest.raises(InvalidSpec):
        scale_policy("hybrid", 600.0, 0.0)
    with pytest.raises(InvalidSpec):
        scale_policy("lru", 600.0, 1.0)
