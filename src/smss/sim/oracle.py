"""The hindsight-optimal cost of a trace: what a policy that knows every next arrival pays.

:func:`oracle_cost` prices the trace the way :class:`~smss.sim.simulator.Simulation`
meters a policy (instances at their declared resources from the moment they are asked
for, what each tier holds, the runtime's zygote, the spares' rehearsals, requests),
for a policy that knows when each request comes. Knowing that, it never makes a
request wait: whatever it stepped down to, it steps back up (and starts the instance)
just in time, so it meets any latency objective, and what it pays for an idle gap is
the cheapest way through it. Per function, in the trace's (compressed) time:

* **instances.** The requests in flight at each moment need ``ceil(n / concurrency)``
  instances; split into *levels* (level k is busy while at least k are needed), every
  busy second of every level is paid at the instance's price. Each idle gap ``g`` of a
  level costs the cheaper of keeping that instance (``g`` at the instance's price) or
  starting it again (its start from the template: ``standby_ms`` with a spare, and the
  spare's rehearsal, or ``fork_ms`` without one; the first busy period of a level pays
  one start);
* **tiers.** While the function has an instance (level 1 busy) it holds its template,
  spare and weights. Through each idle gap of level 1 it holds the cheapest of: the
  instance (warm), the template (standby), its weights only, rebuilding the template
  ``build_ms`` before the next arrival (resident), or nothing, reading the weights and
  building ``cold_ms - fork_ms`` before (cold); a step up holds what it builds while it
  builds. Before the first arrival it holds nothing (its first build is not priced:
  a policy may overlap it with the first request's wait, on an instance shared with
  later requests); after the last, it holds nothing;
* **the runtime's zygote**, shared: held while any function of the trace is busy (its
  first start is not priced, like a template's first build), and
  through each gap between such periods the cheaper of holding it or starting it again
  (``no_runtime_ms - cold_ms``).

This is a relaxation, so it is a lower bound on what any policy pays on the same trace
(:mod:`tests.unit.test_tiers_properties` checks it on random traces): the zygote's
restart is priced without the templates that would die with it, levels above the first
without the spare they might have to share, and a start's rehearsal as if no spare
were ever wasted. ``cost_vs_oracle = cost_usd / oracle_cost_usd`` is how far a policy is
from it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from smss.control.tiers import TierProfile
from smss.sim.config import SimConfig
from smss.sim.trace import Trace


def oracle_cost(trace: Trace, config: SimConfig, profile: TierProfile) -> float:
    """The hindsight-optimal cost in dollars of ``trace`` (module docstring)."""
    prices = config.prices
    res = config.resources
    rate_i = (
        res.cpu * prices.usd_per_vcpu_second
        + res.memory_mb / 1024 * prices.usd_per_gb_second
        + res.gpu * prices.usd_per_gpu_second
    )
    per_mb = prices.usd_per_gb_second / 1024
    rate_s, rate_w, rate_z = (
        profile.standby_mb * per_mb,
        profile.weights_mb * per_mb,
        profile.runtime_mb * per_mb,
    )
    refill = profile.rehearse_ms / 1000 * prices.usd_per_vcpu_second
    restart = min(rate_i * profile.standby_ms / 1000 + refill, rate_i * profile.fork_ms / 1000)
    build_s = profile.build_ms / 1000
    cold_build_s = max(profile.cold_ms - profile.fork_ms, 0.0) / 1000
    zygote_s = max(profile.no_runtime_ms - profile.cold_ms, 0.0) / 1000

    scale = 1000.0 * config.speedup
    t_all = trace.t_ms / scale
    d_all = trace.duration_ms / scale
    fidx = trace.function
    total = len(trace) / 1e6 * prices.usd_per_million_requests
    busy_periods: list[tuple[float, float]] = []  # level-1 busy periods of every function

    def level_one_gap(g: float) -> float:
        options = [
            (rate_i + rate_s + rate_w) * g,  # warm
            (rate_s + rate_w) * g + restart,  # standby
        ]
        if g >= build_s:
            options.append(rate_w * g + rate_s * build_s + restart)  # resident, rebuilt in time
        if g >= cold_build_s:
            options.append((rate_s + rate_w) * cold_build_s + restart)  # cold, rebuilt in time
        return min(options)

    for f in range(len(trace.functions)):
        mask = fidx == f
        starts, ends = t_all[mask], t_all[mask] + d_all[mask]
        if not len(starts):
            continue
        periods = _levels(starts, ends, config.concurrency)
        for level, intervals in enumerate(periods):
            busy = sum(b - a for a, b in intervals)
            total += rate_i * busy
            if level == 0:
                total += (rate_s + rate_w) * busy + restart
                busy_periods.extend(intervals)
            else:
                total += restart
            for (_, prev_end), (nxt, _) in itertools.pairwise(intervals):
                g = nxt - prev_end
                total += level_one_gap(g) if level == 0 else min(rate_i * g, restart)
    total += _runtime_cost(busy_periods, rate_z, zygote_s)
    return total


def _levels(starts: np.ndarray, ends: np.ndarray, concurrency: int) -> list[list[tuple[float, float]]]:
    """The busy intervals of each level (module docstring), from requests' [start, end)."""
    events = sorted(
        [(float(a), 1) for a in starts] + [(float(b), -1) for b in ends], key=lambda e: (e[0], e[1])
    )
    levels: list[list[tuple[float, float]]] = []
    opened: list[float] = []  # start of the current busy interval of each level that is on
    n = 0
    for t, delta in events:
        n += delta
        need = math.ceil(n / concurrency) if n > 0 else 0
        while len(opened) < need:
            opened.append(t)
        while len(opened) > need:
            k = len(opened) - 1
            begin = opened.pop()
            while len(levels) <= k:
                levels.append([])
            if t > begin:
                levels[k].append((begin, t))
    return levels


def _runtime_cost(periods: list[tuple[float, float]], rate: float, restart_s: float) -> float:
    """The zygote held through the union of ``periods``, started once before them, and
    through each gap between them held or restarted, whichever is cheaper."""
    if not periods:
        return 0.0
    periods.sort()
    cur_a, cur_b = periods[0]
    cost = 0.0
    for a, b in periods[1:]:
        if a <= cur_b:
            cur_b = max(cur_b, b)
            continue
        cost += rate * (cur_b - cur_a) + rate * min(a - cur_b, restart_s)
        cur_a, cur_b = a, b
    return cost + rate * (cur_b - cur_a)
