"""The simulator on tiny synthetic traces: cold starts, keep-alive, bounds, determinism."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from smss.sim.cli import main
from smss.sim.config import SimConfig
from smss.sim.simulator import Simulation, simulate
from smss.sim.trace import Trace

FIELDS = {
    "invocations",
    "cold_starts",
    "cold_start_pct",
    "instance_seconds",
    "idle_instance_seconds",
    "memory_gb_seconds",
    "cost_usd",
    "container_cost_usd",
    "cost_ratio",
    "p50_added_ms",
    "p99_added_ms",
    "policy",
    "wall_s",
    "invocations_per_min_wall",
}


def periodic(period_s: float, n: int, duration_ms: float = 100.0, jitter_s: float = 0.0) -> Trace:
    rng = random.Random(1)
    times = [1.0 + i * period_s + rng.uniform(-jitter_s, jitter_s) for i in range(n)]
    return Trace.from_rows((t * 1000.0, "f", duration_ms) for t in times)


def run(trace: Trace, **config: object) -> dict[str, object]:
    """One simulation; every start takes 500 ms unless told otherwise (the figures
    these tests check predate the tiers' calibrated starts)."""
    config.setdefault("cold_start_ms", 500.0)
    return Simulation(trace, SimConfig(**config)).run()  # type: ignore[arg-type]


def test_one_request_is_one_cold_start() -> None:
    out = run(Trace.from_rows([(1000.0, "f", 200.0)]), policy="fixed:600", cold_start_ms=500.0)
    assert out["invocations"] == 1
    assert out["cold_starts"] == 1
    assert out["cold_start_pct"] == 100.0
    assert out["p99_added_ms"] == pytest.approx(500.0)
    # Alive from the start request (t=1 s) until the request ends (t=1.7 s): the run's end.
    assert out["instance_seconds"] == pytest.approx(0.7)
    assert out["idle_instance_seconds"] == pytest.approx(0.5)
    assert out["memory_gb_seconds"] == pytest.approx(0.7 * 0.5)


def test_fixed_ttl_longer_than_the_period_starts_once() -> None:
    out = run(periodic(60.0, 30), policy="fixed:600")
    assert out["cold_starts"] == 1
    assert out["instances_started"] == 1


def test_fixed_ttl_shorter_than_the_period_starts_every_time() -> None:
    out = run(periodic(60.0, 30), policy="fixed:10")
    assert out["cold_starts"] == 30
    assert out["p50_added_ms"] == pytest.approx(500.0)
    # Each instance lives the cold start, the request, then 10 s idle.
    assert out["instance_seconds"] == pytest.approx(29 * 10.6 + 0.6, rel=1e-6)


@pytest.mark.parametrize("period", [8.0, 60.0, 300.0])
def test_hybrid_never_does_worse_than_fixed_on_a_learned_periodic_trace(period: float) -> None:
    trace = periodic(period, 120, jitter_s=0.2)
    fixed = run(trace, policy="fixed:600")
    hybrid = run(trace, policy="hybrid")
    assert hybrid["cold_starts"] <= fixed["cold_starts"]
    assert hybrid["memory_gb_seconds"] <= fixed["memory_gb_seconds"]  # type: ignore[operator]
    if period >= 60:  # learned, it pre-warms instead of idling
        assert hybrid["prewarm_starts"] > 0  # type: ignore[operator]
        assert hybrid["memory_gb_seconds"] < 0.5 * fixed["memory_gb_seconds"]  # type: ignore[operator]


def test_burst_respects_max_instances() -> None:
    trace = Trace.from_rows([(1000.0, "f", 1000.0)] * 200)
    sim = Simulation(
        trace, SimConfig(policy="fixed:600", concurrency=1, max_instances=4, cold_start_ms=500.0)
    )
    out = sim.run()
    usage = sim.meter.usage(float(out["period_s"]))["f"]  # type: ignore[arg-type]
    assert usage.peak_instances <= 4
    assert usage.peak_concurrency <= 4
    assert out["invocations"] == 200
    assert out["cold_starts"] == 4  # the rest waited for a busy instance
    # 50 rounds of 1 s after a 0.5 s start: the last request waited 49.5 s.
    assert out["period_s"] == pytest.approx(1.0 + 0.5 + 50.0)


def test_concurrency_lets_one_instance_serve_several() -> None:
    trace = Trace.from_rows([(1000.0 + 1000.0 * i, "f", 5000.0) for i in range(4)])
    out = run(trace, policy="fixed:600", concurrency=8)
    assert out["instances_started"] == 1
    assert out["cold_starts"] == 1
    # Requests that arrive while an instance starts all wait for it: each is a cold start.
    trace = Trace.from_rows([(1000.0 + i, "f", 5000.0) for i in range(4)])
    assert run(trace, policy="fixed:600", concurrency=8)["cold_starts"] == 4


def test_functions_are_scaled_separately() -> None:
    trace = Trace.from_rows([(1000.0, "a", 10.0), (1000.0, "b", 10.0), (70_000.0, "a", 10.0)])
    out = run(trace, policy="fixed:60")
    assert out["functions"] == 2
    assert out["cold_starts"] == 3  # a's instance expired at 61 s


def test_the_simulator_is_deterministic() -> None:
    rng = random.Random(3)
    rows, t = [], 0.0
    for _ in range(3000):
        t += rng.expovariate(5.0)
        rows.append((t * 1000.0, f"f{rng.randrange(8)}", rng.lognormvariate(5, 1.5)))
    trace = Trace.from_rows(rows)
    for policy in ("hybrid", "fixed:30"):
        first, second = run(trace, policy=policy), run(trace, policy=policy)
        assert first == second
    assert run(trace, policy="hybrid", seed=1)["invocations"] == 3000


def test_simulate_reads_a_file_and_reports_every_field(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t_ms,function,duration_ms,cluster\n0,f,10,0\n500,f,10,0\n90000,g,10,1\n")
    out = simulate(path, SimConfig(policy="fixed:60", cold_start_ms=500.0))
    assert set(out) >= FIELDS
    assert out["invocations"] == 3
    assert out["cold_starts"] == 2
    assert 0 < out["cost_ratio"] < 1  # type: ignore[operator]
    json.dumps(out)


def test_main_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t_ms,function,duration_ms\n0,f,10\n")
    argv = [str(path), "--policy", "fixed:600", "--memory-mb", "1024", "--cold-start-ms", "100", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= FIELDS
    assert out["p99_added_ms"] == pytest.approx(100.0)
    assert out["memory_gb_seconds"] == pytest.approx(0.11)


def test_main_reports_bad_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time,function,duration_ms\n0,f,10\n")
    assert main([str(path), "--json"]) == 2
    assert "lacks column(s) t_ms" in capsys.readouterr().err
    assert main([str(path), "--policy", "lru"]) == 2


def test_speedup_divides_trace_times_and_the_policy_windows() -> None:
    """fixed:10 on a 60 s period starts every time; 10x faster it is fixed:1 on a 6 s
    period: the same decisions, every duration a tenth (with a start a tenth too)."""
    trace = periodic(60.0, 30)
    slow = run(trace, policy="fixed:10", cold_start_ms=500.0)
    fast = run(trace, policy="fixed:10", cold_start_ms=50.0, speedup=10.0)
    assert fast["speedup"] == 10.0
    assert fast["cold_starts"] == slow["cold_starts"] == 30
    for key in ("instance_seconds", "idle_instance_seconds", "period_s"):
        assert fast[key] == pytest.approx(slow[key] / 10, rel=1e-6)  # type: ignore[operator]
    assert fast["p99_added_ms"] == pytest.approx(50.0)


def test_speedup_scales_the_hybrid_policy_too() -> None:
    trace = periodic(60.0, 120, jitter_s=0.2)
    slow = run(trace, policy="hybrid", cold_start_ms=500.0)
    fast = run(trace, policy="hybrid", cold_start_ms=50.0, speedup=10.0)
    assert slow["prewarm_starts"] > 0  # type: ignore[operator]
    for key in ("cold_starts", "prewarm_starts", "instances_started"):
        assert fast[key] == slow[key]


def test_main_takes_a_speedup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t_ms,function,duration_ms\n0,f,100\n")
    assert main([str(path), "--speedup", "4", "--cold-start-ms", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speedup"] == 4.0
    assert out["instance_seconds"] == pytest.approx(0.035)  # 10 ms start + 25 ms request
    assert main([str(path), "--speedup", "0"]) == 2


def test_a_functions_first_start_builds_its_template_and_later_starts_fork() -> None:
    # Two requests 100 s apart with a 10 s keep-alive: two starts of one function.
    trace = Trace.from_rows([(1000.0, "f", 100.0), (101_000.0, "f", 100.0)])
    out = run(trace, policy="fixed:10", cold_start_ms=5.0, first_start_ms=800.0)
    assert out["instances_started"] == 2
    assert out["template_builds"] == 1
    assert out["cold_starts"] == 2
    # The first waited for the template and the fork (800 ms), the second for a fork.
    assert out["p99_added_ms"] == pytest.approx(800.0, abs=10.0)
    assert out["p50_added_ms"] == pytest.approx(402.5, abs=5.0)  # the mean of 800 and 5


def test_starts_asked_for_while_the_template_builds_wait_for_it() -> None:
    # Three concurrent requests: three starts, one template, all ready together.
    trace = Trace.from_rows([(1000.0, "f", 2000.0)] * 3)
    out = run(trace, policy="fixed:600", cold_start_ms=5.0, first_start_ms=800.0, max_instances=3)
    assert out["instances_started"] == 3
    assert out["template_builds"] == 1
    assert out["cold_starts"] == 3
    assert out["p50_added_ms"] == pytest.approx(800.0, abs=1.0)
    assert out["p99_added_ms"] == pytest.approx(800.0, abs=1.0)


def test_without_first_start_ms_every_start_takes_cold_start_ms() -> None:
    trace = Trace.from_rows([(1000.0, "f", 100.0), (101_000.0, "f", 100.0)])
    out = run(trace, policy="fixed:10", cold_start_ms=300.0)
    assert out["p50_added_ms"] == pytest.approx(300.0)
    assert out["p99_added_ms"] == pytest.approx(300.0)
