"""Instance choice (power of two choices) and the service-time EWMA, as properties."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.router import Candidate, Ewma, choose

NODES = ("a", "b", "c")


@st.composite
def candidates(draw: st.DrawFn, max_size: int = 8) -> list[Candidate]:
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        limit = draw(st.integers(1, 4))
        out.append(
            Candidate(
                id=f"i{i}",
                in_flight=draw(st.integers(0, limit)),
                limit=limit,
                ewma_s=draw(st.sampled_from([0.0, 0.001, 0.01, 0.5, 2.0])),
                node=draw(st.sampled_from(NODES)),
            )
        )
    return out


seeds = st.integers(0, 2**32 - 1)
prefer = st.none() | st.sampled_from((*NODES, "elsewhere"))


@settings(max_examples=150, deadline=None)
@given(candidates(), seeds, prefer)
def test_never_picks_an_instance_at_its_limit(cs: list[Candidate], seed: int, node: str | None) -> None:
    chosen = choose(cs, random.Random(seed), node)
    by_id = {c.id: c for c in cs}
    if chosen is not None:
        assert by_id[chosen].in_flight < by_id[chosen].limit


@settings(max_examples=150, deadline=None)
@given(candidates(), seeds, prefer)
def test_none_iff_every_instance_is_at_its_limit(cs: list[Candidate], seed: int, node: str | None) -> None:
    chosen = choose(cs, random.Random(seed), node)
    assert (chosen is None) == all(c.in_flight >= c.limit for c in cs)


@settings(max_examples=150, deadline=None)
@given(candidates(), seeds, st.sampled_from(NODES))
def test_prefers_a_free_instance_on_the_preferred_node(cs: list[Candidate], seed: int, node: str) -> None:
    chosen = choose(cs, random.Random(seed), node)
    free_near = [c for c in cs if c.node == node and c.in_flight < c.limit]
    if free_near:
        assert chosen in {c.id for c in free_near}


@settings(max_examples=150, deadline=None)
@given(candidates(), seeds)
def test_picks_the_better_of_two_never_the_single_worst(cs: list[Candidate], seed: int) -> None:
    """Power of two choices: the chosen instance beats at least one other free one, so
    a strictly worst free instance (when there are several) is never picked."""
    free = [c for c in cs if c.in_flight < c.limit]
    chosen = choose(cs, random.Random(seed))
    if len(free) >= 2:
        key = {c.id: (c.expected_wait_s, c.in_flight) for c in free}
        worst = max(key.values())
        if sum(1 for k in key.values() if k == worst) == 1:
            assert chosen is not None
            assert key[chosen] != worst


@pytest.mark.parametrize("ewma", [0.0, 0.05])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_equal_loads_spread_over_every_instance(n: int, ewma: float) -> None:
    cs = [Candidate(f"i{i}", in_flight=1, limit=4, ewma_s=ewma) for i in range(n)]
    rng = random.Random(1234)
    counts = Counter(choose(cs, rng) for _ in range(300 * n))
    assert set(counts) == {c.id for c in cs}
    # Uniform on ties: every instance within 30 % of its fair share.
    for count in counts.values():
        assert abs(count - 300) < 90


def test_spreads_an_unmeasured_pool_by_in_flight() -> None:
    """Zero EWMA (nothing measured yet) makes every expected wait 0; ties go to the
    less busy instance, so a fresh pool does not pile onto one instance."""
    cs = [Candidate("busy", in_flight=3, limit=8, ewma_s=0.0), Candidate("idle", 0, 8, 0.0)]
    rng = random.Random(0)
    assert {choose(cs, rng) for _ in range(50)} == {"idle"}


def test_same_seed_same_choices() -> None:
    cs = [Candidate(f"i{i}", in_flight=i % 2, limit=4, ewma_s=0.01 * i) for i in range(6)]
    first = [choose(cs, random.Random(7)) for _ in range(20)]
    again = [choose(cs, random.Random(7)) for _ in range(20)]
    assert first == again


# ---------------------------------------------------------------- Ewma

samples = st.floats(1e-6, 1e3, allow_nan=False)


@given(samples)
def test_ewma_is_seeded_by_the_first_sample(x: float) -> None:
    assert Ewma().update(x) == x


@given(st.floats(0.01, 1.0), st.lists(samples, min_size=1, max_size=50))
def test_ewma_stays_within_the_range_of_its_samples(alpha: float, xs: list[float]) -> None:
    e = Ewma(alpha)
    for x in xs:
        e.update(x)
    assert min(xs) * (1 - 1e-9) <= e.value <= max(xs) * (1 + 1e-9)


@given(st.floats(0.01, 1.0), samples, samples)
def test_ewma_moves_alpha_of_the_way_to_each_sample(alpha: float, first: float, second: float) -> None:
    e = Ewma(alpha)
    e.update(first)
    assert e.update(second) == pytest.approx(first + alpha * (second - first))


@given(samples, samples)
def test_ewma_converges_to_a_steady_sample(start: float, steady: float) -> None:
    e = Ewma(0.2, initial=start)
    for _ in range(200):
        e.update(steady)
    assert e.value == pytest.approx(steady, rel=1e-6)
