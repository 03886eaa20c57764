"""``smss bench workflow --json``: the fields its issue names, from a real run (few
runs; the figures themselves are for the benchmark, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_workflow_bench_prints_every_field_and_recovers_all_100_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "smss.cli", "bench", "workflow", "--json", "--runs", "16"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for mode in ("sequential", "concurrent_16"):
        for path in ("log", "direct"):
            row = result[mode][path]
            assert row["runs"] > 0
            assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert result["sequential"]["log"]["runs"] == 16
    assert result["concurrent_16"]["log"]["runs"] == 32
    assert {"log_overhead_ms_per_stage", "overhead_pct"} <= result.keys()
    assert result["fsyncs_per_run"] > 0  # durable runs commit
    assert result["submitted"] == result["interrupted"] == 100
    assert result["unfinished_after"] == 0
    assert 0 < result["resumed_s"] <= result["recovery_s"]
