"""Metering: what every instance used, for the cost report. Pure, clock-driven.

The controller (or the simulator) reports four kinds of events, each with the time
it happened (monotonic seconds); the meter never reads a clock and does no I/O:

* :meth:`Meter.instance_started` - an instance was asked for, with its declared
  :class:`~smss.spec.Resources`. It is metered from here on (a starting instance holds
  its memory and CPU share, and a platform bills it);
* :meth:`Meter.instance_stopped` - it is gone;
* :meth:`Meter.request_started` / :meth:`Meter.request_finished` - one request began
  or ended on an instance.

and, for what is resident whether or not an instance runs (templates, spares, weight
segments, zygotes, the platform's own processes):

* :meth:`Meter.hold` - ``key`` holds this many MiB from now on, attributed to an
  *owner*: a function's name, ``runtime:NAME`` (a runtime's zygote) or ``platform``
  (the gateway and agent); 0 releases it;
* :meth:`Meter.standby_cpu` - CPU seconds spent keeping a function ready (a spare's
  rehearsal).

Per function, :meth:`Meter.usage` answers alive seconds (the sum of its instances'
lifetimes up to ``now``), busy seconds (per instance, the union of the time it had at
least one request in flight, summed), invocations, alive seconds weighted by the
declared cpu / memory / GPU share, the peak number of requests in flight at once, the
peak number of instances alive at once and the instances started, and its standby
GB-seconds (what it held resident, integrated over time) and standby CPU seconds;
:meth:`Meter.overhead` answers the GB-seconds of the runtimes and the platform.

Guarantees: alive seconds equal the sum of instance lifetimes; busy seconds never
exceed alive seconds; a time earlier than the latest time seen for an instance is
taken as that time (time never runs backwards for an instance, so no interval is
negative). Events for unknown instances are tolerated where the live platform can
race: a request started on an instance not metered counts as an invocation only, and
one finishing on an instance already stopped is ignored (the stop ended it). Every
call is O(1); :meth:`Meter.usage` is O(live instances).
"""

from __future__ import annotations

import msgspec

from smss.spec import Resources


class FunctionUsage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one function used. ``*_s`` are seconds; ``memory_gb_s`` is GB-seconds
    (alive seconds x declared memory_mb / 1024); ``gpu_s`` is GPU-seconds (alive x
    declared GPU share). ``resources`` is the declaration of its latest instance."""

    alive_s: float = 0.0
    busy_s: float = 0.0
    invocations: int = 0
    cpu_s: float = 0.0
    memory_gb_s: float = 0.0
    gpu_s: float = 0.0
    peak_concurrency: int = 0
    peak_instances: int = 0
    instances_started: int = 0
    resources: Resources = Resources()
    #: GB-seconds it held resident besides instances (template, spare, weights).
    standby_gb_s: float = 0.0
    #: CPU seconds spent keeping it ready (its spares' rehearsals).
    standby_cpu_s: float = 0.0

    @property
    def idle_s(self) -> float:
        return max(self.alive_s - self.busy_s, 0.0)


class UsageSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Usage of every function at ``at`` (the monotonic time it was taken), in a form
    that is stored and served as JSON (:meth:`to_builtins`, :func:`decode_snapshot`)."""

    at: float
    functions: dict[str, FunctionUsage]
    #: GB-seconds of what no one function holds: ``runtime:NAME`` (a zygote) and
    #: ``platform`` (the platform's own processes).
    overhead_gb_s: dict[str, float] = msgspec.field(default_factory=dict)

    def to_builtins(self) -> dict[str, object]:
        out: dict[str, object] = msgspec.to_builtins(self)
        return out

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)


def decode_snapshot(data: bytes) -> UsageSnapshot:
    return msgspec.json.decode(data, type=UsageSnapshot)


