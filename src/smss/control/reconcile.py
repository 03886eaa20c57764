"""One reconcile step for one function: the decision the controller and the simulator share.

:func:`reconcile` is a function of the function's observed state
(:class:`Observed`), its policies (:class:`Policies`: its scaling settings, its
declared needs, the autoscaler and the keep-alive policy), the cluster's capacity
(a :class:`~smss.control.placement.ClusterState`) and ``now``. It returns
:class:`Commands`: start instances *here* (each with its placement), stop these
instances, evict these allocations of other functions to make room, and whether a
start is a pre-warm. It performs nothing: the live controller applies the commands
through the ports (:class:`~smss.ports.ClusterBackend`), the simulator to its virtual
cluster. Nothing else decides starts and stops, so a simulated cluster runs the real
policy.

Steps:

1. The keep-alive windows (:func:`keep_alive_windows`): the function's own
   ``keep_alive_s`` when it sets one, for every instance; otherwise the policy's
   window for the last instance and its surplus window for the others.
2. :func:`~smss.control.scaling.plan`: how many to start and which idle instances to
   stop (its docstring has the rules: autoscaler's desired count while there is
   demand, at once for queued requests beyond free and starting capacity, never
   beyond ``max_instances``, nothing while a failed start's back-off runs). Under a
   keep-alive policy that ``caps_to_demand`` (the tiered one: a start from standby is
   a fork, so capacity nobody asks for is not worth holding on the autoscaler's
   average), the desired count is capped at what the demand now needs, and idle
   capacity is the policy's surplus window's (:func:`desired`).
3. Pre-warm (:func:`prewarm_due`): when the plan starts nothing and the function has
   no instance ready or starting, the keep-alive policy may name a time an
   invocation is expected (``prewarm_at``); one instance is started once now is
   within the start estimate of it, once per named time, unless the function sets
   its own ``keep_alive_s`` (a fixed TTL does not pre-warm) or is backing off.
4. Placement: each start is placed on the cluster (its stops already freed); a start
   that fits nowhere now is not made (``waiting_for_capacity``; the queued requests
   stay queued and the next reconcile tries again), so the autoscaler's count is
   capped by what fits; one that can never fit is reported in ``no_fit``.
5. Tiers (:func:`tier_due`): a function with no instance ready or starting and no
   demand holds what the keep-alive policy's :meth:`tier_target` allows: it steps down
   to ``keep`` (its template and spare, then its weights, then its claim on the
   runtime's zygote are released) or up to ``ensure`` (built ahead of demand), in
   ``step_to``. A function with an instance holds everything below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from smss.control.autoscaler import Autoscaler
from smss.control.keepalive import KeepAlivePolicy
from smss.control.placement import NOTHING, ClusterState, Evictable, Locality, NoFit, Placement
from smss.control.scaling import FunctionView, InstanceView, plan
from smss.control.tiers import Tier, TierTarget, step_to
from smss.inventory import Allocation, Capacity
from smss.spec import Scaling

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Observed:
    """What a reconcile sees of one function now."""

    name: str
    demand: int  # in flight + queued
    queued: int
    ready: Sequence[InstanceView]
    starting: int
    backoff_until: float = 0.0
    #: The pre-warm time (``prewarm_at``) last acted on; -inf: none yet.
    prewarmed_for: float = -math.inf
    #: What it holds of its own besides instances (its tier when it has none).
    holds: Tier = Tier.STANDBY


@dataclass(frozen=True, slots=True)
class Policies:
    """What decides for one function: its settings and its policy objects."""

    scaling: Scaling
    need: Capacity
    autoscaler: Autoscaler
    keep_alive: KeepAlivePolicy
    #: Expected seconds from asking for an instance to its being ready (pre-warm lead).
    start_estimate_s: float = 0.5
    #: The model's one copy of its weights on a GPU (placement charges it on a GPU
    #: that does not hold it yet): see :meth:`ClusterState.place`.
    weights: Capacity = NOTHING


@dataclass(frozen=True, slots=True)
class Commands:
    start: tuple[Placement, ...] = ()
    stop: tuple[str, ...] = ()
    #: Allocations of other functions to stop before the starts (room made by placement).
    evict: tuple[str, ...] = ()
    #: The ``prewarm_at`` time the start is for, when the start is a pre-warm.
    prewarm_for: float | None = None
    #: Starts wanted that fit nowhere now (they wait for capacity).
    waiting_for_capacity: int = 0
    #: Why they do not fit (``never``: they never will).
    no_fit: NoFit | None = None
    #: The tier to step to now (the function has no instance), or None.
    step_to: Tier | None = None
    #: Spares its template keeps ready (the policy's :class:`TierTarget`).
    spares: int = 1


def keep_alive_windows(
    scaling: Scaling, policy: KeepAlivePolicy, name: str, now: float
) -> tuple[float, float]:
    """(idle time that stops the last instance, idle time that stops any other)."""
    if scaling.keep_alive_s is not None:
        return scaling.keep_alive_s, scaling.keep_alive_s
    return policy.keep_alive_s(name, now), policy.surplus_keep_alive_s(name, now)


def prewarm_due(observed: Observed, policies: Policies, now: float) -> float | None:
    """The ``prewarm_at`` time to pre-warm for now, or None (rules in the module docstring)."""
    if observed.ready or observed.starting or policies.scaling.keep_alive_s is not None:
        return None
    if now < observed.backoff_until:
        return None
    at = policies.keep_alive.prewarm_at(observed.name, now)
    if at is None or at == observed.prewarmed_for or now < at - policies.start_estimate_s - _EPS:
        return None
    return at


def prewarm_wake(observed: Observed, policies: Policies, now: float) -> float | None:
    """When :func:`prewarm_due` will next say yes, if later than now (for schedulers)."""
    if observed.ready or observed.starting or policies.scaling.keep_alive_s is not None:
        return None
    at = policies.keep_alive.prewarm_at(observed.name, now)
    if at is None or at == observed.prewarmed_for:
        return None
    lead = at - policies.start_estimate_s
    return max(lead, observed.backoff_until) if lead > now else None


def idle(observed: Observed) -> bool:
    """No instance ready or starting and no demand: its tier is the policy's to decide."""
    return not observed.ready and not observed.starting and observed.demand == 0


