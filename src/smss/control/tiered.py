"""The tiered keep-alive policy: how long a function stays in each tier, under a latency objective.

Pure and clock-driven like :mod:`smss.control.keepalive` (whose protocol it
implements). Per function it learns idle times in histograms (log-spaced
bins from 1 ms to a day, so that a function invoked every 100 ms and one invoked every
hour are resolved alike): the *level-1* idle times (an arrival that finds nothing in
flight, back to the previous arrival) and the *surplus* ones (an arrival that is the
k-th in flight, k >= 2, back to the previous arrival that was k-th or more: the idle
times of its extra instances). From them it chooses five windows
(:mod:`smss.control.tier_optimum`), the first and last of idleness, the others
measured from the function's last arrival:

* ``warm_s``: how long its last instance idles before it is stopped;
* ``surplus_s``: how long any other idle instance stays;
* ``standby_s``: until when its template and spare stay (then: ``resident``);
* ``resident_s``: until when its weights stay in the store (then: ``cold``);
* ``cold_s``: until when it wants its runtime's zygote (then: ``no_runtime``; the
  zygote stops once no function of the runtime wants it).

**What it minimises.** The expected cost of one idle gap ``G`` (the time to the next
arrival) in dollars, at the platform's prices (:class:`~smss.control.cost.PriceTable`):
what is held during the gap (an instance's declared resources while warm, then the
memory of each tier, :class:`~smss.control.tiers.TierProfile`) plus what the next
start costs (the instance is metered from the moment it is asked for, so a start from
a lower tier costs that tier's start time at the instance's price; a start that
consumes the template's spare costs the spare's rehearsal, ``rehearse_ms`` of one core).
Each window is chosen over the bin edges by one vectorised pass over a histogram.

**Subject to the latency objective** (:class:`LatencyObjective`, default: the 99th
percentile of the latency a start adds within 10 ms): the arrivals that would find the
function in a tier whose start adds more than the objective (a template to build, or
a fork whose spare is not ready yet: a gap shorter than the spare's refill) may be at
most ``safety`` (half) of the objective's share (1 %) of the function's arrivals. The
windows minimise cost plus ``lambda`` per slow arrival, with ``lambda`` the smallest
(found by bisection) that keeps the expected share of slow arrivals within that bound.
A per-function bound keeps the platform-wide percentile too (the shares add up), and
the other half of the budget is headroom for what the histogram does not foresee:
bursts whose extra instances fork without a spare, and the next arrival of a gap
longer than any seen.

**What it does not know yet.** The histogram holds ``prior`` pseudo-samples of an idle
time longer than its range, so a function that has had fewer than about
``prior / (safety x budget)`` (200) arrivals never leaves standby: its idle times say
too little to bet a slow start on, and standby is cheap (a template's own pages and
its weights, not an instance). With fewer than ``min_samples`` idle times it keeps its
last instance for the spare's refill time, so that the next start finds a spare, extra
instances ``surplus_s``, and the most spares (``MAX_SPARES``): a burst it has not
learned yet finds them ready. Once learned, a template keeps at least as many spares as
the longest burst seen (arrivals less than the refill time apart that needed more
instances), and more where they save more than they hold. A
function deployed and not yet invoked is built up to standby at once (``ensure``), so
its first request is a fork, not a template build.

Cost: ``on_invocation`` O(1); the windows are re-optimised lazily when a query finds
the histogram grown by an eighth (at least 4 samples) since the last time: a few
hundred microseconds each, O(log n) times per function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from smss.control.cost import PriceTable
from smss.control.tier_optimum import (
    BINS,
    LAMBDA_MAX,
    MAX_SPARES,
    Curve,
    Prices,
    Windows,
    bin_of,
    shared_lambda,
)
from smss.control.tiers import Tier, TierProfile, TierTarget
from smss.errors import InvalidSpec
from smss.spec import Resources

__all__ = ["LatencyObjective", "TieredConfig", "TieredKeepAlive", "Windows", "parse_tiered"]


@dataclass(frozen=True)
class LatencyObjective:
    """The added latency a start may cost: at most ``ms`` at the ``percentile``."""

    ms: float = 10.0
    percentile: float = 99.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ms) and self.ms >= 0):
            raise InvalidSpec(f"latency objective must be a finite number of ms >= 0, got {self.ms}")
        if not 0 < self.percentile < 100:
            raise InvalidSpec(f"latency percentile must be in (0, 100), got {self.percentile}")

    @property
    def budget(self) -> float:
        """The share of arrivals that may exceed the objective."""
        return 1.0 - self.percentile / 100.0


@dataclass(frozen=True)
class TieredConfig:
    """Settings of :class:`TieredKeepAlive` (see its module docstring)."""

    min_samples: int = 10
    safety: float = 0.5
    prior: float = 1.0
    #: Extra instances' idle window until their idle times are learned (about the
    #: spares' refill time, like the last instance's until then).
    surplus_s: float = 0.25

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise InvalidSpec(f"tiered keep-alive: min_samples must be >= 1, got {self.min_samples}")
        if not 0 < self.safety <= 1:
            raise InvalidSpec(f"tiered keep-alive: safety must be in (0, 1], got {self.safety}")
        if not (math.isfinite(self.prior) and self.prior >= 0):
            raise InvalidSpec(f"tiered keep-alive: prior must be >= 0, got {self.prior}")
        if not (math.isfinite(self.surplus_s) and self.surplus_s >= 0):
            raise InvalidSpec(f"tiered keep-alive: surplus_s must be >= 0, got {self.surplus_s}")


class _Fn:
    __slots__ = (
        "burst",
        "concurrency",
        "curve",
        "decided_at",
        "decision",
        "invoked",
        "last",
        "level1",
        "levels",
        "n",
        "n_decided",
        "profile",
        "rate",
        "surplus",
    )

    def __init__(self, profile: TierProfile, rate: float) -> None:
        self.level1 = np.zeros(BINS, dtype=np.float64)
        #: By burst index 1 .. MAX_SPARES - 1, and one row for those above.
        self.surplus = np.zeros((MAX_SPARES, BINS), dtype=np.float64)
        self.burst = 1  # the last arrival's index in its burst
        self.n = 0  # idle times recorded, both histograms
        self.n_decided = -1
        self.invoked = False
        self.last: float | None = None  # last arrival (or deploy)
        #: The last arrival that was the k-th in flight or more, for k >= 2 (index k - 2).
        self.levels: list[float] = []
        self.decision: Windows | None = None
        self.decided_at = -1  # the policy's generation of lambda the decision was made at
        self.curve: Curve | None = None
        self.profile = profile
        self.rate = rate  # $ per second of one instance
        self.concurrency = 1


class TieredKeepAlive:
    """The tiered policy (module docstring). ``profile``: each tier's costs for a
    function not :meth:`describe`d otherwise; ``prices`` turn resources into money."""

    #: Extra instances are held for the surplus window, not the autoscaler's average.
    caps_to_demand = True

    def __init__(
        self,
        fallback_ttl_s: float,
        config: TieredConfig | None = None,
        *,
        profile: TierProfile | None = None,
        objective: LatencyObjective | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        if not math.isfinite(fallback_ttl_s) or fallback_ttl_s < 0:
            raise InvalidSpec(f"keep-alive TTL must be a finite number >= 0, got {fallback_ttl_s}")
        self.fallback_ttl_s = float(fallback_ttl_s)
        self.config = config or TieredConfig()
        self.profile = profile or TierProfile()
        self.objective = objective or LatencyObjective()
        self.prices = prices or PriceTable()
        self._default_rate = self._rate(Resources())
        self._fns: dict[str, _Fn] = {}
        #: The price of a slow arrival, shared by every function (see the module
        #: docstring), re-solved as the idle times recorded grow by a quarter.
        self._lam = LAMBDA_MAX
        self._generation = 0
        self._samples = 0
        self._samples_solved = 0

    def _rate(self, r: Resources) -> float:
        p = self.prices
        return (
            r.cpu * p.usd_per_vcpu_second
            + r.memory_mb / 1024 * p.usd_per_gb_second
            + r.gpu * p.usd_per_gpu_second
        )

    def _fn(self, function: str) -> _Fn:
        fn = self._fns.get(function)
        if fn is None:
            fn = self._fns[function] = _Fn(self.profile, self._default_rate)
        return fn

    # ------------------------------------------------------------ events

    def describe(
        self,
        function: str,
        resources: Resources,
        now: float,
        *,
        concurrency: int = 1,
        profile: TierProfile | None = None,
    ) -> None:
        """``function`` is deployed at ``now`` with ``resources`` and ``concurrency``
        (and, when known, its own tier costs): it is built up to standby and its
        windows start now."""
        fn = self._fn(function)
        fn.rate = self._rate(resources)
        fn.concurrency = max(1, concurrency)
        if profile is not None:
            fn.profile = profile
        fn.n_decided = -1
        if fn.last is None:
            fn.last = now

    def on_invocation(self, function: str, now: float, demand: int = 0) -> None:
        """An arrival at ``now``, finding ``demand`` requests in flight or queued."""
        fn = self._fn(function)
        last = fn.last
        if last is not None and now < last:
            return  # reported out of order: keep the histograms causal
        level = demand // fn.concurrency + 1
        refill_s = fn.profile.refill_ms / 1000
        fn.burst = fn.burst + 1 if last is not None and fn.invoked and now - last < refill_s else 1
        if level == 1:
            if fn.invoked and last is not None:  # (a deploy is not an arrival: no gap from it)
                fn.level1[bin_of(now - last)] += 1.0
                fn.n += 1
                self._samples += 1
        else:
            levels = fn.levels
            if len(levels) >= level - 1:
                fn.surplus[min(fn.burst - 1, MAX_SPARES - 1), bin_of(now - levels[level - 2])] += 1.0
                fn.n += 1
                self._samples += 1
            while len(levels) < level - 1:
                levels.append(now)
            for k in range(level - 1):
                levels[k] = now
        fn.last = now
        fn.invoked = True

    def forget(self, function: str) -> None:
        """Drop what was learned about ``function`` (deleted or redeployed)."""
        self._fns.pop(function, None)

    # ------------------------------------------------------------ answers

    def keep_alive_s(self, function: str, now: float) -> float:
        return self.windows(function).warm_s

    def surplus_keep_alive_s(self, function: str, now: float) -> float:
        return self.windows(function).surplus_s

    def prewarm_at(self, function: str, now: float) -> float | None:
        return None

    def tier_target(self, function: str, now: float) -> TierTarget:
        fn = self._fns.get(function)
        if fn is None or fn.last is None:
            return TierTarget(Tier.STANDBY, Tier.NO_RUNTIME)
        w = self.windows(function)
        elapsed = now - fn.last
        ensure = Tier.NO_RUNTIME if fn.invoked else Tier.STANDBY
        for until, keep in (
            (w.standby_s, Tier.STANDBY),
            (w.resident_s, Tier.RESIDENT),
            (w.cold_s, Tier.COLD),
        ):
            if elapsed < until:
                return TierTarget(keep, min(ensure, keep), fn.last + until, w.spares)
        return TierTarget(Tier.NO_RUNTIME, Tier.NO_RUNTIME, spares=w.spares)

    def windows(self, function: str) -> Windows:
        """The function's windows now (re-optimised when its histograms have grown,
        or the shared price of a slow arrival has changed)."""
        if self._samples >= max(32, self._samples_solved + self._samples_solved // 4):
            self._solve_lambda()
        fn = self._fn(function)
        if self._refresh_curve(fn) or fn.decision is None or fn.decided_at != self._generation:
            if fn.curve is None:
                p = fn.profile
                fn.decision = Windows(
                    p.refill_ms / 1000, math.inf, math.inf, math.inf, self.config.surplus_s, MAX_SPARES
                )
            else:
                fn.decision = fn.curve.solve(self._lam)[0]
            fn.decided_at = self._generation
        return fn.decision

    def _refresh_curve(self, fn: _Fn) -> bool:
        """Rebuild the function's :class:`Curve` if its histograms grew by an eighth."""
        if fn.n_decided >= 0 and fn.n - fn.n_decided < max(8, fn.n_decided // 8):
            return False
        fn.n_decided = fn.n
        cfg = self.config
        if fn.n < cfg.min_samples:
            fn.curve = None
            return True
        level1 = fn.level1.copy()
        level1[-1] += max(cfg.prior, 1e-9)  # never empty (a function always busy has no level-1 gap)
        surplus = fn.surplus
        prices = Prices(
            fn.profile,
            fn.rate,
            self.prices.usd_per_gb_second / 1024,
            self.prices.usd_per_vcpu_second,
            self.objective.ms,
        )
        fn.curve = Curve(level1, surplus, prices, cfg.surplus_s)
        return True

    def _solve_lambda(self) -> None:
        for fn in self._fns.values():
            self._refresh_curve(fn)
        curves = [fn.curve for fn in self._fns.values() if fn.curve is not None]
        self._lam = shared_lambda(curves, self.objective.budget * self.config.safety)
        self._samples_solved = self._samples
        self._generation += 1

    def __repr__(self) -> str:
        return f"TieredKeepAlive(fallback_ttl_s={self.fallback_ttl_s}, config={self.config})"


def parse_tiered(text: str, arg: str, usage: str) -> TieredConfig:
    types = {f.name: f.type for f in fields(TieredConfig)}
    values: dict[str, float | int] = {}
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or key not in types:
            raise InvalidSpec(
                f"keep-alive policy {text!r}: bad option {item!r}; options are {', '.join(types)}; {usage}"
            )
        try:
            values[key] = int(raw) if types[key] == "int" else float(raw)
        except ValueError:
            raise InvalidSpec(f"keep-alive policy {text!r}: {key}={raw!r} is not a number") from None
    return TieredConfig(**values)  # type: ignore[arg-type]
