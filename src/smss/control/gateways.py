"""What the gateways on other nodes report of their load, merged for the controller.

On a cluster every node's gateway routes requests with its own dispatchers; the
controller decides starts and stops for all of them. Each gateway reports, a few
times a second and at once when a request finds no free instance, a
:class:`GatewayReport`: per function, its queued requests and arrivals, and per
instance what it has in flight, how long that instance has been idle for it, and how
many requests it started and finished there. :class:`GatewayLoads` keeps the latest
report of each gateway and answers the controller's questions: the demand of a
function summed over every gateway, and each instance's load merged with the
controller's own view (busy if any gateway is busy on it; idle since the latest
request any of them finished). Pure: ``now`` is the controller's monotonic time, and
durations in reports (``idle_for_s``) are turned into it on receipt, so gateways'
clocks never need to agree.

A gateway whose report is older than ``stale_after_s`` is gone (its node died, or it
was stopped): its demand no longer counts, and what it had in flight is finished.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from smss.control.scaling import InstanceView

K = TypeVar("K")


class InstanceLoad(msgspec.Struct, frozen=True, array_like=True):
    id: str
    in_flight: int
    #: Seconds since the gateway's last request on it finished; None while busy.
    idle_for_s: float | None
    #: Requests the gateway started / finished on it, since the gateway began.
    started: int = 0
    finished: int = 0


class FunctionLoad(msgspec.Struct, frozen=True):
    function: str
    generation: int
    queued: int
    #: Requests that arrived at the gateway for it, since the gateway began.
    arrivals: int
    instances: tuple[InstanceLoad, ...] = ()
    #: Instances the gateway found lost (connection ended) since its last report.
    lost: tuple[str, ...] = ()


class GatewayReport(msgspec.Struct, frozen=True):
    gateway: str
    node: str
    seq: int
    functions: tuple[FunctionLoad, ...] = ()


@dataclass
class Changes:
    """What a report changed, for the controller to apply: arrivals per function (the
    keep-alive policy learns from them), requests started and finished per (function,
    instance) (metering), and instances found lost."""

    arrivals: dict[str, int] = field(default_factory=dict)
    started: dict[tuple[str, str], int] = field(default_factory=dict)
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    lost: list[tuple[str, str]] = field(default_factory=list)

    @property
    def demand_changed(self) -> bool:
        return bool(self.arrivals or self.started or self.finished or self.lost)


@dataclass
class _Held:
    report: GatewayReport
    received: float
    #: instance id -> when it became idle for this gateway (controller time), None: busy.
    idle_since: dict[str, float | None]


class GatewayLoads:
    def __init__(self, stale_after_s: float = 3.0) -> None:
        self.stale_after_s = stale_after_s
        self._held: dict[str, _Held] = {}

    def gateways(self) -> list[GatewayReport]:
        return [h.report for h in self._held.values()]

    def update(self, report: GatewayReport, now: float) -> Changes:
        """Take ``report`` (an older one than held is ignored) and say what it changed."""
        held = self._held.get(report.gateway)
        if held is not None and report.seq <= held.report.seq:
            return Changes()
        changes = Changes()
        before = {f.function: f for f in held.report.functions} if held else {}
        for f in report.functions:
            old = before.get(f.function)
            if old is not None and old.generation != f.generation:
                old = None
            _count(changes.arrivals, f.function, f.arrivals - (old.arrivals if old else 0))
            old_inst = {i.id: i for i in old.instances} if old else {}
            for inst in f.instances:
                was = old_inst.get(inst.id)
                key = (f.function, inst.id)
                _count(changes.started, key, inst.started - (was.started if was else 0))
                _count(changes.finished, key, inst.finished - (was.finished if was else 0))
            changes.lost += [(f.function, iid) for iid in f.lost]
        idle = {
            i.id: (None if i.idle_for_s is None else now - i.idle_for_s)
            for f in report.functions
            for i in f.instances
        }
        self._held[report.gateway] = _Held(report, now, idle)
        return changes

    def expire(self, now: float) -> Changes:
        """Forget gateways silent for longer than ``stale_after_s``; what they had in
        flight is finished."""
        changes = Changes()
        for gateway, held in list(self._held.items()):
            if now - held.received <= self.stale_after_s:
                continue
            del self._held[gateway]
            for f in held.report.functions:
                for inst in f.instances:
                    _count(changes.finished, (f.function, inst.id), inst.started - inst.finished)
        return changes

    def demand(self, function: str) -> tuple[int, int]:
        """(in flight, queued) of ``function`` over every gateway."""
        in_flight = queued = 0
        for f in self._functions(function):
            queued += f.queued
            in_flight += sum(i.in_flight for i in f.instances)
        return in_flight, queued

    def merge(self, function: str, views: Sequence[InstanceView]) -> list[InstanceView]:
        """The controller's own views of ``function``'s instances with every gateway's
        load on them added: in flight summed; idle since the latest finish anywhere, or
        busy (None) while anyone has a request on it."""
        busy: dict[str, int] = {}
        idle: dict[str, float] = {}
        for held in self._held.values():
            for f in held.report.functions:
                if f.function != function:
                    continue
                for inst in f.instances:
                    busy[inst.id] = busy.get(inst.id, 0) + inst.in_flight
                    since = held.idle_since.get(inst.id)
                    if since is not None:
                        idle[inst.id] = max(idle.get(inst.id, since), since)
        out = []
        for v in views:
            in_flight = v.in_flight + busy.get(v.id, 0)
            since = v.idle_since
            if in_flight > 0:
                since = None
            elif since is not None and v.id in idle:
                since = max(since, idle[v.id])
            out.append(InstanceView(v.id, in_flight, since))
        return out

    def _functions(self, function: str) -> Iterable[FunctionLoad]:
        for held in self._held.values():
            for f in held.report.functions:
                if f.function == function:
                    yield f


def _count(table: dict[K, int], key: K, n: int) -> None:
    if n > 0:
        table[key] = table.get(key, 0) + n
