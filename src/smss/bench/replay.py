"""``smss bench replay``: a trace replayed against a live platform, beside the simulator.

Starts ``smss serve`` as a subprocess with the keep-alive policy under test, deploys
one synthetic python-runtime function per function of the trace (concurrency 1,
``max_instances`` instances at most, ``cpu`` cores declared (0.1), ``memory_mb``), and replays the trace
open loop, ``speedup`` (K) times faster than recorded: the request of row ``t_ms``
is sent at ``t_ms / K`` after the start whether or not earlier ones were answered,
and asks its function to spend ``duration_ms / K`` of wall time: asleep by default
(``work="sleep"``), so that an instance uses about the 0.1 core it declares, as the
simulator assumes, and what is measured is the platform's own decisions and
overhead; with ``work="spin"`` it spins on a core for that long (every busy instance
then takes a whole core, and on a small machine the gateway competes with them).

**Time scaling.** With speedup K the platform sees every idle gap K times shorter,
so every duration of the keep-alive policy is divided by K too
(:func:`~smss.control.keepalive.scale_policy`: ``fixed:600`` runs as ``fixed:60``,
``hybrid`` with its bins, range and surplus window / K, the fallback TTL / K); the
platform's own constants (autoscaler windows, tick, start time) stay what they are.
The simulator is then run in-process on the same compressed trace with the same
settings (and the live node's capacity, from ``GET /v1/devices``, as its one node:
both sides place instances on the same cores and memory; the simulator does not
place the templates and spares the live node keeps resident; ``speedup=K``, the
live tick, the same instance limits) and the *measured* start times: a start
from a resident template (``fork_start_ms``) as ``cold_start_ms``, a function's
first start, which builds its template (``template_start_ms``), as
``first_start_ms``; both results are reported side by side
(``simulate``, ``cold_starts_diff_pct``, ``instance_starts_diff_pct``). A second run
(``simulate_with_overhead``) also holds each instance for the platform's measured
per-request overhead (``warm_overhead_p50_ms``), which trace durations leave out and
which matters when durations are divided by K: it shows how much of a live/simulated
difference that accounts for.

**What is measured.**

* ``cold_starts``: requests that waited for an instance to start, the simulator's
  definition, as the platform's dispatcher marks them (the ``SMSS-Cold-Start: 1``
  header of the answer): the request found no free slot and was then taken by an
  instance that had just become ready. Requests that waited only for a busy
  instance, or that found an instance a pre-warm or an earlier burst had started,
  are not.
* ``instance_starts``: every instance start the platform counted
  (``GET /v1/functions`` ``cold_starts``: starts for demand and pre-warms alike);
  compare with the simulator's ``instances_started``.
* usage and money from ``GET /v1/cost``: ``instance_seconds`` (alive),
  ``idle_instance_seconds`` (alive - busy), ``memory_gb_seconds``, ``cost_usd``.
  ``container_cost_usd`` is recomputed as the simulator does it: containers for the
  concurrency the trace offers, over the replay's period (first arrival to last
  answer), so ``cost_ratio`` compares like with like; the platform's own ratio
  (containers for the peak it metered, over its whole uptime) is
  ``platform_cost_ratio``.
* ``p50_added_ms`` / ``p99_added_ms``: client latency minus ``duration_ms / K``
  (``cold_added_p50_ms``: of the cold starts; ``warm_overhead_p50_ms``: of the rest).
* ``start_ms``: the mean instance start the platform measured (ask to ready, all
  starts); ``fork_start_ms``: of the starts from a resident template (tier
  ``standby``); ``template_start_ms``: of the starts that built the function's
  template first (tiers ``resident``, ``cold``, ``no_runtime``), ``template_starts``
  of them (the simulator's ``template_builds``), from ``smss_start_seconds`` in /metrics.
* ``errors``: answers other than 200 and failed requests, by reason.
* tiers of readiness: ``standby_memory_gb_seconds`` (over the replay, from ``GET
  /v1/cost``: what the functions held resident besides instances, their templates,
  spares and weights, plus the runtime's zygote; the platform's own process is left
  out, as the simulator has none) and the instance starts by the tier they began from
  (``starts_from_standby``, ``starts_from_resident``, ``starts_from_disk``,
  ``starts_from_no_runtime``, from ``smss_start_seconds``), beside the simulator's
  (``standby_memory_diff_pct``). The simulator decides with the live policy's tier
  profile (the defaults: the same start latencies, so both sides make the same
  choices) and holds, as footprints, what the live templates, spares and zygote held at
  the end of the replay (PSS without shared segments, read from ``/proc``:
  ``live_tiers``, with the node's measured start times by tier).

The small trace (3,096 invocations, 20 minutes) at K = 10 takes about two minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.bench.tiers import children, own_kb
from smss.client import Client
from smss.control.cost import ContainerSize, PriceTable
from smss.control.keepalive import scale_policy
from smss.control.tiers import TierProfile
from smss.errors import InvalidSpec
from smss.headers import COLD_START
from smss.packaging import load_class, package_class
from smss.progress import SILENT, Progress
from smss.sim.config import SimConfig
from smss.sim.simulator import simulate
from smss.sim.timeline import Sample, from_samples, simulate_recorded
from smss.sim.trace import Trace, peak_concurrency, read_trace
from smss.spec import Resources
from smss.testing.server import running_server

#: The live controller's tick (ServingSettings.tick_s), for the simulator beside it.
LIVE_TICK_S = 0.2
#: Seconds between two looks at the platform while replaying with ``plot``.
SAMPLE_S = 1.0

MODEL_SOURCE = '''\
"""A synthetic function for trace replay: spends the requested wall time (WORK)."""

import time

import numpy as np

import smss


@smss.model(
    name="replay",
    inputs={"ms": ("FP32", [-1, 1])},
    outputs={"ok": ("FP32", [-1, 1])},
    concurrency=1,
    max_instances=MAX_INSTANCES,
    cpu=CPU_SHARE,
    memory=MEMORY_MB,
)
class Busy:
    def load(self, weights):
        pass

    def predict(self, inputs):
        ms = inputs["ms"]
        end = time.perf_counter() + float(ms.sum()) / 1000.0
        if "WORK" == "sleep":
            time.sleep(max(end - time.perf_counter(), 0.0))
        while time.perf_counter() < end:
            pass
        return {"ok": np.ones((ms.shape[0], 1), np.float32)}
'''


@dataclasses.dataclass
class _Result:
    latency_s: float = math.nan
    cold: bool = False  # it waited for its instance to start (the platform says)
    error: str | None = None


def _body(ms: float) -> bytes:
    return msgspec.json.encode(
        {"inputs": [{"name": "ms", "datatype": "FP32", "shape": [1, 1], "data": [ms]}]}
    )


async def _send(http: httpx.AsyncClient, name: str, body: bytes, out: _Result) -> None:
    t0 = time.perf_counter()
    try:
        response = await http.post(f"/v2/models/{name}/infer", content=body)
    except httpx.HTTPError as e:
        out.error = type(e).__name__
        return
    out.latency_s = time.perf_counter() - t0
    if response.status_code != 200:
        out.error = f"HTTP {response.status_code}"
        return
    out.cold = response.headers.get(COLD_START) == "1"


async def _replay(
    url: str, trace: Trace, speedup: float, progress: Progress, sample_s: float | None
) -> tuple[list[_Result], float, list[Sample]]:
    """Send every row at its scaled time (open loop); the results, the replay's period in
    seconds (start to last answer), and (``sample_s``) what the platform showed every so often."""
    names = [trace.functions[i] for i in trace.function.tolist()]
    at = (trace.t_ms / (1000.0 * speedup)).tolist()
    ms = (trace.duration_ms / speedup).tolist()
    results = [_Result() for _ in at]
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    progress.phase(f"replaying {len(at)} requests", len(at))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300.0) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = asyncio.Event()
        async with asyncio.TaskGroup() as outer:
            if sample_s is not None:
                outer.create_task(_sampler(http, lambda: loop.time() - start, done, samples, sample_s))
            async with asyncio.TaskGroup() as group:
                for k, t in enumerate(at):
                    delay = start + t - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    group.create_task(_send(http, names[k], _body(ms[k]), results[k]))
                    if k % 16 == 0:
                        progress.advance(k)
            progress.advance(len(at))
            period = loop.time() - start
            done.set()
    return results, period, samples


async def _sampler(
    http: httpx.AsyncClient, now: Callable[[], float], done: asyncio.Event, out: list[Sample], every_s: float
) -> None:
    """Look at the platform every ``every_s`` until ``done``: functions, devices, weights, cost."""
    while not done.is_set():
        t = now()
        try:
            bodies = [
                (await http.get(path)).json()
                for path in ("/v1/functions", "/v1/devices", "/v1/weights", "/v1/cost")
            ]
        except httpx.HTTPError:
            bodies = []  # a look that failed is left out; the replay goes on
        if bodies:
            functions, devices, weights, cost = bodies
            out.append(Sample(t, functions["functions"], devices["devices"], weights, cost))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)


SIM_TIER_KEYS = ("starts_from_standby", "starts_from_resident", "starts_from_disk", "starts_from_no_runtime")
#: Tiers whose start builds the function's template (see StartTimings.tier).
TEMPLATE_TIERS = ("resident", "cold", "no_runtime")


def _starts(metrics: str, tiers: tuple[str, ...] | None = None) -> tuple[float, int]:
    """Mean duration in ms and count of the instance starts from ``tiers`` (None:
    all), from ``smss_start_seconds`` in /metrics."""
    total = count = 0.0
    pattern = r'^smss_start_seconds_(sum|count)\{[^}]*tier="([a-z_]+)"[^}]*\} ([0-9.eE+-]+)$'
    for kind, tier, value in re.findall(pattern, metrics, flags=re.MULTILINE):
        if tiers is not None and tier not in tiers:
            continue
        if kind == "sum":
            total += float(value)
        else:
            count += float(value)
    return (1000.0 * total / count if count else 0.0), int(count)


def _deploy(client: Client, source: Path, functions: tuple[str, ...]) -> None:
    _, cls = load_class(f"{source}:Busy")
    pkg = package_class(source, cls, None)
    for name in functions:
        spec = msgspec.structs.replace(pkg.spec, name=name)
        client.deploy_package(dataclasses.replace(pkg, spec=spec))


def _figures(
    trace: Trace,
    speedup: float,
    results: list[_Result],
    period_s: float,
    starts: dict[str, float],
    cost: dict[str, Any],
    functions: list[dict[str, Any]],
    prices: PriceTable,
    memory_mb: int,
    cpu: float,
) -> dict[str, object]:
    ok = [r for r in results if r.error is None]
    cold = [r for r in ok if r.cold]
    duration_s = trace.duration_ms / (1000.0 * speedup)
    added = np.asarray(
        [
            (r.latency_s - d) * 1000.0
            for r, d in zip(results, duration_s.tolist(), strict=True)
            if r.error is None
        ]
    )
    p50, p99 = (float(x) for x in np.percentile(added, [50, 99])) if len(added) else (0.0, 0.0)
    cold_ids = {id(r) for r in cold}
    cold_added: list[float] = []
    warm_added: list[float] = []
    for r, d in zip(results, duration_s.tolist(), strict=True):
        if r.error is None:
            (cold_added if id(r) in cold_ids else warm_added).append((r.latency_s - d) * 1000.0)
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    total = cost["total"]
    # the simulator's containers: the instance's declared size, concurrency 1
    per_container_s = ContainerSize(Resources(cpu=cpu, memory_mb=memory_mb)).usd_per_second(prices)
    containers = int(peak_concurrency(trace).sum())
    container_cost = containers * period_s * per_container_s
    n = len(trace)
    return {
        "invocations": n,
        "answered": len(ok),
        "errors": sum(errors.values()),
        "errors_by_reason": errors,
        "cold_starts": len(cold),
        "cold_start_pct": round(100.0 * len(cold) / n, 4) if n else 0.0,
        "instance_starts": sum(int(f["cold_starts"]) for f in functions),
        "instance_seconds": round(total["alive_s"], 3),
        "idle_instance_seconds": round(total["alive_s"] - total["busy_s"], 3),
        "memory_gb_seconds": round(total["memory_gb_s"], 3),
        "cost_usd": round(total["cost_usd"], 6),
        "container_cost_usd": round(container_cost, 6),
        "cost_ratio": round(total["cost_usd"] / container_cost, 4) if container_cost > 0 else None,
        "containers": containers,
        "platform_cost_ratio": None if total["cost_ratio"] is None else round(total["cost_ratio"], 4),
        "metered_invocations": total["invocations"],
        "p50_added_ms": round(p50, 3),
        "p99_added_ms": round(p99, 3),
        **{key: round(value, 3) if key.endswith("_ms") else int(value) for key, value in starts.items()},
        "functions_started": sum(1 for f in functions if int(f["cold_starts"]) > 0),
        "cold_added_p50_ms": round(float(np.median(cold_added)), 3) if cold_added else None,
        "warm_overhead_p50_ms": round(float(np.median(warm_added)), 3) if warm_added else 0.0,
        "period_s": round(period_s, 3),
    }


def _standby_gb_s(cost: dict[str, Any]) -> float:
    """What functions and runtimes held resident besides instances (not the platform)."""
    runtimes = sum(float(v) for k, v in cost.get("overhead", {}).items() if k.startswith("runtime:"))
    return float(cost["total"].get("standby_gb_s", 0.0)) + runtimes


def _live_profile(client: Client) -> tuple[TierProfile, dict[str, float]]:
    """The tier profile for the simulator beside the live run: the live policy's own
    (the defaults: both sides decide alike) with the footprints the live node showed at
    the end: its templates' own pages, each spare's, and the zygote's (PSS without
    shared segments, per template, per spare and in all)."""
    store = client.get("/v1/weights")["local"]
    templates = list(store["templates"].values())
    template_mb = [own_kb(t["pid"]) / 1024 for t in templates]
    spare_mb = [own_kb(c) / 1024 for t in templates for c in children(t["pid"])]
    zygotes = [own_kb(z["pid"]) / 1024 for z in store.get("zygotes", {}).values()]
    measured = {
        "template_mb": float(np.mean(template_mb)) if template_mb else 0.0,
        "spare_mb": float(np.mean(spare_mb)) if spare_mb else 0.0,
        "spares_per_template": len(spare_mb) / len(templates) if templates else 0.0,
        "runtime_mb": float(sum(zygotes)),
    }
    profile = dataclasses.replace(
        TierProfile(),
        standby_mb=measured["template_mb"] + measured["spare_mb"],
        spare_mb=measured["spare_mb"],
        weights_mb=0.0,  # the replay's functions have no weights
        runtime_mb=measured["runtime_mb"],
    )
    return profile, measured


def run(
    trace_path: Path,
    speedup: float = 10.0,
    policy: str = "tiered",
    memory_mb: int = 512,
    max_instances: int = 8,
    default_ttl_s: float = 600.0,
    cpu: float = 0.1,
    work: str = "sleep",
    latency_objective_ms: float = 10.0,
    *,
    progress: Progress = SILENT,
    plot: Path | None = None,
) -> dict[str, object]:
    """Replay ``trace_path`` live and in the simulator; one JSON-ready dict. ``plot``:
    also draw the live and simulated timelines there (:func:`smss.plots.timeline_figure`)."""
    if not (math.isfinite(speedup) and speedup > 0):
        raise InvalidSpec(f"speedup must be > 0, got {speedup}")
    if work not in ("sleep", "spin"):
        raise InvalidSpec(f"work must be 'sleep' or 'spin', got {work!r}")
    trace = read_trace(trace_path)
    live_policy, live_ttl = scale_policy(policy, default_ttl_s, 1.0 / speedup)
    prices = PriceTable()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smss-replay-") as tmp:
        data = Path(tmp)
        source = data / "replay_model.py"
        source.write_text(
            MODEL_SOURCE.replace("MAX_INSTANCES", str(max_instances))
            .replace("MEMORY_MB", str(memory_mb))
            .replace("CPU_SHARE", repr(float(cpu)))
            .replace("WORK", work)
        )
        args = ["--keep-alive-policy", live_policy, "--keep-alive", repr(live_ttl), "--log-level", "warning"]
        args += ["--latency-objective-ms", repr(latency_objective_ms)]
        progress.phase("starting the platform")
        with running_server(data / "platform", args) as server, Client(server.url) as client:
            progress.phase(f"deploying {len(trace.functions)} functions", len(trace.functions))
            _deploy(client, source, trace.functions)
            for k, name in enumerate(trace.functions):
                server.wait_for_model(name)
                progress.advance(k + 1)
            before = client.get("/v1/cost")
            sample_s = None if plot is None else SAMPLE_S
            results, period, samples = asyncio.run(_replay(server.url, trace, speedup, progress, sample_s))
            cost = client.get("/v1/cost")
            functions = client.functions()
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
            node = next(d for d in client.devices() if d["kind"] == "cpu")
            tier_ms = {t: _starts(metrics, (t,))[0] for t in ("standby", "resident", "cold", "no_runtime")}
            profile, measured = _live_profile(client)
    live_standby = _standby_gb_s(cost) - _standby_gb_s(before)
    tier_starts = {t: _starts(metrics, (t,))[1] for t in ("standby", "resident", "cold", "no_runtime")}
    start_ms, _ = _starts(metrics)
    fork_ms, _ = _starts(metrics, ("standby",))
    template_ms, template_starts = _starts(metrics, TEMPLATE_TIERS)
    starts = {
        "start_ms": start_ms,
        "fork_start_ms": fork_ms,
        "template_start_ms": template_ms,
        "template_starts": float(template_starts),
    }
    live = _figures(trace, speedup, results, period, starts, cost, functions, prices, memory_mb, cpu)
    config = SimConfig(
        policy=policy,
        default_ttl_s=default_ttl_s,
        memory_mb=memory_mb,
        concurrency=1,
        max_instances=max_instances,
        tiers=profile,
        latency_objective_ms=latency_objective_ms,
        tick_s=LIVE_TICK_S,
        speedup=speedup,
        prices=prices,
        cpu=cpu,
        # the live node's capacity: both sides place on the same cores and memory
        nodes=1,
        cpus_per_node=float(node["capacity"]["cpu"]),
        memory_per_node_mb=int(node["capacity"]["memory_mb"]),
    )
    progress.phase("simulating the same trace")
    sim, sim_timeline = simulate_recorded(trace, config)
    # The same with each request holding its instance for the platform's measured
    # per-request overhead too (HTTP, dispatch, IPC: the warm requests' median added
    # latency), which the trace's durations leave out: how much of a difference
    # between live and simulated figures that accounts for.
    overhead_ms = float(live["warm_overhead_p50_ms"])  # type: ignore[arg-type]
    held = dataclasses.replace(trace, duration_ms=trace.duration_ms + overhead_ms * speedup)
    sim_held = simulate(held, config)
    sim_cold = int(sim["cold_starts"])  # type: ignore[call-overload]
    sim_starts = int(sim["instances_started"])  # type: ignore[call-overload]
    live_cold = int(live["cold_starts"])  # type: ignore[call-overload]
    live_starts = int(live["instance_starts"])  # type: ignore[call-overload]
    if plot is not None:
        from smss import plots

        at = (trace.t_ms / (1000.0 * speedup)).tolist()
        cold_at = [t for t, r in zip(at, results, strict=True) if r.cold]
        container = float(live["container_cost_usd"])  # type: ignore[arg-type]
        timeline = from_samples(samples, cold_at, period, container)
        title = f"smss bench replay {trace_path.name} --policy {policy} --speedup {speedup:g}"
        plots.timeline_figure(plot, title, timeline, sim_timeline)
    return {
        "trace": str(trace_path),
        "policy": policy,
        "platform_policy": live_policy,
        "platform_keep_alive_s": live_ttl,
        "speedup": speedup,
        "memory_mb": memory_mb,
        "max_instances": max_instances,
        "cpu": cpu,
        "work": work,
        "node_capacity": node["capacity"],
        **live,
        "simulate": sim,
        "cold_starts_diff_pct": _diff_pct(live_cold, sim_cold),
        "instance_starts_diff_pct": _diff_pct(live_starts, sim_starts),
        "simulate_with_overhead": {
            key: sim_held[key] for key in ("cold_starts", "instances_started", "memory_gb_seconds")
        },
        "cold_starts_diff_with_overhead_pct": _diff_pct(live_cold, int(sim_held["cold_starts"])),  # type: ignore[call-overload]
        "standby_memory_gb_seconds": round(live_standby, 3),
        "simulated_standby_memory_gb_seconds": sim["standby_memory_gb_seconds"],
        "standby_memory_diff_pct": _diff_pct_f(live_standby, float(sim["standby_memory_gb_seconds"])),  # type: ignore[arg-type]
        "starts_from_standby": tier_starts["standby"],
        "starts_from_resident": tier_starts["resident"],
        "starts_from_disk": tier_starts["cold"],
        "starts_from_no_runtime": tier_starts["no_runtime"],
        "simulated_starts_by_tier": {
            key: sim[key]
            for key in (
                "starts_from_standby",
                "starts_from_resident",
                "starts_from_disk",
                "starts_from_no_runtime",
            )
        },
        "live_tiers": {
            **{k: round(v, 3) for k, v in measured.items()},
            **{f"{t}_start_ms": round(v, 3) for t, v in tier_ms.items()},
        },
        "wall_s": round(time.perf_counter() - started, 3),
    }


def _diff_pct(live: int, sim: int) -> float | None:
    return round(100.0 * (live - sim) / sim, 2) if sim else None


def _diff_pct_f(live: float, sim: float) -> float | None:
    return round(100.0 * (live - sim) / sim, 2) if sim else None
