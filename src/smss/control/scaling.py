"""How many instances to start and which to stop, for one function, now.

Pure: the controller builds a :class:`FunctionView` each tick and applies the
:class:`ScalePlan`; the simulator does the same on a virtual clock.

Rules:

* Up: the autoscaler's desired count, but only while there is demand now
  (requests in flight or queued) or ``min_instances`` is not met. Starting an
  instance nobody is asking for is pre-warming, which is the keep-alive
  policy's decision, not the autoscaler's.
* Up is paused while a failed start's back-off runs.
* Down: an instance idle (nothing in flight) for at least the keep-alive time
  is stopped, longest-idle first, while more than ``min_instances`` remain and
  the autoscaler does not want them (ready - stopped >= desired).
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
    keep_alive_s: float
    backoff_until: float = 0.0


@dataclass(frozen=True, slots=True)
class ScalePlan:
    start: int
    stop: tuple[str, ...]


def plan(view: FunctionView) -> ScalePlan:
    ready = len(view.ready)
    have = ready + view.starting
    want = max(view.min_instances, view.desired if view.demand > 0 else 0)
    want = min(want, view.max_instances)
    start = max(0, want - have) if view.now >= view.backoff_until else 0
    floor = max(view.min_instances, view.desired if view.demand > 0 else 0)
    idle = sorted(
        (i for i in view.ready if i.in_flight == 0 and i.idle_since is not None),
        key=lambda i: i.idle_since or 0.0,
    )
    stop: list[str] = []
    for inst in idle:
        if ready - len(stop) <= floor:
            break
        if inst.idle_since is not None and view.now - inst.idle_since >= view.keep_alive_s:
            stop.append(inst.id)
    return ScalePlan(start=start, stop=tuple(stop))
