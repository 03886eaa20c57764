"""Instance choice for one request: power of two choices on expected wait.

Pure: the gateway's dispatcher and the simulator call :func:`choose` with the
instances' current loads and a seeded ``random.Random``. Expected wait of an
instance is ``(in_flight + 1) x EWMA service time``; an instance at its
concurrency limit is never chosen. When the request names a preferred node
(where its data lives), free instances there win over the rest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


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
    if len(free) == 1:
        return free[0].id
    a, b = rng.sample(free, 2)
    # Ties go to the less busy one so that an unmeasured (ewma 0) pool still spreads load.
    return min((a, b), key=lambda c: (c.expected_wait_s, c.in_flight)).id


class Ewma:
    """Exponentially weighted moving average of service time, seeded by the first sample."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2, initial: float = 0.0) -> None:
        self.alpha = alpha
        self.value = initial

    def update(self, sample: float) -> float:
        self.value = sample if self.value == 0.0 else self.value + self.alpha * (sample - self.value)
        return self.value
