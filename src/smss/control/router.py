"""Instance choice for one request: power of two choices on expected wait, by proximity.

Pure: the gateway's dispatcher and the simulator call :func:`choose` with the
instances' current loads and a seeded ``random.Random``. Expected wait of an
instance is ``(in_flight + 1) x EWMA service time``; an instance at its
concurrency limit is never chosen. When the request names a preferred node
(where its data lives), free instances there win over the rest.

On a cluster the dispatcher calls :func:`choose_near` with a :class:`Proximity`:
where the gateway is, where the request's data is, and the measured round trip
to every node. Its rules, in order:

1. only free instances (below their concurrency limit) are candidates;
2. the *preferred group* is the free instances on the gateway's own node; when
   there are none, those on the node holding the request's data (the session's
   state, the previous stage's output); when none, those on the nearest node by
   measured RTT (a node never measured counts as ``unknown_rtt_s`` away);
3. the group's choice is power of two choices on expected wait, as :func:`choose`;
4. it *yields* to the free instance of least cost anywhere, where cost is
   ``in_flight x EWMA service time + RTT``, when that cost is much lower:
   ``cost(other) x yield_ratio + yield_margin_s < cost(group's choice)``. So an
   idle instance on the gateway's node always wins, a farther one wins only when the
   near one's queue costs clearly more than the trip, and the data's node loses to
   one much nearer the gateway (the request's tensors travel from the gateway).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    in_flight: int
    limit: int
    ewma_s: float
    node: str = "local"

    @property
    def expected_wait_s(self) -> float:
        return (self.in_flight + 1) * self.ewma_s


def choose(candidates: Sequence[Candidate], rng: random.Random, prefer_node: str | None = None) -> str | None:
    """The chosen instance's id, or ``None`` when every instance is at its limit."""
    free = [c for c in candidates if c.in_flight < c.limit]
    if prefer_node is not None:
        near = [c for c in free if c.node == prefer_node]
        free = near or free
    if not free:
        return None
    # Ties go to the less busy one so that an unmeasured (ewma 0) pool still spreads load.
    return _two_choices(free, rng).id


@dataclass(frozen=True, slots=True)
class Proximity:
    """Where a request is routed from. ``here``: the gateway's node; ``near``: the node
    holding the request's data (None: none known); ``rtt_s``: measured round trip from
    ``here`` to each node, seconds (``here`` itself is 0)."""

    here: str | None = None
    near: str | None = None
    rtt_s: Mapping[str, float] = field(default_factory=dict)
    #: How much cheaper a farther instance must be to win: cost x ratio + margin < near's.
    yield_ratio: float = 2.0
    yield_margin_s: float = 0.002
    #: The distance of a node with no measurement yet: far, but not unreachable.
    unknown_rtt_s: float = 0.005

    def rtt(self, node: str) -> float:
        if node == self.here:
            return 0.0
        return self.rtt_s.get(node, self.unknown_rtt_s)

    def tier(self, node: str) -> int:
        """0: the gateway's node; 1: the data's node; 2: elsewhere."""
        if node == self.here:
            return 0
        return 1 if node == self.near else 2

    def cost_s(self, c: Candidate) -> float:
        """Expected wait on ``c`` from here: its queue, then the trip to its node."""
        return c.in_flight * c.ewma_s + self.rtt(c.node)


def preferred(free: Sequence[Candidate], where: Proximity) -> list[Candidate]:
    """The preferred group among ``free`` instances (rule 2 of the module docstring)."""
    if not free:
        return []
    best = min(where.tier(c.node) for c in free)
    group = [c for c in free if where.tier(c.node) == best]
    if best < 2:
        return group
    nearest = min(where.rtt(c.node) for c in group)
    return [c for c in group if where.rtt(c.node) == nearest]


def choose_near(candidates: Sequence[Candidate], rng: random.Random, where: Proximity) -> str | None:
    """The chosen instance's id by proximity and load (rules in the module docstring),
    or ``None`` when every instance is at its limit."""
    free = [c for c in candidates if c.in_flight < c.limit]
    if not free:
        return None
    group = preferred(free, where)
    pick = _two_choices(group, rng)
    other = min(free, key=lambda c: (where.cost_s(c), c.in_flight, c.id))
    if where.cost_s(other) * where.yield_ratio + where.yield_margin_s < where.cost_s(pick):
        return other.id
    return pick.id


def _two_choices(free: Sequence[Candidate], rng: random.Random) -> Candidate:
    if len(free) == 1:
        return free[0]
    a, b = rng.sample(list(free), 2)
    return min((a, b), key=lambda c: (c.expected_wait_s, c.in_flight))


class Ewma:
    """Exponentially weighted moving average of service time, seeded by the first sample."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2, initial: float = 0.0) -> None:
        self.alpha = alpha
        self.value = initial

    def update(self, sample: float) -> float:
        self.value = sample if self.value == 0.0 else self.value + self.alpha * (sample - self.value)
        return self.value
