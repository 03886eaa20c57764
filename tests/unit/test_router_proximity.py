"""Routing by proximity (``choose_near``): locality first, yielding to a much less busy
instance farther away. Properties over random pools, loads and distances."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.router import Candidate, Proximity, choose, choose_near, preferred

NODES = ("a", "b", "c", "d")
seeds = st.integers(0, 2**32 - 1)


@st.composite
def pools(draw: st.DrawFn, max_size: int = 8) -> list[Candidate]:
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        limit = draw(st.integers(1, 4))
        out.append(
            Candidate(
                id=f"i{i}",
                in_flight=draw(st.integers(0, limit)),
                limit=limit,
                ewma_s=draw(st.sampled_from([0.0, 0.001, 0.01, 0.5])),
                node=draw(st.sampled_from(NODES)),
            )
        )
    return out


@st.composite
def proximities(draw: st.DrawFn) -> Proximity:
    here = draw(st.none() | st.sampled_from(NODES))
    near = draw(st.none() | st.sampled_from(NODES))
    measured = draw(st.lists(st.sampled_from(NODES), unique=True))
    rtt = {n: draw(st.sampled_from([0.0001, 0.0005, 0.002, 0.02])) for n in measured if n != here}
    return Proximity(here, near, rtt)


def _free(cs: list[Candidate]) -> list[Candidate]:
    return [c for c in cs if c.in_flight < c.limit]


@settings(max_examples=200, deadline=None)
@given(pools(), seeds, proximities())
def test_never_picks_a_full_instance_and_none_only_when_all_are(
    cs: list[Candidate], seed: int, where: Proximity
) -> None:
    chosen = choose_near(cs, random.Random(seed), where)
    assert (chosen is None) == (not _free(cs))
    if chosen is not None:
        c = next(c for c in cs if c.id == chosen)
        assert c.in_flight < c.limit


@settings(max_examples=200, deadline=None)
@given(pools(), seeds, proximities())
def test_an_instance_outside_the_preferred_group_wins_only_when_much_cheaper(
    cs: list[Candidate], seed: int, where: Proximity
) -> None:
    chosen = choose_near(cs, random.Random(seed), where)
    group = preferred(_free(cs), where)
    if chosen is None or chosen in {c.id for c in group}:
        return
    winner = next(c for c in cs if c.id == chosen)
    # The yield went to the cheapest free instance, much cheaper than some of the group.
    assert where.cost_s(winner) == min(where.cost_s(c) for c in _free(cs))
    worst_in_group = max(where.cost_s(c) for c in group)
    assert where.cost_s(winner) * where.yield_ratio + where.yield_margin_s < worst_in_group


@settings(max_examples=200, deadline=None)
@given(pools(), seeds, proximities())
def test_yields_when_every_preferred_instance_is_much_busier(
    cs: list[Candidate], seed: int, where: Proximity
) -> None:
    free = _free(cs)
    group = preferred(free, where)
    if not free:
        return
    cheapest = min(where.cost_s(c) for c in free)
    if all(where.cost_s(c) > cheapest * where.yield_ratio + where.yield_margin_s for c in group):
        chosen = choose_near(cs, random.Random(seed), where)
        assert chosen not in {c.id for c in group}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(NODES), min_size=1, max_size=8), seeds, proximities())
def test_idle_pools_go_to_the_nearest_tier(nodes: list[str], seed: int, where: Proximity) -> None:
    """With nothing in flight anywhere no queue is worth a trip: the gateway's node wins,
    then the data's node (unless another is much nearer: cost is the trip alone), then
    the nearest by measured RTT."""
    cs = [Candidate(f"i{k}", 0, 2, 0.01, node) for k, node in enumerate(nodes)]
    chosen = choose_near(cs, random.Random(seed), where)
    node = next(c.node for c in cs if c.id == chosen)
    if where.here in nodes:
        assert node == where.here
    elif where.near in nodes:
        near_rtt = where.rtt(where.near)
        assert node == where.near or where.rtt(node) * where.yield_ratio + where.yield_margin_s < near_rtt
    else:
        assert where.rtt(node) == min(where.rtt(n) for n in nodes)


def test_prefers_its_own_node_then_the_data_then_the_nearest() -> None:
    where = Proximity(here="a", near="c", rtt_s={"b": 0.0002, "c": 0.001, "d": 0.0001})
    rng = random.Random(0)
    pool = [Candidate("on-b", 0, 4, 0.01, "b"), Candidate("on-c", 0, 4, 0.01, "c")]
    assert choose_near([*pool, Candidate("on-a", 0, 4, 0.01, "a")], rng, where) == "on-a"
    assert choose_near(pool, rng, where) == "on-c"  # the data's node, though b is nearer
    far = [Candidate("on-b", 0, 4, 0.01, "b"), Candidate("on-d", 0, 4, 0.01, "d")]
    assert choose_near(far, rng, where) == "on-d"


def test_yields_to_a_farther_instance_under_imbalance() -> None:
    where = Proximity(here="a", rtt_s={"b": 0.001})
    rng = random.Random(0)
    # Local instance with 3 in flight at 10 ms each: 30 ms of queue against a 1 ms trip.
    busy_here = [Candidate("on-a", 3, 8, 0.010, "a"), Candidate("on-b", 0, 8, 0.010, "b")]
    assert choose_near(busy_here, rng, where) == "on-b"
    # One in flight at 1 ms: 1 ms of queue is not worth the trip (nor the margin).
    light_here = [Candidate("on-a", 1, 8, 0.001, "a"), Candidate("on-b", 0, 8, 0.001, "b")]
    assert choose_near(light_here, rng, where) == "on-a"


def test_without_proximity_it_is_power_of_two_choices() -> None:
    """Nothing known of where the gateway or the data is, every node equally far, equal
    loads: the same choices as :func:`choose`."""
    cs = [Candidate(f"i{k}", 1, 4, 0.01, NODES[k % 4]) for k in range(6)]
    a = [choose_near(cs, random.Random(s), Proximity()) for s in range(30)]
    b = [choose(cs, random.Random(s)) for s in range(30)]
    assert a == b
