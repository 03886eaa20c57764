"""What each simulated function keeps resident, and what a start from it takes.

The simulator's model of the node side of :mod:`smss.control.tiers`, on its virtual
clock, as the live node behaves (:mod:`smss.node.zygotes`, :mod:`smss.node.spare`):

* a function *holds* one of ``standby`` (its template and spare, with its weights),
  ``resident`` (its weights), ``cold`` (a claim on its runtime's zygote) or
  ``no_runtime`` (nothing); the runtime's zygote runs while any of its functions
  claims it, or one of them is starting it;
* a start from below standby builds the template first: after the zygote is ready
  (started first when it is not running: ``no_runtime``), the weights are read
  (``cold``) and the template built; a start asked for while the template builds
  waits for it, then forks;
* a template keeps up to ``spares`` spares (the policy's choice); a start from it hands
  a ready spare the request (``standby_ms``), otherwise it forks (``fork_ms``). The
  template forks the spares it lacks once no start came for ``spare_idle_ms``, and each
  is ready ``rehearse_ms`` later; a fresh template has none until then;
* the meter is told what is held: ``standby:NAME`` (template and a spare, from the
  moment the build starts), ``spares:NAME`` (the spares beyond the first),
  ``weights:NAME`` and ``runtime:NAME``, and the CPU of each spare's rehearsal.
"""

from __future__ import annotations

import math

from smss.control.metering import Meter
from smss.control.tiers import Tier, TierProfile


class Runtime:
    """One runtime's zygote: running from ``ready_at`` on (starting before that)."""

    __slots__ = ("claims", "key", "meter", "ready_at", "running", "start_s")

    def __init__(self, name: str, start_s: float, meter: Meter) -> None:
        self.key = f"runtime:{name}"
        self.start_s = start_s
        self.meter = meter
        self.running = False
        self.ready_at = math.inf
        self.claims = 0  # functions holding cold or more

    def ensure(self, now: float, mb: float) -> float:
        """Start the zygote unless it runs or starts; when it is (will be) ready."""
        if not self.running:
            self.running = True
            self.ready_at = now + self.start_s
            self.meter.hold(self.key, self.key, mb, now)
        return self.ready_at

    def release(self, now: float) -> None:
        """A function gave up its claim; the zygote stops when no one claims it."""
        self.claims -= 1
        if self.claims <= 0 and self.running:
            self.claims = 0
            self.running = False
            self.ready_at = math.inf
            self.meter.hold(self.key, self.key, 0.0, now)


class Readiness:
    """One function's holdings (module docstring)."""

    __slots__ = (
        "builds",
        "holds",
        "meter",
        "name",
        "pool",
        "profile",
        "runtime",
        "spares",
        "template_at",
    )

    def __init__(self, name: str, profile: TierProfile, runtime: Runtime, meter: Meter) -> None:
        self.name = name
        self.profile = profile
        self.runtime = runtime
        self.meter = meter
        self.holds = Tier.NO_RUNTIME
        self.template_at = math.inf
        #: The template's spares: [forked at, ready at] each (forked once it is idle).
        self.pool: list[list[float]] = []
        self.spares = 1
        self.builds = 0

    def tier(self, now: float) -> Tier:
        """The tier a start asked for now begins from."""
        if self.holds >= Tier.STANDBY:
            return Tier.STANDBY
        if not self.runtime.running or self.runtime.ready_at > now:
            return Tier.NO_RUNTIME
        return max(self.holds, Tier.COLD)

    def start(self, now: float) -> tuple[float, Tier, bool]:
        """An instance asked for at ``now``: (when it is ready, the tier it started
        from, whether it was handed the spare)."""
        tier = self.tier(now)
        if self.holds < Tier.STANDBY:
            self._build(now)
        p = self.profile
        at = max(now, self.template_at)
        ready = next((s for s in self.pool if s[1] <= at), None)
        if ready is not None:
            self.pool.remove(ready)
        self._busy(at)  # spares not forked yet wait until the template is idle again
        if ready is not None:  # a spare takes it; its successor is forked when idle
            self._add_spares(1, at)
            return at + p.standby_ms / 1000, tier, True
        return at + p.fork_ms / 1000, tier, False

    def set_spares(self, spares: int, now: float) -> None:
        """Keep ``spares`` spares from now on (while it holds a template)."""
        spares = max(spares, 1)
        if spares == self.spares:
            return
        self.spares = spares
        if self.holds < Tier.STANDBY:
            return
        self._hold_spares(now)
        if len(self.pool) < spares:
            self._add_spares(spares - len(self.pool), max(now, self.template_at))
        del self.pool[spares:]

    def step(self, to: Tier, now: float) -> None:
        """Step to ``to`` (the function has no instance): release what is above it,
        or build up to it."""
        if to < self.holds:
            self._release(to, now)
        elif to > self.holds:
            if to >= Tier.STANDBY:
                self._build(now)
            else:
                self._claim(to, now)

    # ------------------------------------------------------------ internals

    def _claim(self, to: Tier, now: float) -> float:
        """Hold ``to`` (cold or resident): claim the runtime (start its zygote) and
        read the weights for resident. Returns when the zygote is ready."""
        p = self.profile
        if self.holds < Tier.COLD:
            self.runtime.claims += 1
        ready = self.runtime.ensure(now, p.runtime_mb)
        if to >= Tier.RESIDENT and self.holds < Tier.RESIDENT:
            self.meter.hold(f"weights:{self.name}", self.name, p.weights_mb, now)
        self.holds = max(self.holds, to)
        return ready

    def _build(self, now: float) -> None:
        p = self.profile
        had_weights = self.holds >= Tier.RESIDENT
        zygote_ready = self._claim(Tier.RESIDENT, now)
        build_ms = p.build_ms if had_weights else max(p.cold_ms - p.fork_ms, 0.0)
        self.template_at = max(now, zygote_ready) + build_ms / 1000
        self.meter.hold(f"standby:{self.name}", self.name, p.standby_mb, now)
        self.holds = Tier.STANDBY
        self.builds += 1
        self.pool = []
        self._add_spares(self.spares, self.template_at)
        self._hold_spares(now)

    def _busy(self, at: float) -> None:
        idle = self.profile.spare_idle_ms / 1000
        rehearse = self.profile.rehearse_ms / 1000
        for s in self.pool:
            if s[0] > at:
                s[0], s[1] = at + idle, at + idle + rehearse

    def _add_spares(self, n: int, busy_at: float) -> None:
        """``n`` more spares, forked once the template, busy at ``busy_at``, is idle."""
        p = self.profile
        fork_at = busy_at + p.spare_idle_ms / 1000
        for _ in range(n):
            self.pool.append([fork_at, fork_at + p.rehearse_ms / 1000])
            self.meter.standby_cpu(self.name, p.rehearse_ms / 1000)

    def _hold_spares(self, now: float) -> None:
        extra = (self.spares - 1) * self.profile.spare_mb if self.holds >= Tier.STANDBY else 0.0
        self.meter.hold(f"spares:{self.name}", self.name, extra, now)

    def _release(self, to: Tier, now: float) -> None:
        if self.holds >= Tier.STANDBY > to:
            self.meter.hold(f"standby:{self.name}", self.name, 0.0, now)
            self.meter.hold(f"spares:{self.name}", self.name, 0.0, now)
            self.template_at = math.inf
            self.pool = []
        if self.holds >= Tier.RESIDENT > to:
            self.meter.hold(f"weights:{self.name}", self.name, 0.0, now)
        if self.holds >= Tier.COLD > to:
            self.runtime.release(now)
        self.holds = to
