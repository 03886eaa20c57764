"""What happened over time in a simulation or a live replay: the series that
``--plot`` draws (instances, functions by tier, cold starts, memory held, cost against
always-on containers), in fixed time buckets.

For a simulation the series are recorded by a meter that remembers every instance
start and stop and every request (:class:`RecordingMeter`: it is the simulation's
meter, so nothing in the simulator changes); a cold start is a request served when
the simulation's count of cold starts has just gone up. A live replay builds the
same :class:`Timeline` from samples of ``GET /v1/functions``, ``/v1/devices`` and
``/v1/cost`` (:func:`from_samples`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smss.control.cost import PriceTable
from smss.control.metering import Meter, is_overhead
from smss.sim.config import SimConfig
from smss.sim.simulator import Simulation
from smss.sim.trace import Trace, read_trace
from smss.spec import Resources

BUCKETS = 200


@dataclass
class Timeline:
    """Series over time, one value per bucket starting at ``t_s``. ``tiers`` maps a
    tier name to the number of functions in it; ``memory_gb`` to what each kind of
    thing held (``instances``, and live also ``resident``: weights, templates, spares).
    Costs are cumulative since the start; the containers' is the always-on baseline."""

    t_s: list[float]
    instances: list[float]
    tiers: dict[str, list[float]]
    cold_starts: list[float]
    memory_gb: dict[str, list[float]]
    cost_usd: list[float]
    container_cost_usd: list[float]


@dataclass
class _Event:
    t: float
    #: start | stop | request | cold | standby (a change of what standby costs a second,
    #: ``usd_per_s``) | spent (``usd_per_s`` dollars spent at once: standby CPU)
    kind: str
    function: str
    memory_mb: float = 0.0
    usd_per_s: float = 0.0


def instance_usd_per_s(resources: Resources, prices: PriceTable) -> float:
    """What an instance declaring ``resources`` costs per second alive (as the cost report prices it)."""
    return (
        resources.cpu * prices.usd_per_vcpu_second
        + resources.memory_mb / 1024 * prices.usd_per_gb_second
        + resources.gpu * prices.usd_per_gpu_second
    )


class RecordingMeter(Meter):
    """A :class:`Meter` that also remembers when each instance started and stopped and
    when each request was served, and which requests were cold starts."""

    def __init__(self, prices: PriceTable) -> None:
        super().__init__()
        self.events: list[_Event] = []
        #: The simulation it meters (set once that is built on this meter): cold starts are its count.
        self.simulation: Simulation | None = None
        self._prices = prices
        self._cold_seen = 0
        self._alive: dict[str, _Event] = {}

    def instance_started(self, instance_id: str, function: str, resources: Resources, now: float) -> None:
        super().instance_started(instance_id, function, resources, now)
        event = _Event(
            now, "start", function, resources.memory_mb, instance_usd_per_s(resources, self._prices)
        )
        self._alive[instance_id] = event
        self.events.append(event)

    def instance_stopped(self, instance_id: str, now: float) -> None:
        super().instance_stopped(instance_id, now)
        started = self._alive.pop(instance_id, None)
        if started is not None:
            self.events.append(_Event(now, "stop", started.function, started.memory_mb, started.usd_per_s))

    def hold(self, key: str, owner: str, mb: float, now: float) -> None:
        before = self.holds().get(key)
        super().hold(key, owner, mb, now)
        # Standby is priced in cost_usd (overhead is not): its rate changes by the MiB held.
        was = before[1] if before is not None and not is_overhead(before[0]) else 0.0
        held = mb if mb > 0 and not is_overhead(owner) else 0.0
        if held != was:
            usd = (held - was) / 1024.0 * self._prices.usd_per_gb_second
            self.events.append(_Event(now, "standby", owner, usd_per_s=usd))

    def standby_cpu(self, function: str, seconds: float) -> None:
        super().standby_cpu(function, seconds)
        if seconds > 0:
            usd = seconds * self._prices.usd_per_vcpu_second
            # No time comes with it: placed at the latest event (a rehearsal follows a start).
            at = self.events[-1].t if self.events else 0.0
            self.events.append(_Event(at, "spent", function, usd_per_s=usd))

    def request_started(self, function: str, instance_id: str, now: float) -> None:
        super().request_started(function, instance_id, now)
        seen = self.simulation.cold_starts if self.simulation is not None else 0
        cold = seen > self._cold_seen
        self._cold_seen = seen
        self.events.append(_Event(now, "cold" if cold else "request", function))


