"""Tiers of readiness: what a function keeps resident, what that costs, what a start costs.

A function is always in one tier (DESIGN.md, "Tiers of readiness"); each holds
everything the tiers below it hold:

==============  ===============================================  ==========================
tier            what is resident                                 a start costs
==============  ===============================================  ==========================
``warm``        instances                                        nothing: a request is routed
``standby``     the model's template and its spare               handing the spare a request
``resident``    the weights in the node's store                  building a template
``cold``        the runtime's zygote (weights on disk)           reading the weights, building
``no_runtime``  nothing                                          starting a zygote first
==============  ===============================================  ==========================

The zygote is the *runtime's*, shared by every function of that runtime: it runs
while any of them wants it (:func:`runtime_wanted`), and a function whose own
holdings are gone but whose runtime's zygote runs is ``cold``, not ``no_runtime``.
Templates die with their zygote, and instances with their template (``PR_SET_PDEATHSIG``),
so the order is one of containment: a function with an instance has its template, a
template has its zygote.

:class:`TierProfile` says what each tier costs for one model: its start latency and
the memory it holds, and the spare's refill (a template forks its next spare only once
it has been idle a while, and a start that finds no spare forks from the template,
which answers its first request slower). The defaults are the ``cnn`` demo model
measured with ``smss bench cold-start`` on the development machine (a 2-core VM,
noisy: see each field); the simulator takes them, and they can be overridden
(:func:`parse_profile`).

Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from smss.errors import InvalidSpec
from smss.inventory import Tier

__all__ = [
    "KEEP_ALL",
    "START_TIERS",
    "Tier",
    "TierProfile",
    "TierTarget",
    "parse_profile",
    "parse_tier",
    "runtime_wanted",
    "step_to",
]


def parse_tier(text: str) -> Tier:
    try:
        return Tier[text.strip().upper()]
    except KeyError:
        names = ", ".join(t.label for t in Tier)
        raise InvalidSpec(f"unknown tier {text!r}; tiers are {names}") from None


#: The tiers a start can begin from (a warm function routes, it does not start).
START_TIERS = (Tier.STANDBY, Tier.RESIDENT, Tier.COLD, Tier.NO_RUNTIME)


@dataclass(frozen=True)
class TierProfile:
    """What each tier costs for one model. Latencies are added latency (a start's
    answer minus a warm answer), in milliseconds; memory in MiB.

    Defaults: ``cnn`` (11M parameters, 43 MiB of weights) measured on the development
    machine, medians of 7 tries, on 2 shared cores (noisy: a second run differed by up
    to 2x in the template build). Memory is what *one more* function at that tier adds
    to a node: the private pages of its template and spare, and its segment; the pages
    a template shares with its zygote (torch's heap after import) are the runtime's
    (``runtime_mb``), counted once however many functions use it.
    """

    #: A start that finds the template's spare ready: it is handed the request.
    standby_ms: float = 3.0
    #: A start from a template whose spare is not ready yet: a fork whose first request
    #: pays the copy-on-write faults the spare would have paid (``--no-spares``).
    fork_ms: float = 11.0
    #: Weights in the store: a template is forked from the zygote, attaches them, builds
    #: and warms the model, then the instance is forked.
    resident_ms: float = 250.0
    #: Weights on disk: read into the store first (43 MiB: 45-190 ms here).
    cold_ms: float = 320.0
    #: No zygote: an interpreter starts and imports torch first (1.3-2.1 s here).
    no_runtime_ms: float = 1800.0
    #: The template's and its spare's own pages (5 + 8 MiB private), without the weights.
    standby_mb: float = 13.0
    #: What each spare beyond the first adds (its own pages).
    spare_mb: float = 8.0
    #: The weights' segment in the node's store.
    weights_mb: float = 43.0
    #: The runtime's zygote, and the pages its templates share with it (230 MiB RSS).
    runtime_mb: float = 230.0
    #: A template forks its next spare once no start came for this long
    #: (:data:`smss.node.zygote.IDLE_S`), and the spare is ready ``rehearse_ms`` later.
    spare_idle_ms: float = 200.0
    rehearse_ms: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InvalidSpec(f"tier profile: {f.name} must be a finite number >= 0, got {value!r}")

    def start_ms(self, tier: Tier, spare_ready: bool = True) -> float:
        """The added latency of a start from ``tier`` (``warm``: none)."""
        if tier is Tier.WARM:
            return 0.0
        if tier is Tier.STANDBY:
            return self.standby_ms if spare_ready else self.fork_ms
        return {Tier.RESIDENT: self.resident_ms, Tier.COLD: self.cold_ms}.get(tier, self.no_runtime_ms)

    def footprint_mb(self, tier: Tier) -> float:
        """What a function holds of its own at ``tier``, besides instances (the zygote
        is its runtime's: :attr:`runtime_mb`)."""
        if tier >= Tier.STANDBY:
            return self.standby_mb + self.weights_mb
        return self.weights_mb if tier is Tier.RESIDENT else 0.0

    @property
    def build_ms(self) -> float:
        """How long a template takes from the weights in the store (before the fork)."""
        return max(self.resident_ms - self.fork_ms, 0.0)

    @property
    def refill_ms(self) -> float:
        return self.spare_idle_ms + self.rehearse_ms

    def scaled(self, factor: float) -> TierProfile:
        """Every duration times ``factor`` (memory unchanged)."""
        return replace(
            self,
            **{f.name: getattr(self, f.name) * factor for f in fields(self) if f.name.endswith("_ms")},
        )


@dataclass(frozen=True, slots=True)
class TierTarget:
    """What a keep-alive policy wants a function with no instance to hold now:
    at most ``keep`` (what is above is released) and at least ``ensure`` (what is
    below is built ahead of demand), until ``until`` (when the answer next changes
    on its own; ``inf``: not before another arrival); and, while it holds a template,
    how many ``spares`` the template keeps."""

    keep: Tier = Tier.STANDBY
    ensure: Tier = Tier.NO_RUNTIME
    until: float = math.inf
    #: Spares its template keeps ready (one per concurrent start made fast).
    spares: int = 1


#: Today's platform: templates, spares and weights stay until the store's budget
#: evicts them, and nothing is built ahead of demand.
KEEP_ALL = TierTarget()


def step_to(holds: Tier, target: TierTarget) -> Tier | None:
    """The tier to step to from ``holds`` (a function with no instance), or None."""
    if holds > target.keep:
        return target.keep
    if holds < target.ensure:
        return target.ensure
    return None


def runtime_wanted(targets: list[Tier]) -> bool:
    """Whether a runtime's zygote should run, given what each of its functions is
    allowed to keep (``warm`` for one with instances): while any keeps ``cold`` or more."""
    return any(t >= Tier.COLD for t in targets)


def parse_profile(text: str, base: TierProfile | None = None) -> TierProfile:
    """``base`` (default :class:`TierProfile`) with ``key=value,...`` overrides, keys the
    fields of :class:`TierProfile` (``standby_ms=2.5,weights_mb=120``). Bad text:
    :class:`InvalidSpec`."""
    base = base or TierProfile()
    names = [f.name for f in fields(TierProfile)]
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or key not in names:
            raise InvalidSpec(f"tier profile: bad option {item!r}; options are {', '.join(names)}")
        try:
            values[key] = float(raw)
        except ValueError:
            raise InvalidSpec(f"tier profile: {key}={raw!r} is not a number") from None
    return replace(base, **values)
