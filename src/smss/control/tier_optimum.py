"""The windows of the tiered keep-alive policy: a cost minimum under a latency bound.

Pure numerics over idle-time histograms (:class:`~smss.control.tiered.TieredKeepAlive`
keeps them; its module docstring says what the windows mean). Given

* the histogram of a function's *level-1* idle times (from an arrival that found it
  with nothing in flight back to its previous arrival: the gaps its last instance, and
  below it its tiers, must bridge) and of its *surplus* idle times (the same for the
  k-th concurrent request, k >= 2: the gaps of its extra instances), and
* :class:`Prices`: an instance's price, each tier's memory price, a start from each
  tier and the spare's rehearsal,

:class:`Curve` returns the :class:`Windows` minimising the expected cost of its
arrivals plus ``lambda`` per slow one; :func:`shared_lambda` finds the least ``lambda``
(bisection) that keeps the expected share of slow arrivals of a set of functions
within a bound, and :func:`optimise` does it for one function alone.

Expected values use the bin edges as thresholds: for threshold ``t``,
``E[min(G, t)]`` and ``P(G >= t)`` by prefix sums, every candidate at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from smss.control.tiers import Tier, TierProfile

#: Bin edges of the idle-time histograms: 0, then 1 ms x 1.25^k up to a day.
EDGES = np.concatenate(([0.0], 1e-3 * 1.25 ** np.arange(0, math.ceil(math.log(86_400e3, 1.25)) + 1)))
BINS = len(EDGES)  # the last bin holds idle times beyond the last edge
#: A bin's representative idle time (geometric middle; 0.5 ms for the first).
_MID = np.concatenate(([0.5e-3], np.sqrt(EDGES[1:-1] * EDGES[2:]), [EDGES[-1]]))
#: Thresholds: every edge, and never (inf).
_T = np.concatenate((EDGES, [math.inf]))


def bin_of(gap_s: float) -> int:
    return min(int(np.searchsorted(EDGES, gap_s, side="right")) - 1, BINS - 1)


@dataclass(frozen=True, slots=True)
class Windows:
    """Seconds after the last arrival (``warm_s``, ``surplus_s``: of idleness)."""

    warm_s: float
    standby_s: float
    resident_s: float
    cold_s: float
    surplus_s: float
    #: Spares its template keeps ready.
    spares: int = 1


@dataclass(frozen=True, slots=True)
class Prices:
    """What the optimisation weighs, in dollars: ``instance`` per second of one
    instance, ``mb`` per MiB-second, ``core`` per core-second."""

    profile: TierProfile
    instance: float
    mb: float
    core: float
    objective_ms: float


def _moments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each threshold: E[min(G, t)] and P(G >= t) under ``counts``."""
    n = float(counts.sum())
    prob = counts / n
    below = np.concatenate(([0.0], np.cumsum(prob * _MID)))
    above = np.clip(1.0 - np.concatenate(([0.0], np.cumsum(prob))), 0.0, 1.0)
    above[-1] = 0.0
    held = below + np.nan_to_num(_T, posinf=0.0) * above
    return held, above