def recorded(
    events: Sequence[_Event], functions: Sequence[str], out: dict[str, Any], prices: PriceTable
) -> Timeline:
    """The :class:`Timeline` of a simulation's events and its figures ``out``."""
    period = max(float(out["period_s"]), 1e-9)
    width = period / BUCKETS
    t_s = [i * width for i in range(BUCKETS)]
    instances, warm, cold_starts, memory, cost = ([0.0] * BUCKETS for _ in range(5))
    alive: dict[str, int] = {}
    count = mem_mb = rate = spent = 0.0
    last_t = 0.0
    k = 0
    request_usd = prices.usd_per_million_requests / 1e6
    for b in range(BUCKETS):
        end = (b + 1) * width
        while k < len(events) and events[k].t <= end:
            e = events[k]
            spent += rate * (e.t - last_t)
            last_t = e.t
            if e.kind == "start":
                count, mem_mb, rate = count + 1, mem_mb + e.memory_mb, rate + e.usd_per_s
                alive[e.function] = alive.get(e.function, 0) + 1
            elif e.kind == "stop":
                count, mem_mb, rate = count - 1, mem_mb - e.memory_mb, rate - e.usd_per_s
                alive[e.function] -= 1
            elif e.kind == "standby":
                rate += e.usd_per_s
            elif e.kind == "spent":
                spent += e.usd_per_s
            else:
                spent += request_usd
                if e.kind == "cold":
                    cold_starts[b] += 1
            k += 1
        spent += rate * (end - last_t)
        last_t = end
        instances[b], memory[b], cost[b] = count, mem_mb / 1024, spent
        warm[b] = sum(1 for n in alive.values() if n > 0)
    container = float(out["container_cost_usd"])
    n = len(functions)
    return Timeline(
        t_s=t_s,
        instances=instances,
        tiers={"warm": warm, "cold": [n - w for w in warm]},
        cold_starts=cold_starts,
        memory_gb={"instances": memory},
        cost_usd=cost,
        container_cost_usd=[container * (t + width) / period for t in t_s],
    )


def simulate_recorded(trace: Path | str | Trace, config: SimConfig) -> tuple[dict[str, object], Timeline]:
    """:func:`smss.sim.simulator.simulate`, and what happened over time."""
    started = time.perf_counter()
    if not isinstance(trace, Trace):
        trace = read_trace(trace)
    meter = RecordingMeter(config.prices)
    simulation = Simulation(trace, config, meter)
    meter.simulation = simulation
    out = simulation.run()
    wall = time.perf_counter() - started
    out["wall_s"] = round(wall, 3)
    out["invocations_per_min_wall"] = round(len(trace) / wall * 60.0) if wall > 0 else None
    return out, recorded(meter.events, trace.functions, out, config.prices)


@dataclass
class Sample:
    """One look at a live platform: seconds since the replay began, and the bodies of
    ``GET /v1/functions``, ``/v1/devices``, ``/v1/weights`` and ``/v1/cost``."""

    t_s: float
    functions: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    weights: dict[str, Any]
    cost: dict[str, Any]


TIERS = ("warm", "standby", "resident", "cold")


def tier_of(function: dict[str, Any], weights: dict[str, Any]) -> str:
    """A function's tier of readiness (``GET /v1/functions``): the ``tier`` the platform
    reports where it does, else derived from what is resident (as the dashboard does):
    warm with an instance, standby with a template in a node's store, resident with its
    weights there, else cold."""
    reported = function.get("tier")
    if isinstance(reported, str) and reported:
        return reported
    if function["instances"]:
        return "warm"
    key = f"{function['name']}@g{function['generation']}"
    stores = list(weights.values())
    if any(key in s.get("templates", {}) for s in stores):
        return "standby"
    if any(key in s.get("models", ()) for s in stores):
        return "resident"
    return "cold"


def from_samples(
    samples: Sequence[Sample], cold_at_s: Sequence[float], period_s: float, container_cost_usd: float
) -> Timeline:
    """The :class:`Timeline` of a live replay: ``samples`` taken during it, the send
    times of the requests that were cold starts, the replay's period and its
    always-on baseline. Each bucket takes the latest sample at or before its end."""
    period = max(period_s, 1e-9)
    width = period / BUCKETS
    t_s = [i * width for i in range(BUCKETS)]
    cold = [0.0] * BUCKETS
    for t in cold_at_s:
        cold[min(int(t / width), BUCKETS - 1)] += 1
    instances, held, resident, cost = ([0.0] * BUCKETS for _ in range(4))
    tiers = {t: [0.0] * BUCKETS for t in TIERS}
    base = samples[0].cost["total"]["cost_usd"] if samples else 0.0
    k = -1
    for b in range(BUCKETS):
        while k + 1 < len(samples) and samples[k + 1].t_s <= (b + 1) * width:
            k += 1
        if k < 0:
            continue
        s = samples[k]
        instances[b] = sum(len(f["instances"]) + f["starting"] for f in s.functions)
        for f in s.functions:
            tier = tier_of(f, s.weights)
            tiers.setdefault(tier, [0.0] * BUCKETS)[b] += 1
        placed = [a for d in s.devices for a in d["placed"]]
        held[b] = (
            sum(a["cpu"]["memory_mb"] + a["gpu"]["gpu_memory_mb"] for a in placed if a["kind"] == "instance")
            / 1024
        )
        resident[b] = (
            sum(a["cpu"]["memory_mb"] + a["gpu"]["gpu_memory_mb"] for a in placed if a["kind"] != "instance")
            / 1024
        )
        cost[b] = s.cost["total"]["cost_usd"] - base
    return Timeline(
        t_s=t_s,
        instances=instances,
        tiers=tiers,
        cold_starts=cold,
        memory_gb={"instances": held, "resident": resident},
        cost_usd=cost,
        container_cost_usd=[container_cost_usd * (t + width) / period for t in t_s],
    )
