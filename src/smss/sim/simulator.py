"""Discrete-event simulator: a trace replayed through the real control objects.

Per function it drives the same objects as the live controller and dispatcher:
:class:`~smss.control.autoscaler.Autoscaler`, the keep-alive policy of
:func:`~smss.control.keepalive.parse_policy`, the controller's own reconcile step
(:func:`~smss.control.reconcile.reconcile`, with :func:`~smss.control.scaling.plan`
and :class:`~smss.control.placement.ClusterState` placement inside),
:func:`~smss.control.router.choose` and the :class:`~smss.control.metering.Meter`,
on a virtual clock (an event heap; nothing sleeps). Instances are simulated: one
becomes ready as long after it is asked for as a start from the function's tier of
readiness takes (:mod:`smss.sim.readiness`: a hand-over to a ready spare, a fork, a
template built from resident weights, from disk, after the runtime's zygote started;
the latencies and footprints of :class:`~smss.control.tiers.TierProfile`, or every
start ``cold_start_ms`` and one that builds a template ``first_start_ms``, as before
tiers) and serves up to ``concurrency`` requests at once, each for the trace's
``duration_ms``. What each function keeps resident besides instances is stepped as
the reconcile decides (``step_to``, ``spares``) and metered (standby memory, the
runtime's zygote); every function is deployed, and reconciled once, at time 0.

What happens, as in the live platform:

* an arrival is reported to the keep-alive policy and takes a free slot chosen by the
  router; if there is none it waits in the function's FIFO queue and the function is
  reconciled at once (the dispatcher's wake-up), which is how scale-from-zero starts;
* a reconcile is the controller's, the same function: observe demand (in flight +
  queued), the autoscaler's desired count, the keep-alive windows (the function's own
  ``keep_alive_s`` when set, else the policy's for the last instance and the others),
  :func:`plan` (start instances, at once for requests queued beyond the free and
  starting capacity; stop idle ones), the pre-warm rule, and placement of each start
  on the virtual cluster; its commands are applied here as the controller applies
  them through its backend;
* the cluster: with ``nodes`` set, ``nodes`` nodes of ``cpus_per_node`` cores and
  ``memory_per_node_mb`` each; an instance takes its declared ``cpu`` and
  ``memory_mb`` from the node it is placed on, a start that fits nowhere waits (its
  requests stay queued: ``queued_for_capacity`` counts the invocations that waited
  so), idle instances of other functions are stopped to make room, and a function
  that could never fit has its invocations ``rejected`` (the live platform answers
  them 503). With ``request_timeout_s`` a request still queued that long is dropped
  (``timed_out``; the live platform answers 503 at the deadline). Without ``nodes``
  there is one node that nothing fills, as in earlier runs;
* a new instance takes queued requests first: each such request is a *cold start*
  (it found no free instance and waited for one to start); a request that waited for
  a busy instance to finish only queued;
* pre-warm: when the policy's ``prewarm_at`` names a time and the function has no
  instance ready or starting, one is started a standby start earlier so that it is
  ready then, once per named time (the reconcile's rule);
* tiers: an idle function is reconciled when its tier target next changes (the
  policy's ``until``), and steps down or up then.

Besides the instance figures it reports ``standby_memory_gb_seconds`` (templates,
spares, weights and the runtime's zygote, integrated), the starts by the tier they
began from, whether the latency objective was met at its percentile, and
``oracle_cost_usd``, the hindsight-optimal cost of the same trace
(:mod:`smss.sim.oracle`), with ``cost_vs_oracle``; ``cost_usd`` and ``cost_ratio``
count every tier.

Differences from the live controller, for speed and on purpose:

* the live controller reconciles every function every ``tick_s``; here a function is
  reconciled every ``tick_s`` only while it has demand or its autoscaler panics, and
  otherwise exactly when something can change: an arrival that finds no free slot,
  the keep-alive expiry of its longest-idle instance, a pre-warm time. An idle
  function's tick changes nothing in :func:`plan` (with no demand it only stops
  instances past their keep-alive), so this is the same decision, made at the
  expiry instead of at the first tick after it (up to ``tick_s`` sooner);
* the autoscaler observes demand at every change (arrival, completion), not a sample
  per tick: the exact time-weighted signal that tick sampling approximates;
* ``tick_s`` defaults to 1 s (the live default is 0.2 s): it only paces the
  autoscaler's re-evaluation under load, and a finer tick costs run time on busy
  traces for little change in the figures;
* with more than two free instances the router is handed a uniformly random pair of
  them rather than all (it compares a random pair anyway), so an arrival is O(1);
* control actions take no time (a wake-up reconciles at once) and starts never fail.

``speedup`` K replays the trace K times faster, as ``smss bench replay --speedup K``
does against a live platform: arrival times and durations are divided by K, and so
is every duration of the keep-alive policy (:func:`~smss.control.keepalive.scale_policy`,
what the replay passes to the platform), while the platform's own constants (the
autoscaler's windows, ``tick_s``, the tiers' latencies) are not, as on the live platform.
Figures are in the compressed time.

The run ends when the last request completes; instances still alive then are metered
up to that time, which is also the period the always-on containers are priced for.
Those containers are sized for the concurrency the trace offers (each invocation
running from its arrival for its duration, :func:`~smss.sim.trace.peak_concurrency`),
so the baseline is the same for every policy.

Cost: about 25 us of CPU an invocation (two heap operations, a few autoscaler and
meter calls, a reconcile only when an arrival finds no free slot or a timer fires):
over two million invocations a minute on one core.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from smss.control.autoscaler import Autoscaler
from smss.control.cost import ContainerSize, report
from smss.control.keepalive import KeepAlivePolicy, parse_policy, scale_policy
from smss.control.metering import Meter
from smss.control.placement import need_of
from smss.control.reconcile import (
    Observed,
    Policies,
    keep_alive_windows,
    prewarm_wake,
    reconcile,
    tier_wake,
)
from smss.control.router import Candidate, Ewma, choose
from smss.control.scaling import InstanceView
from smss.control.tiers import START_TIERS, Tier
from smss.inventory import Allocation
from smss.sim.config import SimConfig
from smss.sim.oracle import oracle_cost
from smss.sim.readiness import Readiness, Runtime
from smss.sim.trace import Trace, peak_concurrency, read_trace

_DONE, _READY, _WAKE = 0, 1, 2
_EPS = 1e-9
#: Every function of a trace is one model of one runtime (the trace's are synthetic).
RUNTIME = "model"


class _Inst:
    __slots__ = ("ewma", "fn", "id", "idle_since", "in_flight")

    def __init__(self, fn: _Fn, instance_id: str, now: float) -> None:
        self.fn = fn
        self.id = instance_id
        self.in_flight = 0
        self.idle_since = now
        self.ewma = Ewma()


class _Fn:
    __slots__ = (
        "autoscaler",
        "free",
        "idle",
        "in_flight",
        "name",
        "next_wake",
        "policies",
        "prewarmed_for",
        "queue",
        "ready",
        "started",
        "starting",
        "tiers",
    )

    def __init__(self, name: str, policies: Policies, tiers: Readiness) -> None:
        self.name = name
        self.tiers = tiers
        self.policies = policies
        self.autoscaler = policies.autoscaler
        self.ready: dict[str, _Inst] = {}  # ready instances, in start order
        self.free: dict[str, _Inst] = {}  # ready with a free slot
        self.idle: dict[str, _Inst] = {}  # ready with nothing in flight, longest idle first
        self.queue: deque[int] = deque()  # waiting requests (trace rows)
        self.in_flight = 0
        self.starting = 0
        self.started = 0
        self.next_wake = math.inf
        self.prewarmed_for = -math.inf


class Simulation:
    """One replay of a trace; :meth:`run` returns the figures of :func:`simulate`."""

    def __init__(self, trace: Trace, config: SimConfig, meter: Meter | None = None) -> None:
        """``meter``: what records usage (a recording one for plots); a plain Meter by default."""
        self.trace = trace
        self.config = config
        policy, ttl = scale_policy(config.policy, config.default_ttl_s, 1.0 / config.speedup)
        self.profile = config.profile()
        self.policy: KeepAlivePolicy = parse_policy(
            policy, ttl, profile=self.profile, objective=config.objective(), prices=config.prices
        )
        self.meter = meter or Meter()
        self.rng = random.Random(config.seed)
        prof = self.profile
        self.runtime = Runtime(RUNTIME, max(prof.no_runtime_ms - prof.cold_ms, 0.0) / 1000, self.meter)
        scaling, need = config.scaling, need_of(config.resources)
        start_estimate = prof.standby_ms / 1000.0
        self._fns = [
            _Fn(
                name,
                Policies(scaling, need, Autoscaler(config.autoscaler_config()), self.policy, start_estimate),
                Readiness(name, prof, self.runtime, self.meter),
            )
            for name in trace.functions
        ]
        for fn in self._fns:  # every function is deployed, idle, when the trace starts
            fn.autoscaler.observe(0.0, 0.0)
            self.policy.describe(fn.name, config.resources, 0.0, concurrency=config.concurrency)
        self.starts_from = dict.fromkeys(START_TIERS, 0)
        self.starts_with_spare = 0
        self.cluster = config.cluster()
        self._unbounded = config.nodes is None
        self._insts: dict[str, _Inst] = {}  # ready instances by id (placement asks which are idle)
        self._waiting: dict[str, _Fn] = {}  # functions with starts waiting for capacity
        self._capacity_waited: set[int] = set()  # trace rows that waited for capacity
        self.rejected = 0
        self.timed_out = 0
        self._rejected_rows: list[int] = []
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = 0
        self._t = (trace.t_ms / (1000.0 * config.speedup)).tolist()
        self._d = (trace.duration_ms / (1000.0 * config.speedup)).tolist()
        self._added = [0.0] * len(trace)
        self._resources = config.resources
        self._limit = config.concurrency
        self.cold_starts = 0
        self.prewarm_starts = 0
        self.outstanding = 0
        self._ran = False

    # ------------------------------------------------------------ the loop

    def run(self) -> dict[str, object]:
        """Replay the whole trace (once) and return the figures."""
        if self._ran:
            raise RuntimeError("a Simulation runs once")
        self._ran = True
        heap, fns, ts = self._heap, self._fns, self._t
        fidx = self.trace.function.tolist()
        pop, step, arrive = heapq.heappop, self._step, self._arrive
        for fn in fns:  # the controller's first tick: min_instances, tiers built ahead
            self._reconcile(fn, 0.0)
            self._schedule(fn, 0.0)
        now = 0.0
        for k, t in enumerate(ts):
            while heap and heap[0][0] <= t:
                step(pop(heap))
            arrive(fns[fidx[k]], k, t)
            now = t
        while self.outstanding > 0:
            entry = pop(heap)
            now = entry[0]
            step(entry)
        return self._results(now)

    def _step(self, entry: tuple[float, int, int, object, int]) -> None:
        at, _, kind, obj, arg = entry
        if kind == _DONE:
            self._done(obj, arg, at)  # type: ignore[arg-type]
        elif kind == _READY:
            self._ready(obj, at)  # type: ignore[arg-type]
        else:
            self._wake(obj, at)  # type: ignore[arg-type]

    def _push(self, at: float, kind: int, obj: object, arg: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, obj, arg))

    def _wake(self, fn: _Fn, at: float) -> None:
        if at == fn.next_wake:  # else superseded by an earlier wake-up
            fn.next_wake = math.inf
            self._reconcile(fn, at)
            self._schedule(fn, at)

    # ------------------------------------------------------------ requests

    def _arrive(self, fn: _Fn, k: int, t: float) -> None:
        self.policy.on_invocation(fn.name, t, fn.in_flight + len(fn.queue))
        self.outstanding += 1
        inst = self._pick(fn)
        if inst is not None:
            self._serve(fn, inst, k, t)
            fn.autoscaler.observe(t, fn.in_flight + len(fn.queue))
        else:
            fn.queue.append(k)
            self._reconcile(fn, t)
        self._schedule(fn, t)

    def _pick(self, fn: _Fn) -> _Inst | None:
        """The router's choice among the free instances. choose() compares a uniformly
        random pair of them; to keep an arrival O(1) however many instances are free,
        the pair is drawn here and handed to it (the same distribution of choices)."""
        free = fn.free
        n = len(free)
        if n <= 1:  # what choose() answers for zero or one free instance
            return next(iter(free.values()), None)
        if n == 2:
            pair: Sequence[_Inst] = list(free.values())
        else:
            insts = list(free.values())
            rand = self.rng.random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            pair = (insts[i], insts[j + 1 if j >= i else j])
        limit = self._limit
        chosen = choose([Candidate(i.id, i.in_flight, limit, i.ewma.value) for i in pair], self.rng)
        return None if chosen is None else free[chosen]

    def _serve(self, fn: _Fn, inst: _Inst, k: int, now: float) -> None:
        inst.in_flight += 1
        if inst.in_flight == 1:
            del fn.idle[inst.id]
        if inst.in_flight >= self._limit:
            del fn.free[inst.id]
        fn.in_flight += 1
        self._added[k] = now - self._t[k]
        self.meter.request_started(fn.name, inst.id, now)
        self._seq += 1
        heapq.heappush(self._heap, (now + self._d[k], self._seq, _DONE, inst, k))

    def _done(self, inst: _Inst, k: int, now: float) -> None:
        fn = inst.fn
        self.outstanding -= 1
        fn.in_flight -= 1
        inst.in_flight -= 1
        inst.ewma.update(self._d[k])
        self.meter.request_finished(fn.name, inst.id, now)
        if inst.in_flight == self._limit - 1:
            fn.free[inst.id] = inst
        if inst.in_flight == 0:
            inst.idle_since = now
            fn.idle[inst.id] = inst
        queue = fn.queue
        if queue and self._expire(fn, now):  # the freed slot goes to the longest-waiting request
            nxt = self._pick(fn)
            if nxt is not None:
                self._serve(fn, nxt, queue.popleft(), now)
                fn.autoscaler.observe(now, fn.in_flight + len(queue))
                return
        fn.autoscaler.observe(now, fn.in_flight + len(queue))
        if fn.in_flight == 0 and not queue:
            self._schedule(fn, now)

    # ------------------------------------------------------------ instances

    def _start(self, fn: _Fn, now: float, alloc: Allocation) -> None:
        fn.starting += 1
        fn.started += 1
        instance_id = f"{fn.name}#{fn.started}"
        self.meter.instance_started(instance_id, fn.name, self._resources, now)
        if not self._unbounded:
            self.cluster.add(msgspec.structs.replace(alloc, id=instance_id))
        ready_at, tier, spare = fn.tiers.start(now)
        self.starts_from[tier] += 1
        self.starts_with_spare += spare
        self._seq += 1
        heapq.heappush(self._heap, (ready_at, self._seq, _READY, (fn, instance_id), 0))

    def _ready(self, started: tuple[_Fn, str], now: float) -> None:
        fn, instance_id = started
        fn.starting -= 1
        inst = _Inst(fn, instance_id, now)
        fn.ready[instance_id] = fn.free[instance_id] = fn.idle[instance_id] = inst
        self._insts[instance_id] = inst
        queue = fn.queue
        while queue and self._expire(fn, now):
            nxt = self._pick(fn)
            if nxt is None:
                break
            if nxt is inst:
                self.cold_starts += 1
            self._serve(fn, nxt, queue.popleft(), now)
        self._schedule(fn, now)

    def _stop(self, fn: _Fn, instance_id: str, now: float) -> None:
        inst = fn.ready.pop(instance_id)
        fn.free.pop(instance_id, None)
        fn.idle.pop(instance_id, None)
        del self._insts[instance_id]
        if inst.in_flight:  # plan() and placement stop idle instances only
            raise AssertionError(f"stopping busy instance {instance_id}")
        self.meter.instance_stopped(instance_id, now)
        if not self._unbounded:
            self.cluster.remove(instance_id)

    # ------------------------------------------------------------ control

    def _evictable(self, a: Allocation) -> float | None:
        inst = self._insts.get(a.id)
        if inst is None or inst.in_flight or len(inst.fn.ready) <= self.config.min_instances:
            return None
        return inst.idle_since

    def _expire(self, fn: _Fn, now: float) -> bool:
        """Drop queued requests past their deadline (FIFO: they are at the head);
        True while some request is still queued."""
        timeout = self.config.request_timeout_s
        queue = fn.queue
        if timeout is not None:
            t = self._t
            while queue and now - t[queue[0]] > timeout:
                self._rejected_rows.append(queue.popleft())
                self.timed_out += 1
                self.outstanding -= 1
        return bool(queue)

    def _reconcile(self, fn: _Fn, now: float) -> None:
        """The controller's reconcile (:func:`~smss.control.reconcile.reconcile`), its
        commands applied to the virtual cluster."""
        self._expire(fn, now)
        views = [
            InstanceView(i.id, i.in_flight, i.idle_since if i.in_flight == 0 else None)
            for i in fn.ready.values()
        ]
        observed = Observed(
            fn.name,
            fn.in_flight + len(fn.queue),
            len(fn.queue),
            views,
            fn.starting,
            0.0,
            fn.prewarmed_for,
            fn.tiers.holds,
        )
        commands = reconcile(
            observed, fn.policies, self.cluster, now, evictable=None if self._unbounded else self._evictable
        )
        freed = bool(commands.stop or commands.evict)
        for alloc_id in commands.evict:
            victim = self._insts[alloc_id]
            self._stop(victim.fn, alloc_id, now)
            self._schedule(victim.fn, now)
        for instance_id in commands.stop:
            self._stop(fn, instance_id, now)
        if commands.prewarm_for is not None:
            fn.prewarmed_for = commands.prewarm_for
            self.prewarm_starts += 1
        for k, where in enumerate(commands.start):
            self._start(fn, now, where.allocation(f"{fn.name}#start{k}", fn.name, fn.policies.need))
        fn.tiers.set_spares(commands.spares, now)
        if commands.step_to is not None:
            fn.tiers.step(commands.step_to, now)
        if commands.no_fit is not None and commands.no_fit.never:
            while fn.queue:  # the live platform answers them 503 (it can never start one)
                self._rejected_rows.append(fn.queue.popleft())
                self.rejected += 1
                self.outstanding -= 1
        elif commands.waiting_for_capacity and fn.queue:
            self._capacity_waited.update(fn.queue)
            self._waiting[fn.name] = fn
        else:
            self._waiting.pop(fn.name, None)
        if freed and self._waiting:
            self._retry_waiting(now, fn)

    def _retry_waiting(self, now: float, skip: _Fn) -> None:
        """Capacity freed: functions waiting for it are reconciled at once (the live
        controller wakes when a stop completes)."""
        for waiting in list(self._waiting.values()):
            if waiting is not skip:
                self._reconcile(waiting, now)

    def _schedule(self, fn: _Fn, now: float) -> None:
        """Make sure the function is reconciled when something can next change: every
        tick while it has demand or panics, and at its longest-idle instance's expiry."""
        wake = now + self.config.tick_s if fn.in_flight or fn.queue or fn.autoscaler.panicking else math.inf
        if fn.idle and len(fn.ready) > self.config.min_instances:
            first = next(iter(fn.idle.values()))
            last, surplus = keep_alive_windows(fn.policies.scaling, self.policy, fn.name, now)
            window = last if len(fn.ready) == 1 else surplus  # the last instance: the function's
            wake = min(wake, first.idle_since + window + _EPS)
        if not fn.ready and fn.starting == 0 and not fn.queue:
            observed = Observed(fn.name, 0, 0, (), 0, 0.0, fn.prewarmed_for, fn.tiers.holds)
            at = prewarm_wake(observed, fn.policies, now)
            if at is not None:
                wake = min(wake, at)
            at = tier_wake(observed, fn.policies, now)
            if at is not None:
                wake = min(wake, at + _EPS)
        if wake <= now:
            wake = now + self.config.tick_s
        if wake < fn.next_wake:
            fn.next_wake = wake
            self._push(wake, _WAKE, fn)

    # ------------------------------------------------------------ results

    def _results(self, end: float) -> dict[str, object]:
        # Containers are sized for the concurrency the trace offers, not the peak the
        # meter saw: that one depends on the policy (queueing lowers it, requests
        # released together by a cold start raise it).
        offered = dict(zip(self.trace.functions, peak_concurrency(self.trace).tolist(), strict=True))
        usage = {
            name: msgspec.structs.replace(u, peak_concurrency=offered.get(name, u.peak_concurrency))
            for name, u in self.meter.usage(end).items()
        }
        size = ContainerSize(self._resources, self._limit)
        overhead = self.meter.overhead(end)
        cost = report(usage, self.config.prices, end, dict.fromkeys(usage, size), overhead).total
        # Every tier is paid for: the templates, spares and weights (standby) and the
        # runtime's zygote (overhead) are in cost_usd and cost_ratio.
        cost_usd = cost.cost_with_overhead_usd
        oracle = oracle_cost(self.trace, self.config, self.profile)
        n = len(self.trace)
        added_ms = np.asarray(self._added, dtype=np.float64) * 1000.0
        if self._rejected_rows:  # answered 503, never served: no latency to count
            added_ms = np.delete(added_ms, self._rejected_rows)
        pct = self.config.latency_percentile
        if added_ms.size:
            p50, p99, at_pct = (float(x) for x in np.percentile(added_ms, [50, 99, pct]))
        else:
            p50 = p99 = at_pct = 0.0
        standby = sum(u.standby_gb_s for u in usage.values())
        runtime_gb_s = sum(overhead.values())
        return {
            "policy": self.config.policy,
            "speedup": self.config.speedup,
            "invocations": n,
            "cold_starts": self.cold_starts,
            "cold_start_pct": round(100.0 * self.cold_starts / n, 4) if n else 0.0,
            "instance_seconds": round(cost.alive_s, 3),
            "idle_instance_seconds": round(cost.alive_s - cost.busy_s, 3),
            "memory_gb_seconds": round(cost.memory_gb_s, 3),
            "standby_memory_gb_seconds": round(standby + runtime_gb_s, 3),
            "runtime_memory_gb_seconds": round(runtime_gb_s, 3),
            "cost_usd": round(cost_usd, 6),
            "instance_cost_usd": round(cost.cost_usd - cost.standby_usd, 6),
            "standby_cost_usd": round(cost.standby_usd + cost.overhead_usd, 6),
            "container_cost_usd": round(cost.container_cost_usd, 6),
            "cost_ratio": round(cost_usd / cost.container_cost_usd, 4) if cost.container_cost_usd else None,
            "oracle_cost_usd": round(oracle, 6),
            "cost_vs_oracle": round(cost_usd / oracle, 4) if oracle > 0 else None,
            "containers": cost.containers,
            "p50_added_ms": round(p50, 3),
            "p99_added_ms": round(p99, 3),
            "latency_objective_ms": self.config.latency_objective_ms,
            "latency_percentile": pct,
            "objective_met": at_pct <= self.config.latency_objective_ms + 1e-9,
            "instances_started": sum(f.started for f in self._fns),
            "starts_from_standby": self.starts_from[Tier.STANDBY],
            "starts_with_spare": self.starts_with_spare,
            "starts_from_resident": self.starts_from[Tier.RESIDENT],
            "starts_from_disk": self.starts_from[Tier.COLD],
            "starts_from_no_runtime": self.starts_from[Tier.NO_RUNTIME],
            "template_builds": sum(f.tiers.builds for f in self._fns),
            "prewarm_starts": self.prewarm_starts,
            "rejected": self.rejected,
            "queued_for_capacity": len(self._capacity_waited),
            "timed_out": self.timed_out,
            "nodes": self.config.nodes,
            "functions": len(self._fns),
            "period_s": round(end, 3),
        }


def simulate(trace: Path | str | Trace, config: SimConfig | None = None) -> dict[str, object]:
    """Replay a trace (a CSV file or a :class:`Trace`) and return the figures as one
    JSON-ready dict: see :class:`Simulation` and the module docstring. ``wall_s`` and
    ``invocations_per_min_wall`` include reading the file."""
    config = config or SimConfig()
    started = time.perf_counter()
    if not isinstance(trace, Trace):
        trace = read_trace(trace)
    out = Simulation(trace, config).run()
    wall = time.perf_counter() - started
    out["wall_s"] = round(wall, 3)
    out["invocations_per_min_wall"] = round(len(trace) / wall * 60.0) if wall > 0 else None
    return out
