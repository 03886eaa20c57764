"""Keep-alive policies: how long an idle instance lives, and when to pre-warm one.

Pure and clock-driven like the autoscaler: the controller reports every arrival with
:meth:`KeepAlivePolicy.on_invocation` and asks, each tick, :meth:`keep_alive_s` (stop
the function's *last* instance once it has been idle that long, scaling the function
to zero), :meth:`surplus_keep_alive_s` (the same for any other idle instance: capacity
beyond the first) and :meth:`prewarm_at` (have an instance ready by that time if none
is); :func:`smss.control.scaling.plan` applies the two windows. A function's own
``scaling.keep_alive_s`` overrides the policy for both; that is the controller's
business, not the policy's.

Policies, chosen by :func:`parse_policy`:

* ``fixed:SECONDS`` (:class:`FixedKeepAlive`) - the platform default of AWS Lambda
  (10 min) or Azure Functions (20 min): one TTL for everyone, no pre-warming.
* ``hybrid`` or ``hybrid:key=value,...`` (:class:`HybridKeepAlive`) - the hybrid
  histogram policy of "Serverless in the Wild" (Shahrad et al., USENIX ATC 2020),
  which learns each function's idle times.
* ``tiered`` or ``tiered:key=value,...`` (:class:`~smss.control.tiered.TieredKeepAlive`)
  - learns each function's idle times too, and decides every tier of readiness
  (:mod:`smss.control.tiers`): how long its last instance, then its template and
  spare, then its weights, then its claim on the runtime's zygote stay, at the least
  cost under a latency objective.

Beyond instances, :meth:`KeepAlivePolicy.tier_target` says what a function with no
instance keeps resident (:class:`~smss.control.tiers.TierTarget`). ``fixed`` and
``hybrid`` keep everything below an instance (:data:`~smss.control.tiers.KEEP_ALL`:
the template, spare and weights stay until the weight store's budget evicts them, as
before tiers were decided) and build nothing ahead of demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from smss.control.cost import PriceTable
from smss.control.tiered import LatencyObjective, TieredKeepAlive, parse_tiered
from smss.control.tiers import KEEP_ALL, TierProfile, TierTarget
from smss.errors import InvalidSpec
from smss.spec import Resources


class KeepAlivePolicy(Protocol):
    #: Whether instances beyond what the demand now needs are this policy's to keep
    #: (its surplus window) rather than the autoscaler's (its desired count).
    caps_to_demand: bool

    def on_invocation(self, function: str, now: float, demand: int = 0) -> None:
        """Record an arrival of ``function`` at ``now`` (monotonic seconds) that found
        ``demand`` requests in flight or queued."""
        ...

    def keep_alive_s(self, function: str, now: float) -> float:
        """How long the last instance of ``function`` may stay idle before it is stopped."""
        ...

    def surplus_keep_alive_s(self, function: str, now: float) -> float:
        """How long an idle instance of ``function`` that is not its last may stay idle."""
        ...

    def prewarm_at(self, function: str, now: float) -> float | None:
        """When to have an instance of ``function`` ready next; ``None``: no pre-warm."""
        ...

    def tier_target(self, function: str, now: float) -> TierTarget:
        """What ``function`` keeps resident while it has no instance."""
        ...

    def describe(self, function: str, resources: Resources, now: float, *, concurrency: int = 1) -> None:
        """``function`` was deployed at ``now`` with these declared ``resources``."""
        ...


class FixedKeepAlive:
    """Every idle instance lives ``ttl_s`` seconds, the last one and the others alike
    (one TTL per instance, as on AWS Lambda); nothing is pre-warmed."""

    caps_to_demand = False

    def __init__(self, ttl_s: float) -> None:
        if not math.isfinite(ttl_s) or ttl_s < 0:
            raise InvalidSpec(f"keep-alive TTL must be a finite number >= 0, got {ttl_s}")
        self.ttl_s = float(ttl_s)

    def on_invocation(self, function: str, now: float, demand: int = 0) -> None:
        pass

    def keep_alive_s(self, function: str, now: float) -> float:
        return self.ttl_s

    def surplus_keep_alive_s(self, function: str, now: float) -> float:
        return self.ttl_s

    def prewarm_at(self, function: str, now: float) -> float | None:
        return None

    def tier_target(self, function: str, now: float) -> TierTarget:
        return KEEP_ALL

    def describe(self, function: str, resources: Resources, now: float, *, concurrency: int = 1) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedKeepAlive(ttl_s={self.ttl_s})"


@dataclass(frozen=True)
class HybridConfig:
    """Settings of :class:`HybridKeepAlive`; the defaults and why are in its docstring."""

    bin_s: float = 1.0
    range_s: float = 600.0
    head_percentile: float = 5.0
    tail_percentile: float = 99.0
    margin: float = 0.10
    cv_threshold: float = 2.0
    min_samples: int = 10
    oob_threshold: float = 0.5
    surplus_s: float = 60.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidSpec:
            return InvalidSpec(f"hybrid keep-alive: {msg}")

        if not math.isfinite(self.bin_s) or self.bin_s <= 0:
            raise bad(f"bin_s must be > 0, got {self.bin_s}")
        if not math.isfinite(self.range_s) or self.range_s < self.bin_s:
            raise bad(f"range_s must be >= bin_s, got {self.range_s}")
        if self.range_s / self.bin_s > 100_000:
            raise bad("range_s / bin_s must be at most 100000 bins")
        if not 0 <= self.head_percentile <= self.tail_percentile <= 100:
            raise bad("need 0 <= head_percentile <= tail_percentile <= 100")
        if not 0 <= self.margin < 1:
            raise bad(f"margin must be in [0, 1), got {self.margin}")
        if not self.cv_threshold >= 0:
            raise bad(f"cv_threshold must be >= 0, got {self.cv_threshold}")
        if self.min_samples < 1:
            raise bad(f"min_samples must be >= 1, got {self.min_samples}")
        if not 0 < self.oob_threshold <= 1:
            raise bad(f"oob_threshold must be in (0, 1], got {self.oob_threshold}")
        if not math.isfinite(self.surplus_s) or self.surplus_s < 0:
            raise bad(f"surplus_s must be a finite number >= 0, got {self.surplus_s}")

    @property
    def bins(self) -> int:
        return max(1, round(self.range_s / self.bin_s))


class _Windows:
    """A learned decision, in seconds after an arrival: pre-warm at ``prewarm_s`` (0:
    never unload) and keep the function loaded until ``window_end_s``."""

    __slots__ = ("prewarm_s", "window_end_s")

    def __init__(self, prewarm_s: float, window_end_s: float) -> None:
        self.prewarm_s = prewarm_s
        self.window_end_s = window_end_s


class _Histogram:
    """Idle times of one function: counts per bin, out-of-bound count, and the sum of
    squared counts so that the CV of the bin counts costs O(1)."""

    __slots__ = ("counts", "decision", "dirty", "in_range", "last_arrival", "oob", "sumsq")

    def __init__(self, bins: int) -> None:
        self.counts = np.zeros(bins, dtype=np.int64)
        self.in_range = 0
        self.oob = 0
        self.sumsq = 0
        self.last_arrival: float | None = None
        self.dirty = True
        self.decision: _Windows | None = None

    def add(self, idle_s: float, bin_s: float) -> None:
        i = int(idle_s // bin_s)
        if i >= len(self.counts):
            self.oob += 1
        else:
            k = int(self.counts[i])
            self.counts[i] = k + 1
            self.sumsq += 2 * k + 1
            self.in_range += 1
        self.dirty = True

    def cv(self) -> float:
        n, b = self.in_range, len(self.counts)
        if n == 0:
            return 0.0
        mean = n / b
        var = max(self.sumsq / b - mean * mean, 0.0)
        return math.sqrt(var) / mean


class HybridKeepAlive:
    """The hybrid histogram policy of "Serverless in the Wild" (ATC 2020), per function.

    **What it learns.** For each function, the idle time between consecutive arrivals
    goes into a range-limited histogram of ``bins = range_s / bin_s`` bins; idle times
    of ``range_s`` or more are counted as out of bounds (OOB). (The paper measures from
    the end of one execution; the controller reports arrivals only, so we measure
    arrival to arrival, which errs on the side of keeping alive a little longer.)

    **Rules**, re-evaluated after each arrival:

    1. Fewer than ``min_samples`` idle times (OOB included): *fixed TTL*
       (``fallback_ttl_s``), no pre-warm. Ten samples is the fewest at which the
       5th/99th percentiles are not simply "whatever happened last".
    2. OOB fraction >= ``oob_threshold``: *fixed TTL*. The paper forecasts such
       functions' next idle time with ARIMA; we do not (no time-series dependency, and
       on our traces an idle time over 10 minutes is rare), so they fall back.
    3. CV (std/mean) of the in-range bin counts < ``cv_threshold``: the idle times are
       spread too evenly for the histogram to predict anything (the paper's
       representativeness test, threshold 2): *fixed TTL*.
    4. Otherwise head = the ``head_percentile`` (5th) and tail = the
       ``tail_percentile`` (99th) of the in-range idle times, at bin resolution, with
       the paper's 10 % ``margin``:

       * pre-warm window ``P = lower edge of head's bin x (1 - margin)``;
       * window end ``E = upper edge of tail's bin x (1 + margin)``;
       * if ``P == 0`` (the head is in the first bin) there is no pre-warm and
         ``keep_alive_s = E``;
       * else ``prewarm_at = last arrival + P`` (until ``last arrival + E`` has passed)
         and ``keep_alive_s = E - P``, so a pre-warmed instance lives until the tail.

       The paper unloads the serving instance right after its execution when it
       pre-warms; here it may idle ``E - P`` like a pre-warmed one (a pre-warmed
       instance that became ready a little early must not be stopped either, and the
       plan cannot tell them apart). That costs at most ``E - P`` idle seconds per
       arrival and spares the arrivals in ``[0, P)`` a cold start: on the 30-minute
       trace, unloading at once as the paper does made 752 cold starts (and 2,131
       pre-warm starts) where this makes 624, for the same GB-seconds.

    **What the windows apply to.** The histogram describes the *function's* idle
    times, so its windows govern the function's last instance: they decide when the
    function scales to zero and when it is pre-warmed. Instances beyond the first are
    capacity for concurrency, which the function's idle times say nothing about (a
    function invoked every 0.6 s learns a keep-alive of seconds, yet its 20 concurrent
    instances idle for longer between bursts): they are the autoscaler's, stopped by
    :func:`~smss.control.scaling.plan` once the autoscaler no longer wants them and
    they have idled ``surplus_s`` (:meth:`surplus_keep_alive_s`), the autoscaler's
    stable window (60 s): capacity unused for a whole stable window is capacity its
    averaged demand no longer covers.

    **Defaults and why.** ``bin_s = 1`` and ``range_s = 600`` rather than the paper's
    1 minute and 4 hours: our traces (``traces/``) span 20-30 minutes and their
    idle times run from 50 ms to a few minutes (median 0.8-3 s, 99th percentile about
    90 s, 99.9th 2.5-4 min), so minute bins would put nearly every idle time in bin 0
    and the policy would never pre-warm; 1 s bins resolve second-scale periods, and
    10 minutes covers the traces' idle times and equals the common 10-minute fixed TTL,
    so "out of bounds" means "longer than a fixed policy would wait anyway". With 600
    bins the CV threshold of 2 calls a histogram representative when its idle times
    concentrate in at most about a fifth of the range (2 minutes). Percentiles,
    margin and CV threshold are the paper's; it turns to ARIMA when "many" idle times
    are OOB, which we read as half. The histogram never forgets; a function whose
    pattern changes is relearned only as new samples outweigh old ones.

    **What it achieves on ``traces/``** (``smss simulate``, 500 ms starts): on
    the 30-minute trace 624 cold starts and 128k GB-s, against 181 and 178k for
    ``fixed:600`` and 870 / 121k for ``fixed:60``: about 4 % fewer GB-seconds than
    fixed TTLs at equal cold starts. Those traces are not periodic (idle-time CV
    1.1-2.4), so nothing is pre-warmed, and the gain is the split between the last
    instance and the others, not the learning: keeping the last instance for the
    fallback TTL instead (``hybrid:min_samples=100000``) does as well or better (436
    cold starts for 134k GB-s). The paper's savings come from periodic functions and
    functions idle for hours, which 20-30 minutes of these traces do not hold.

    Cost: ``on_invocation`` O(1); the first query after an arrival O(bins) in numpy
    (a few microseconds), later ones O(1).
    """

    caps_to_demand = False

    def __init__(self, fallback_ttl_s: float, config: HybridConfig | None = None) -> None:
        self._fallback = FixedKeepAlive(fallback_ttl_s)
        self.config = config or HybridConfig()
        self._hists: dict[str, _Histogram] = {}

    @property
    def fallback_ttl_s(self) -> float:
        return self._fallback.ttl_s

    def on_invocation(self, function: str, now: float, demand: int = 0) -> None:
        h = self._hists.get(function)
        if h is None:
            h = self._hists[function] = _Histogram(self.config.bins)
        last = h.last_arrival
        if last is None or now > last:
            if last is not None:
                h.add(now - last, self.config.bin_s)
            h.last_arrival = now
        elif now < last:  # an arrival reported out of order: keep the histogram causal
            return
        else:
            h.add(0.0, self.config.bin_s)

    def keep_alive_s(self, function: str, now: float) -> float:
        w = self._windows(function)
        return self._fallback.ttl_s if w is None else w.window_end_s - w.prewarm_s

    def surplus_keep_alive_s(self, function: str, now: float) -> float:
        return self.config.surplus_s

    def prewarm_at(self, function: str, now: float) -> float | None:
        w = self._windows(function)
        if w is None or w.prewarm_s <= 0:
            return None
        last = self._hists[function].last_arrival
        if last is None or now > last + w.window_end_s:
            return None
        return last + w.prewarm_s

    def tier_target(self, function: str, now: float) -> TierTarget:
        return KEEP_ALL

    def describe(self, function: str, resources: Resources, now: float, *, concurrency: int = 1) -> None:
        pass

    def forget(self, function: str) -> None:
        """Drop what was learned about ``function`` (deleted or redeployed)."""
        self._hists.pop(function, None)

    def _windows(self, function: str) -> _Windows | None:
        h = self._hists.get(function)
        if h is None:
            return None
        if h.dirty:
            h.decision = self._decide(h)
            h.dirty = False
        return h.decision

    def _decide(self, h: _Histogram) -> _Windows | None:
        cfg = self.config
        total = h.in_range + h.oob
        if total < cfg.min_samples or h.oob >= cfg.oob_threshold * total:
            return None
        if h.cv() < cfg.cv_threshold:
            return None
        cum = np.cumsum(h.counts)
        head, tail = np.searchsorted(
            cum,
            [h.in_range * cfg.head_percentile / 100, h.in_range * cfg.tail_percentile / 100],
        )
        prewarm = int(head) * cfg.bin_s * (1 - cfg.margin)
        end = (int(tail) + 1) * cfg.bin_s * (1 + cfg.margin)
        return _Windows(prewarm, end)


def parse_policy(
    text: str,
    default_ttl_s: float,
    *,
    profile: TierProfile | None = None,
    objective: LatencyObjective | None = None,
    prices: PriceTable | None = None,
) -> KeepAlivePolicy:
    """``"fixed"`` (TTL ``default_ttl_s``), ``"fixed:600"``, ``"hybrid"`` or
    ``"hybrid:bin_s=1,range_s=600,..."`` (fields of :class:`HybridConfig`; the
    hybrid policy falls back to ``default_ttl_s``), ``"tiered"`` or
    ``"tiered:min_samples=10,..."`` (fields of :class:`~smss.control.tiered.TieredConfig`;
    it prices tiers by ``profile`` and ``prices`` under ``objective``). Anything else:
    :class:`InvalidSpec`."""
    usage = "use 'fixed', 'fixed:SECONDS', 'hybrid[:KEY=VALUE,...]' or 'tiered[:KEY=VALUE,...]'"
    kind, sep, arg = text.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind == "fixed":
        if not sep:
            return FixedKeepAlive(default_ttl_s)
        try:
            ttl = float(arg.removesuffix("s"))
        except ValueError:
            raise InvalidSpec(f"keep-alive policy {text!r}: {arg!r} is not seconds; {usage}") from None
        return FixedKeepAlive(ttl)
    if kind == "hybrid":
        return HybridKeepAlive(default_ttl_s, _parse_hybrid(text, arg if sep else "", usage))
    if kind == "tiered":
        config = parse_tiered(text, arg if sep else "", usage)
        return TieredKeepAlive(default_ttl_s, config, profile=profile, objective=objective, prices=prices)
    raise InvalidSpec(f"unknown keep-alive policy {text!r}: {usage}")


def scale_policy(text: str, default_ttl_s: float, factor: float) -> tuple[str, float]:
    """``text`` and ``default_ttl_s`` with every duration multiplied by ``factor``: what
    a platform replaying a trace ``1/factor`` times faster must run to make the same
    decisions (``fixed:600`` at 10x is ``fixed:60``; ``hybrid`` scales its bins, range
    and ``surplus_s``, not its percentiles or thresholds). Returns the policy text and
    the scaled default (fallback) TTL. Bad text: :class:`InvalidSpec`."""
    if not (math.isfinite(factor) and factor > 0):
        raise InvalidSpec(f"time scale must be a finite number > 0, got {factor}")
    policy = parse_policy(text, default_ttl_s)
    ttl = default_ttl_s * factor
    if isinstance(policy, FixedKeepAlive):
        return f"fixed:{policy.ttl_s * factor!r}", ttl
    if isinstance(policy, TieredKeepAlive):
        tcfg = replace(policy.config, surplus_s=policy.config.surplus_s * factor)
        options = ",".join(f"{f.name}={getattr(tcfg, f.name)!r}" for f in fields(tcfg))
        return f"tiered:{options}", ttl
    if not isinstance(policy, HybridKeepAlive):  # pragma: no cover - parse_policy makes only these
        raise InvalidSpec(f"cannot scale keep-alive policy {text!r}")
    cfg = policy.config
    scaled = replace(
        cfg, bin_s=cfg.bin_s * factor, range_s=cfg.range_s * factor, surplus_s=cfg.surplus_s * factor
    )
    options = ",".join(f"{f.name}={getattr(scaled, f.name)!r}" for f in fields(HybridConfig))
    return f"hybrid:{options}", ttl


def _parse_hybrid(text: str, arg: str, usage: str) -> HybridConfig:
    types = {f.name: f.type for f in fields(HybridConfig)}
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
    return HybridConfig(**values)  # type: ignore[arg-type]


if TYPE_CHECKING:  # the policies satisfy the protocol (checked by mypy, never run)
    _fixed: KeepAlivePolicy = FixedKeepAlive(1.0)
    _hybrid: KeepAlivePolicy = HybridKeepAlive(1.0)
    _tiered: KeepAlivePolicy = TieredKeepAlive(1.0)
