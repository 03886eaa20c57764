"""``smss bench load``: open-loop load against ``mlp`` and the ``behavior`` workflow.

Starts ``smss serve --demo`` as a subprocess and drives each target from the
open-loop generator (:mod:`smss.bench.openloop`, its own process, pinned to the
machine's last core; the platform has every core, that one included: both are
named in the output), latencies corrected for coordinated omission:

1. **Saturation sweep.** Steps of ``step_s`` seconds at offered rates growing by
   1.5x from a first rate per target; a step is *healthy* when under 1% of its
   requests fail, its goodput is at least 95% of the offered rate and its p99 is
   under ``p99_limit_ms`` or 10x the first (lightly loaded) step's p99, whichever
   is lower (a queue that grows slowly shows in the p99 before the goodput). An
   unhealthy step is run once more at the same rate (a transient, such as a
   scale-up, is not the knee); the sweep ends at the second unhealthy step in a
   row, and ``knee_rps`` is the goodput of the last healthy one. The sweep
   goes on to 2x the knee (``past_knee``, after the steady phase) to show what
   overload does:
   ``goodput_past_knee_pct`` is the goodput at 2x the knee as a share of the knee.
2. **Steady state.** Once what the overloaded steps left queued has drained
   (``settled_after_s``), ``duration_s`` at 70% of the knee: ``p50_ms`` ... ``p999_ms``,
   ``error_rate``, and ``rss_growth_pct``: the largest RSS growth of any platform
   process alive from 10% into the phase to its end (every process is listed in
   ``rss_by_process``); the PSS of all of them together before and after; and where
   the gateway's time went (``queue_ms`` waiting for a slot, ``instance_ms`` sent
   to answered, of which ``batch_ms`` waiting in the instance for a batch,
   ``compute_ms`` in predict and ``transfer_ms`` the rest; what is left of the
   latency is HTTP and codec), means from ``smss_request_part_seconds``
   (models only: a workflow's stages are not split).

The two targets run one after another on one platform.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.bench.procs import growth_pct, platform_procs, shm_segments
from smss.testing.server import ServerProcess, running_server


def _body(name: str, shape: tuple[int, ...]) -> bytes:
    data = np.random.default_rng(0).standard_normal(int(np.prod(shape))).astype(np.float32)
    return msgspec.json.encode(
        {"inputs": [{"name": name, "datatype": "FP32", "shape": list(shape), "data": data.tolist()}]}
    )


#: target -> (route, body, first offered rate, sessions for the generator)
TARGETS: dict[str, tuple[str, bytes, float, int]] = {
    "mlp": ("/v2/models/mlp/infer", _body("x", (1, 64)), 50.0, 0),
    "behavior": ("/v2/models/behavior/infer", _body("frame", (1, 3, 64, 64)), 5.0, 64),
}


def _generator_core() -> int:
    return max(os.sched_getaffinity(0))


def _open_loop(url: str, target: str, rate: float, seconds: float, work: Path) -> dict[str, Any]:
    route, body, _, sessions = TARGETS[target]
    body_file = work / f"{target}.json"
    if not body_file.exists():
        body_file.write_bytes(body)
    core = _generator_core()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smss.bench.openloop",
            url,
            route,
            str(body_file),
            repr(rate),
            repr(seconds),
            "512",
            str(sessions),
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 120,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )
    result: dict[str, Any] = msgspec.json.decode(out.stdout)
    return result


def _healthy(step: dict[str, Any], p99_limit_ms: float) -> bool:
    p99 = step["p99_ms"]
    return bool(
        step["error_rate"] < 0.01
        and step["goodput_rps"] >= 0.95 * step["offered_rps"]
        and p99 is not None
        and p99 < p99_limit_ms
    )


PARTS = ("queue", "instance", "batch", "compute", "transfer")


def _parts(metrics: str, function: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for part in PARTS:
        values = {}
        for kind in ("sum", "count"):
            m = re.search(
                rf'^smss_request_part_seconds_{kind}\{{function="{function}",part="{part}"\}} ([0-9.eE+-]+)$',
                metrics,
                flags=re.MULTILINE,
            )
            values[kind] = float(m.group(1)) if m else 0.0
        out[part] = (values["sum"], values["count"])
    return out


def _split(before: str, after: str, function: str) -> dict[str, float | None]:
    b, a = _parts(before, function), _parts(after, function)
    out: dict[str, float | None] = {}
    for part in PARTS:
        n = a[part][1] - b[part][1]
        out[f"{part}_ms"] = round(1000.0 * (a[part][0] - b[part][0]) / n, 3) if n > 0 else None
    return out


def _steady(server: ServerProcess, target: str, rate: float, seconds: float, work: Path) -> dict[str, Any]:
    metrics_before = httpx.get(f"{server.url}/metrics", timeout=30).text
    result: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: result.update(_open_loop(server.url, target, rate, seconds, work))
    )
    runner.start()
    time.sleep(seconds * 0.1)  # past the warm-up of the phase's first instances
    procs_before = platform_procs(server.process.pid)
    runner.join()
    procs_after = platform_procs(server.process.pid)
    metrics_after = httpx.get(f"{server.url}/metrics", timeout=30).text
    rows = growth_pct(procs_before, procs_after)
    split = _split(metrics_before, metrics_after, target) if target in ("mlp",) else {}
    return {
        **result,
        "rss_growth_pct": rows[0]["rss_growth_pct"] if rows else None,
        "pss_mb_before": round(sum(p.pss_kb for p in procs_before) / 1024, 1),
        "pss_mb_after": round(sum(p.pss_kb for p in procs_after) / 1024, 1),
        "processes": len(procs_after),
        "shm_segments": shm_segments(server.data_dir),
        **split,
        "rss_by_process": rows,
    }


def _settle(server: ServerProcess, target: str, light_p50_ms: float, limit_s: float = 120.0) -> float:
    """Wait until a lone request is answered within 3x the light-load p50 (whatever
    an overloaded step left queued has drained); the seconds it took."""
    route, body, _, sessions = TARGETS[target]
    headers = {"Content-Type": "application/json"}
    if sessions:
        headers["SMSS-Session"] = "settle"
    started = time.perf_counter()
    with httpx.Client(base_url=server.url, timeout=60.0, headers=headers) as http:
        while time.perf_counter() - started < limit_s:
            t0 = time.perf_counter()
            ok = http.post(route, content=body).status_code == 200
            if ok and (time.perf_counter() - t0) * 1000.0 < 3.0 * light_p50_ms:
                break
            time.sleep(0.5)
    return round(time.perf_counter() - started, 1)


def _target(
    server: ServerProcess,
    target: str,
    work: Path,
    step_s: float,
    duration_s: float,
    p99_limit_ms: float,
    max_steps: int,
) -> dict[str, Any]:
    _, _, rate, _ = TARGETS[target]
    _open_loop(server.url, target, rate, 3.0, work)  # cold start and warm-up, not reported
    sweep: list[dict[str, Any]] = []
    knee: dict[str, Any] | None = None
    retried = False
    limit_ms = p99_limit_ms
    for k in range(max_steps):
        step = _open_loop(server.url, target, rate, step_s, work)
        if k == 0 and step["p99_ms"] is not None:
            # a latency knee: past 10x the p99 of light load, the queue is growing
            limit_ms = min(p99_limit_ms, 10.0 * float(step["p99_ms"]))
        step["healthy"] = _healthy(step, limit_ms)
        sweep.append(step)
        if not step["healthy"]:
            if retried:
                break
            retried = True  # once more at the same rate: a transient (a scale-up) or the knee
            continue
        knee, retried = step, False
        rate *= 1.5
    knee_rps = float(knee["goodput_rps"]) if knee is not None else 0.0
    steady: dict[str, Any] | None = None
    past: list[dict[str, Any]] = []
    if knee is not None:
        # the overloaded steps' backlog drained first: the steady phase starts clean
        settled_s = _settle(server, target, float(sweep[0]["p50_ms"] or 10.0))
        steady = {
            "rate_rps": round(0.7 * knee_rps, 2),
            "settled_after_s": settled_s,
            **_steady(server, target, 0.7 * knee_rps, duration_s, work),
        }
        for factor in (1.5, 2.0):
            step = _open_loop(server.url, target, knee_rps * factor, step_s, work)
            step["healthy"] = _healthy(step, limit_ms)
            step["factor_of_knee"] = factor
            past.append(step)
    summary = (
        "rate_rps",
        "offered_rps",
        "goodput_rps",
        "error_rate",
        "p50_ms",
        "p99_ms",
        "statuses",
        "healthy",
    )
    out: dict[str, Any] = {
        "target": target,
        "knee_rps": round(knee_rps, 2),
        "p99_limit_ms": round(limit_ms, 3),
        "sweep": [{k: s[k] for k in summary} for s in sweep],
        "past_knee": [{"factor_of_knee": s["factor_of_knee"], **{k: s[k] for k in summary}} for s in past],
        "goodput_past_knee_pct": (
            round(100.0 * float(past[-1]["goodput_rps"]) / knee_rps, 1) if past and knee_rps else None
        ),
    }
    out["steady"] = steady
    if steady is None:
        out["note"] = f"no healthy step at {TARGETS[target][2]} req/s: no knee, no steady phase"
    return out


def run(
    duration_s: float = 120.0,
    step_s: float = 15.0,
    targets: tuple[str, ...] = ("mlp", "behavior"),
    p99_limit_ms: float = 500.0,
    max_steps: int = 14,
) -> dict[str, object]:
    """The whole benchmark; one JSON-ready dict."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smss-load-") as tmp:
        work = Path(tmp)
        with running_server(work / "platform", ["--demo", "--log-level", "warning"]) as server:
            for target in targets:
                server.wait_for_model(target)
            results = [
                _target(server, target, work, step_s, duration_s, p99_limit_ms, max_steps)
                for target in targets
            ]
    return {
        "cores": {"machine": os.cpu_count(), "generator": [_generator_core()], "platform": "all"},
        "step_s": step_s,
        "duration_s": duration_s,
        "p99_limit_ms": p99_limit_ms,
        "targets": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
