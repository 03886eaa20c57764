"""Per-function autoscaler in the manner of Knative's KPA: pure and clock-driven.

The controller feeds it one number per tick, the function's concurrency (requests
in flight plus requests queued), and asks it how many instances the function should
have. It never reads a clock: every call carries ``now`` (monotonic seconds), so the
simulator and the tests drive the same object on virtual time.

Rules of :meth:`Autoscaler.desired`, in order:

1. **Averages.** The concurrency signal is a step function: a sample holds until the
   next one (so irregular sampling is weighted by time, not by call count). Its
   time-weighted averages over the last ``stable_window_s`` and ``panic_window_s``
   (over the observed span while history is shorter) give
   ``stable = ceil(avg_stable / target)`` and ``panic = ceil(avg_panic / target)``.
   Rounding up tolerates 1e-9 of float noise, so 4.000000000001 counts as 4.
2. **Rate limits** (per decision), with ``r = max(ready, 1)``: at most
   ``max(ceil(r * max_scale_up_rate), r + 1)`` and at least
   ``floor(ready / max_scale_down_rate)``.
3. **Panic.** When ``panic >= panic_threshold * r`` the autoscaler panics. While
   panicking it never scales down: it answers the largest panic count seen since
   panic began (or ``ready``, or ``stable``, whichever is largest). Panic ends once a
   whole stable window has passed without the panic condition.
4. **Scale to and from zero.** While the stable window holds any load, or ``ready > 0``
   and the autoscaler has not yet watched a whole stable window, the answer is at
   least 1; zero load over a whole observed stable window allows 0. With
   ``ready == 0`` a positive latest sample gives at least ``ceil(sample / target)``
   (>= 1, within the scale-up rate) at once: requests are waiting on no capacity, so
   averaging them away would only delay the first start.
5. **Scale-down delay.** The answer is the largest of the answers of the last
   ``scale_down_delay_s`` seconds, so it falls only after being lower that long.
6. **Bounds.** Finally clamped to ``[min_instances, max_instances]``.

Time never runs backwards here: a ``now`` earlier than one already seen is taken as
the latest seen.

Cost: ``observe`` and ``desired`` are O(1) amortised (about 3 us for the pair).
History is a list of breakpoints with a running integral, trimmed to the stable
window; samples closer together than 1/100 of the panic window are merged (exactly,
for every window edge outside that sliver), and equal consecutive samples add
nothing, so an idle function costs no memory however often it is sampled.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from smss.errors import InvalidSpec

_EPS = 1e-9
_COMPACT_AT = 1024


@dataclass(frozen=True)
class AutoscalerConfig:
    """Scaling settings of one function. ``target_concurrency`` is the in-flight
    requests one instance should hold on average (e.g. 0.7 x its concurrency limit)."""

    target_concurrency: float
    min_instances: int = 0
    max_instances: int = 4
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_s: float = 0.0

    def __post_init__(self) -> None:
        def finite(x: float) -> bool:
            return isinstance(x, int | float) and math.isfinite(x)

        if not finite(self.target_concurrency) or self.target_concurrency <= 0:
            raise InvalidSpec(f"target_concurrency must be > 0, got {self.target_concurrency}")
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise InvalidSpec(
                "need 0 <= min_instances <= max_instances and max_instances >= 1, got "
                f"{self.min_instances}..{self.max_instances}"
            )
        if not (finite(self.panic_window_s) and finite(self.stable_window_s)) or not (
            0 < self.panic_window_s <= self.stable_window_s
        ):
            raise InvalidSpec("need 0 < panic_window_s <= stable_window_s")
        if not finite(self.panic_threshold) or self.panic_threshold < 1:
            raise InvalidSpec(f"panic_threshold must be >= 1, got {self.panic_threshold}")
        for name in ("max_scale_up_rate", "max_scale_down_rate"):
            rate = getattr(self, name)
            if not finite(rate) or rate < 1:
                raise InvalidSpec(f"{name} must be >= 1, got {rate}")
        if not finite(self.scale_down_delay_s) or self.scale_down_delay_s < 0:
            raise InvalidSpec(f"scale_down_delay_s must be >= 0, got {self.scale_down_delay_s}")


class Autoscaler:
    """Desired instance count of one function from its observed concurrency.
    See the module docstring for the rules."""

    __slots__ = (
        "_c",
        "_cfg",
        "_delay",
        "_first_t",
        "_last_nonzero",
        "_max_panic",
        "_merge_s",
        "_now",
        "_panic_head",
        "_panic_since",
        "_stable_head",
        "_t",
        "_v",
    )

    def __init__(self, config: AutoscalerConfig) -> None:
        self._cfg = config
        # Breakpoints of the step function: from _t[i] on the value is _v[i], and
        # _c[i] is its integral from the first sample up to _t[i].
        self._t: list[float] = []
        self._v: list[float] = []
        self._c: list[float] = []
        self._stable_head = 0  # index of the breakpoint holding at now - stable window
        self._panic_head = 0
        self._first_t = 0.0
        self._last_nonzero = -math.inf  # when the signal last stepped down to zero
        self._merge_s = config.panic_window_s / 100.0
        self._now = -math.inf  # latest time seen by observe or desired
        self._panic_since: float | None = None  # last time the panic condition held
        self._max_panic = 0
        self._delay: deque[tuple[float, int]] = deque()  # (time, answer), answers decreasing

    @property
    def config(self) -> AutoscalerConfig:
        return self._cfg

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def observe(self, now: float, concurrency: float) -> None:
        """Record the function's concurrency (in flight + queued) at ``now``. A time
        earlier than one seen before is taken as the latest time seen."""
        if not concurrency >= 0:  # also refuses NaN
            raise ValueError(f"concurrency must be >= 0, got {concurrency}")
        if now < self._now:
            now = self._now
        else:
            self._now = now
        t, v, c = self._t, self._v, self._c
        if not t:
            t.append(now)
            v.append(concurrency)
            c.append(0.0)
            self._first_t = now
            return
        last_t = t[-1]
        last_v = v[-1]
        if concurrency == last_v:
            return
        if last_v > 0 and concurrency == 0:
            self._last_nonzero = now
        if now - last_t < self._merge_s and len(t) - 1 > self._panic_head:
            # Re-value the last breakpoint and correct its integral so that every
            # integral from ``now`` on stays exact.
            c[-1] += (last_v - concurrency) * (now - last_t)
            v[-1] = concurrency
            return
        c.append(c[-1] + last_v * (now - last_t))
        t.append(now)
        v.append(concurrency)
        if len(t) - self._stable_head > 2 * _COMPACT_AT:  # bound memory without desired()
            self._advance(now)

    def desired(self, now: float, ready: int) -> int:
        """Instances the function should have, given ``ready`` serving now."""
        cfg = self._cfg
        if not self._t:
            return min(max(ready, cfg.min_instances), cfg.max_instances)
        if now < self._now:
            now = self._now
        else:
            self._now = now
        self._advance(now)
        target = cfg.target_concurrency
        stable = _ceil(self._average(now, cfg.stable_window_s, self._stable_head) / target)
        panic = _ceil(self._average(now, cfg.panic_window_s, self._panic_head) / target)

        r = max(ready, 1)
        up = max(math.ceil(r * cfg.max_scale_up_rate), r + 1)
        down = math.floor(ready / cfg.max_scale_down_rate)
        stable = min(max(stable, down), up)
        panic = min(max(panic, down), up)

        if panic >= cfg.panic_threshold * r:
            if self._panic_since is None:
                self._max_panic = 0
            self._panic_since = now
        elif self._panic_since is not None and now - self._panic_since >= cfg.stable_window_s:
            self._panic_since = None
        want = stable
        if self._panic_since is not None:
            self._max_panic = max(self._max_panic, panic)
            want = max(self._max_panic, ready, stable)

        latest = self._v[-1]
        window_start = now - cfg.stable_window_s
        if want < 1:
            load_in_window = latest > 0 or self._last_nonzero > window_start
            watched_window = self._first_t <= window_start
            if load_in_window or (ready > 0 and not watched_window):
                want = 1
        if ready == 0 and latest > 0:
            want = max(want, min(_ceil(latest / target), up), 1)

        if cfg.scale_down_delay_s > 0:
            want = self._delayed(now, want)
        return min(max(want, cfg.min_instances), cfg.max_instances)

    # ------------------------------------------------------------ internals

    def _advance(self, now: float) -> None:
        """Move both window heads to the breakpoints in force at their window's start
        and drop history older than the stable window."""
        t = self._t
        last = len(t) - 1
        h = self._stable_head
        lo = now - self._cfg.stable_window_s
        while h < last and t[h + 1] <= lo:
            h += 1
        p = max(self._panic_head, h)
        lo = now - self._cfg.panic_window_s
        while p < last and t[p + 1] <= lo:
            p += 1
        if h >= _COMPACT_AT and h * 2 >= len(t):
            del t[:h], self._v[:h], self._c[:h]
            p -= h
            h = 0
        self._stable_head = h
        self._panic_head = p

    def _average(self, now: float, window: float, head: int) -> float:
        t, v, c = self._t, self._v, self._c
        lo = now - window
        start = t[head]
        if start < lo:
            base = c[head] + v[head] * (lo - start)
            start = lo
        else:  # history is shorter than the window
            base = c[head]
        span = now - start
        if span <= 0:
            return v[-1]
        total = c[-1] + v[-1] * (now - t[-1]) - base
        return max(total, 0.0) / span

    def _delayed(self, now: float, want: int) -> int:
        """Largest answer of the last ``scale_down_delay_s`` seconds (monotonic deque)."""
        d = self._delay
        while d and d[-1][1] <= want:
            d.pop()
        d.append((now, want))
        cutoff = now - self._cfg.scale_down_delay_s
        while d[0][0] < cutoff:
            d.popleft()
        return d[0][1]


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS) if x > _EPS else 0