class _Fn:
    """Running totals of one function: closed intervals plus its live instances."""

    __slots__ = (
        "alive_s",
        "busy_s",
        "cpu_s",
        "gpu_s",
        "in_flight",
        "instances_started",
        "invocations",
        "live",
        "memory_gb_s",
        "peak_concurrency",
        "peak_instances",
        "resources",
        "standby_cpu_s",
        "standby_gb_s",
    )

    def __init__(self, base: FunctionUsage | None = None) -> None:
        b = base or FunctionUsage()
        self.alive_s = b.alive_s
        self.busy_s = b.busy_s
        self.cpu_s = b.cpu_s
        self.memory_gb_s = b.memory_gb_s
        self.gpu_s = b.gpu_s
        self.invocations = b.invocations
        self.peak_concurrency = b.peak_concurrency
        self.peak_instances = b.peak_instances
        self.instances_started = b.instances_started
        self.resources = b.resources
        self.standby_gb_s = b.standby_gb_s
        self.standby_cpu_s = b.standby_cpu_s
        self.in_flight = 0
        self.live = 0


class _Inst:
    __slots__ = ("busy_s", "busy_since", "cpu", "fn", "gb", "gpu", "in_flight", "last", "started")

    def __init__(self, fn: _Fn, resources: Resources, now: float) -> None:
        self.fn = fn
        self.cpu = float(resources.cpu)
        self.gb = resources.memory_mb / 1024.0
        self.gpu = float(resources.gpu)
        self.started = now
        self.last = now  # latest time seen for this instance
        self.in_flight = 0
        self.busy_since = 0.0
        self.busy_s = 0.0