def tier_due(
    observed: Observed, policies: Policies, now: float, target: TierTarget | None = None
) -> Tier | None:
    """The tier to step to now, or None (rule 5 of the module docstring)."""
    if not idle(observed):
        return None
    return step_to(observed.holds, target or policies.keep_alive.tier_target(observed.name, now))


def tier_wake(observed: Observed, policies: Policies, now: float) -> float | None:
    """When :func:`tier_due` may next say something new, if it is idle (for schedulers)."""
    if not idle(observed):
        return None
    until = policies.keep_alive.tier_target(observed.name, now).until
    return until if math.isfinite(until) else None


def desired(observed: Observed, policies: Policies, now: float) -> int:
    """The autoscaler's desired count; capped at what the demand now needs when the
    keep-alive policy holds extra capacity itself (``caps_to_demand``)."""
    want = policies.autoscaler.desired(now, len(observed.ready))
    if policies.keep_alive.caps_to_demand:
        want = min(want, -(-observed.demand // max(policies.scaling.concurrency, 1)))
    return want


def reconcile(
    observed: Observed,
    policies: Policies,
    cluster: ClusterState,
    now: float,
    *,
    locality: Locality | None = None,
    evictable: Evictable | None = None,
) -> Commands:
    """Decide for one function now (see the module docstring). The autoscaler is
    told the demand first, as at every reconcile."""
    scaling = policies.scaling
    policies.autoscaler.observe(now, float(observed.demand))
    keep_alive, surplus = keep_alive_windows(scaling, policies.keep_alive, observed.name, now)
    scale = plan(
        FunctionView(
            now=now,
            demand=observed.demand,
            ready=observed.ready,
            starting=observed.starting,
            min_instances=scaling.min_instances,
            max_instances=scaling.max_instances,
            desired=desired(observed, policies, now),
            keep_alive_s=keep_alive,
            backoff_until=observed.backoff_until,
            queued=observed.queued,
            concurrency=scaling.concurrency,
            surplus_keep_alive_s=surplus,
        )
    )
    wanted = scale.start
    prewarm_for = None
    if wanted == 0:
        prewarm_for = prewarm_due(observed, policies, now)
        if prewarm_for is not None:
            wanted = 1
    target = policies.keep_alive.tier_target(observed.name, now)
    if wanted == 0:
        return Commands(
            stop=scale.stop, step_to=tier_due(observed, policies, now, target), spares=target.spares
        )
    starts: list[Placement] = []
    pending: list[Allocation] = []
    gone = set(scale.stop)
    evict: list[str] = []
    no_fit: NoFit | None = None
    # A pre-warm is a guess: it takes free capacity only, never another function's instance.
    make_room = evictable if prewarm_for is None else None
    for k in range(wanted):
        where = cluster.place(
            observed.name,
            policies.need,
            locality,
            pending=pending,
            exclude=gone,
            evictable=make_room,
            weights=policies.weights,
        )
        if isinstance(where, NoFit):
            no_fit = where
            break
        starts.append(where)
        pending.append(where.allocation(f"{observed.name}#pending{k}", observed.name, policies.need))
        evict.extend(where.evict)
        gone.update(where.evict)
    return Commands(
        start=tuple(starts),
        stop=scale.stop,
        evict=tuple(evict),
        prewarm_for=prewarm_for if starts else None,
        waiting_for_capacity=wanted - len(starts),
        no_fit=no_fit,
        spares=target.spares,
    )
