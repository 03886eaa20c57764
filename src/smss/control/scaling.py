"""How many instances to start and which to stop, for one function, now.

Pure: the controller builds a :class:`FunctionView` each tick and applies the
:class:`ScalePlan`; the simulator does the same on a virtual clock.

Rules:

* Up: the autoscaler's desired count, but only while there is demand now
  (requests in flight or queued) or ``min_instances`` is not met. Starting an
  instance nobody is asking for is pre-warming, which is the keep-alive
  policy's decision, not the autoscaler's.
* Up at once for queued requests: requests queued beyond the free slots of
  the ready instances and the slots of the instances already starting are
  waiting on capacity that nobody has asked for, so ``ceil(excess /
  concurrency)`` more instances start now, whatever the autoscaler's windows
  say (they average a burst away for seconds; Knative's activator does the
  same). Both up rules stop at ``max_instances``.
* Up is paused while a failed start's back-off runs.
* Down: an idle instance (nothing in flight) is stopped, longest-idle first,
  while more than ``min_instances`` remain and, with demand now, more than the
  autoscaler's desired count. The idle time that stops it depends on what it is:
  the function's *last* instance (stopping it scales the function to zero) is
  stopped after ``keep_alive_s``, the keep-alive policy's window for the
  function; any other one, capacity beyond the first, after
  ``surplus_keep_alive_s`` (``None``: the same ``keep_alive_s``, i.e. one TTL per
  instance as on AWS Lambda).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: str
    in_flight: int
    idle_since: float | None  # monotonic time it became idle; None while busy


@dataclass(frozen=True, slots=True)
class FunctionView:
    now: float
    demand: int  # in flight + queued
    ready: Sequence[InstanceView]
    starting: int
    min_instances: int
    max_instances: int
    desired: int  # from the autoscaler
    keep_alive_s: float  # idle time that stops the function's last instance
    backoff_until: float = 0.0
    queued: int = 0  # requests waiting for a slot (included in demand)
    concurrency: int = 1  # requests one instance serves at once
    #: Idle time that stops an instance other than the last; None: ``keep_alive_s``.
    surplus_keep_alive_s: float | None = None


@dataclass(frozen=True, slots=True)
class ScalePlan:
    start: int
    stop: tuple[str, ...]


def plan(view: FunctionView) -> ScalePlan:
    return ScalePlan(start=_starts(view), stop=_stops(view))


def _starts(view: FunctionView) -> int:
    if view.now < view.backoff_until:
        return 0
    have = len(view.ready) + view.starting
    want = max(view.min_instances, view.desired if view.demand > 0 else 0)
    start = max(0, want - have)
    if view.queued > 0:
        limit = max(view.concurrency, 1)
        free = sum(max(limit - i.in_flight, 0) for i in view.ready) + view.starting * limit
        excess = view.queued - free
        if excess > 0:
            start = max(start, -(-excess // limit))
    return max(0, min(start, view.max_instances - have))


def _stops(view: FunctionView) -> tuple[str, ...]:
    ready = len(view.ready)
    floor = max(view.min_instances, view.desired if view.demand > 0 else 0)
    surplus = view.keep_alive_s if view.surplus_keep_alive_s is None else view.surplus_keep_alive_s
    idle = sorted(
        (i for i in view.ready if i.in_flight == 0 and i.idle_since is not None),
        key=lambda i: i.idle_since or 0.0,
    )
    stop: list[str] = []
    for inst in idle:
        left = ready - len(stop)
        if left <= floor:
            break
        window = view.keep_alive_s if left == 1 else surplus
        if inst.idle_since is not None and view.now - inst.idle_since >= window:
            stop.append(inst.id)
    return tuple(stop)