class Meter:
    """Alive and busy seconds, invocations and peaks per function. See the module
    docstring for the events and guarantees. ``base`` carries totals over from an
    earlier snapshot (after a restart the platform's instances are new ones)."""

    def __init__(self, base: UsageSnapshot | None = None) -> None:
        self._fns: dict[str, _Fn] = {}
        self._insts: dict[str, _Inst] = {}
        #: What is held resident now, by key: (owner, MiB, since).
        self._holds: dict[str, tuple[str, float, float]] = {}
        #: Closed GB-seconds of the owners that are not functions.
        self._overhead: dict[str, float] = {}
        if base is not None:
            self._fns = {name: _Fn(u) for name, u in base.functions.items()}
            self._overhead = dict(base.overhead_gb_s)

    def _fn(self, function: str) -> _Fn:
        fn = self._fns.get(function)
        if fn is None:
            fn = self._fns[function] = _Fn()
        return fn

    # ------------------------------------------------------------ instances

    def instance_started(self, instance_id: str, function: str, resources: Resources, now: float) -> None:
        if instance_id in self._insts:
            raise ValueError(f"instance {instance_id!r} is already metered")
        fn = self._fn(function)
        self._insts[instance_id] = _Inst(fn, resources, now)
        fn.resources = resources
        fn.instances_started += 1
        fn.live += 1
        if fn.live > fn.peak_instances:
            fn.peak_instances = fn.live

    def instance_stopped(self, instance_id: str, now: float) -> None:
        """Close an instance's lifetime at ``now``; unknown ids are ignored (stopped twice)."""
        inst = self._insts.pop(instance_id, None)
        if inst is None:
            return
        now = max(now, inst.last)
        fn = inst.fn
        if inst.in_flight > 0:  # stopped with requests in flight: they end with it
            inst.busy_s += now - inst.busy_since
            fn.in_flight -= inst.in_flight
        alive = now - inst.started
        fn.alive_s += alive
        fn.busy_s += inst.busy_s
        fn.cpu_s += alive * inst.cpu
        fn.memory_gb_s += alive * inst.gb
        fn.gpu_s += alive * inst.gpu
        fn.live -= 1

    # ------------------------------------------------------------ what is resident

    def hold(self, key: str, owner: str, mb: float, now: float) -> None:
        """``key`` holds ``mb`` MiB from ``now`` on, for ``owner`` (a function, or an
        overhead owner: ``runtime:NAME``, ``platform``); 0 releases it. A time before
        the hold's start is taken as its start."""
        held = self._holds.pop(key, None)
        if held is not None:
            self._close(held, now)
        if mb > 0:
            if not is_overhead(owner):
                self._fn(owner)
            self._holds[key] = (owner, float(mb), now if held is None else max(now, held[2]))

    def holds(self) -> dict[str, tuple[str, float]]:
        """What is held now: key -> (owner, MiB)."""
        return {key: (owner, mb) for key, (owner, mb, _) in self._holds.items()}

    def standby_cpu(self, function: str, seconds: float) -> None:
        self._fn(function).standby_cpu_s += max(seconds, 0.0)

    def _close(self, held: tuple[str, float, float], now: float) -> None:
        owner, mb, since = held
        gb_s = max(now - since, 0.0) * mb / 1024.0
        if is_overhead(owner):
            self._overhead[owner] = self._overhead.get(owner, 0.0) + gb_s
        else:
            self._fn(owner).standby_gb_s += gb_s

    def _open_gb_s(self, now: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for owner, mb, since in self._holds.values():
            out[owner] = out.get(owner, 0.0) + max(now - since, 0.0) * mb / 1024.0
        return out

    def overhead(self, now: float) -> dict[str, float]:
        """GB-seconds of the overhead owners (runtimes, the platform) up to ``now``."""
        out = dict(self._overhead)
        for owner, gb_s in self._open_gb_s(now).items():
            if is_overhead(owner):
                out[owner] = out.get(owner, 0.0) + gb_s
        return out

    # ------------------------------------------------------------ requests

    def request_started(self, function: str, instance_id: str, now: float) -> None:
        inst = self._insts.get(instance_id)
        if inst is None:  # not metered (lost meanwhile): an invocation, but no busy time
            self._fn(function).invocations += 1
            return
        fn = inst.fn
        fn.invocations += 1
        fn.in_flight += 1
        if fn.in_flight > fn.peak_concurrency:
            fn.peak_concurrency = fn.in_flight
        if now < inst.last:
            now = inst.last
        inst.last = now
        if inst.in_flight == 0:
            inst.busy_since = now
        inst.in_flight += 1

    def request_finished(self, function: str, instance_id: str, now: float) -> None:
        inst = self._insts.get(instance_id)
        if inst is None:  # stopped meanwhile: its requests were released at its stop
            return
        if inst.in_flight == 0:
            return  # more finishes than starts: ignore rather than go negative
        if now < inst.last:
            now = inst.last
        inst.last = now
        inst.in_flight -= 1
        inst.fn.in_flight -= 1
        if inst.in_flight == 0:
            inst.busy_s += now - inst.busy_since

    # ------------------------------------------------------------ reading

    def in_flight(self, function: str) -> int:
        fn = self._fns.get(function)
        return 0 if fn is None else fn.in_flight

    def usage(self, now: float) -> dict[str, FunctionUsage]:
        """Usage of every function metered so far, live instances counted up to ``now``."""
        open_: dict[int, list[float]] = {}
        for inst in self._insts.values():
            t = max(now, inst.last)
            alive = t - inst.started
            busy = inst.busy_s + (t - inst.busy_since if inst.in_flight > 0 else 0.0)
            acc = open_.setdefault(id(inst.fn), [0.0, 0.0, 0.0, 0.0, 0.0])
            acc[0] += alive
            acc[1] += busy
            acc[2] += alive * inst.cpu
            acc[3] += alive * inst.gb
            acc[4] += alive * inst.gpu
        held = self._open_gb_s(now)
        out: dict[str, FunctionUsage] = {}
        for name, fn in self._fns.items():
            a = open_.get(id(fn), [0.0, 0.0, 0.0, 0.0, 0.0])
            out[name] = FunctionUsage(
                alive_s=fn.alive_s + a[0],
                busy_s=fn.busy_s + a[1],
                invocations=fn.invocations,
                cpu_s=fn.cpu_s + a[2],
                memory_gb_s=fn.memory_gb_s + a[3],
                gpu_s=fn.gpu_s + a[4],
                peak_concurrency=fn.peak_concurrency,
                peak_instances=fn.peak_instances,
                instances_started=fn.instances_started,
                resources=fn.resources,
                standby_gb_s=fn.standby_gb_s + held.get(name, 0.0),
                standby_cpu_s=fn.standby_cpu_s,
            )
        return out

    def snapshot(self, now: float) -> UsageSnapshot:
        return UsageSnapshot(at=now, functions=self.usage(now), overhead_gb_s=self.overhead(now))


def is_overhead(owner: str) -> bool:
    """Whether a hold's owner is overhead (a runtime, the platform), not a function."""
    return owner == "platform" or owner.startswith("runtime:")