def _warm(counts: np.ndarray, c: Prices, spare: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold, the cost and slow share of an instance kept that long, then
    started again from its template: with a spare once it is back (``None``: a gap of
    at least the refill time; a fork before), always (``True``) or never (``False``)."""
    p = c.profile
    held, above = _moments(counts)
    if spare is None:
        back = above[int(np.searchsorted(_T, p.refill_ms / 1000, side="left"))]
    else:
        back = above if spare else 0.0
    forks = np.clip(above - back, 0.0, None)
    spare = above - forks
    restart = spare * (c.instance * p.standby_ms / 1000 + c.core * p.rehearse_ms / 1000)
    restart += forks * c.instance * p.fork_ms / 1000
    slow = forks * (p.fork_ms > c.objective_ms) + spare * (p.standby_ms > c.objective_ms)
    return c.instance * held + restart, slow


#: Spares a template may keep at most (one per concurrent start it makes fast).
MAX_SPARES = 8
#: Dollars per slow arrival that make every choice the least slow one (far above
#: the cost of any start), and the least worth telling from none.
LAMBDA_MAX, LAMBDA_MIN = 1.0, 1e-15


class Curve:
    """One function's choices, ready to solve for any ``lambda``: everything that does
    not depend on it is computed once (module docstring). ``surplus`` has a histogram
    per level 2 .. ``MAX_SPARES`` and one for the levels above (rows); an empty one
    keeps extra instances ``default_surplus_s``. The rows are by *burst index*: an
    arrival less than the spares' refill time after the previous one is the next of
    its burst. With ``k`` spares, the restarts of the first ``k`` arrivals of a burst
    find a spare, the others fork; each spare beyond the first holds ``spare_mb``
    while the template does."""

    def __init__(self, level1: np.ndarray, surplus: np.ndarray, c: Prices, default_surplus_s: float) -> None:
        p = c.profile
        self.n1 = float(level1.sum())
        self.rows = [float(r.sum()) for r in surplus]
        self.n2 = sum(self.rows)
        self.default_surplus_s = default_surplus_s
        self.held, self.above = _moments(level1)
        self.cost_w, self.slow_w = _warm(level1, c)
        # Per level row, the cost and slow arrivals with a spare and by a fork, summed
        # over the rows below each k (spares) and from k up (forks).
        seen = [i for i, n in enumerate(self.rows) if n > 0]
        self.min_spares = min(seen[-1] + 1, MAX_SPARES) if seen else 1
        zeros = (np.zeros(len(_T)), np.zeros(len(_T)))
        spare = [
            _scaled(_warm(r, c, True), n) if n else zeros for r, n in zip(surplus, self.rows, strict=True)
        ]
        fork = [
            _scaled(_warm(r, c, False), n) if n else zeros for r, n in zip(surplus, self.rows, strict=True)
        ]
        m = len(self.rows)
        k_cost, k_slow = [], []  # row k - 1: all surplus rows' cost and slow with k spares
        for k in range(1, MAX_SPARES + 1):
            parts = [spare[i] if i < k else fork[i] for i in range(m)]
            k_cost.append(sum(p[0] for p in parts))
            k_slow.append(sum(p[1] for p in parts))
        self.k_cost, self.k_slow = np.array(k_cost), np.array(k_slow)
        self.k_extra = np.arange(MAX_SPARES) * p.spare_mb * c.mb * self.n1  # spares beyond the first
        self.steps = []  # (cost per threshold without lambda, more slow per arrival beyond it)
        above_ms, above_slow = p.standby_ms, p.standby_ms > c.objective_ms
        for held_mb, tier in (
            (p.standby_mb, Tier.RESIDENT),
            (p.weights_mb, Tier.COLD),
            (p.runtime_mb, Tier.NO_RUNTIME),
        ):
            ms = p.start_ms(tier)
            more = max(float(ms > c.objective_ms) - float(above_slow), 0.0)
            self.steps.append(
                (held_mb * c.mb * self.held + self.above * (ms - above_ms) / 1000 * c.instance, more)
            )
            above_ms, above_slow = ms, ms > c.objective_ms

    @property
    def arrivals(self) -> float:
        return self.n1 + self.n2

    def solve(self, lam: float) -> tuple[Windows, float]:
        """The windows minimising cost + ``lam`` x slow arrivals, and the expected
        number of slow arrivals (of :attr:`arrivals`) under them."""
        above = self.above
        jw = int(np.argmin(self.cost_w + lam * self.slow_w))
        slow = self.n1 * float(self.slow_w[jw])
        chosen = [jw]
        for step_cost, more in self.steps:
            lo = chosen[-1]
            j = lo + int(np.argmin(step_cost[lo:] + lam * more * above[lo:]))
            chosen.append(j)
            slow += self.n1 * more * float(above[j])
        ts = [float(_T[j]) for j in chosen]
        surplus_s, spares = self.default_surplus_s, 1
        if self.n2 > 0:
            # row i is burst index i + 1: the first k of a burst have spares
            value = self.k_cost + lam * self.k_slow
            jx = np.argmin(value, axis=1)
            rows = np.arange(MAX_SPARES)
            total = value[rows, jx] + self.k_extra * float(self.held[chosen[1]])
            # Never fewer spares than the longest burst seen: a spare costs a few MiB,
            # and a burst it would not cover forks (a slow start) in a row.
            total[: self.min_spares - 1] = math.inf
            k = int(np.argmin(total))
            surplus_s, spares = float(_T[jx[k]]), k + 1
            slow += float(self.k_slow[k, jx[k]])
        return Windows(ts[0], ts[1], ts[2], ts[3], surplus_s, spares), slow


def optimise(
    level1: np.ndarray, surplus: np.ndarray, c: Prices, slow_share: float, default_surplus_s: float
) -> Windows:
    """One function's windows with at most ``slow_share`` of its arrivals slow
    (:class:`Curve`); ``level1`` must not be empty."""
    curve = Curve(level1, surplus, c, default_surplus_s)
    return curve.solve(shared_lambda([curve], slow_share))[0]


def shared_lambda(curves: list[Curve], slow_share: float) -> float:
    """The least ``lambda`` (to 20 %) at which the functions of ``curves``, each
    solving for it, expect at most ``slow_share`` of all their arrivals to be slow,
    less one arrival a function (its first may be slow: it can come while the function
    is still being built); :data:`LAMBDA_MAX` when even that cannot keep the bound.
    One price for a slow arrival everywhere spends the platform's budget where a slow
    start saves most."""
    total = sum(c.arrivals for c in curves)
    if total <= 0:
        return 0.0
    allowed = slow_share * total - len(curves)

    def slow(lam: float) -> float:
        return sum(c.solve(lam)[1] for c in curves)

    if slow(0.0) <= allowed:
        return 0.0
    lo, hi = LAMBDA_MIN, LAMBDA_MAX
    if slow(hi) > allowed:
        return hi
    while hi / lo > 1.2:
        lam = math.sqrt(lo * hi)
        if slow(lam) <= allowed:
            hi = lam
        else:
            lo = lam
    return hi


def _scaled(part: tuple[np.ndarray, np.ndarray], n: float) -> tuple[np.ndarray, np.ndarray]:
    return part[0] * n, part[1] * n
