"""A live platform's cost report matches what it metered: one real ``smss serve``
(keep-alive 1 s), a tiny python model, a few requests, scale to zero, then
``GET /v1/cost`` and ``smss cost --json`` checked against the requests sent, the
instance lifetime observed from outside and the price table applied by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smss.client import Client
from smss.packaging import load_class, package_class
from smss.testing.server import ServerProcess, running_server

pytestmark = pytest.mark.slow

REQUESTS = 12
SLEEP_MS = 20.0
MEMORY_MB = 256
CPU = 0.5

MODEL = f"""
import time

import numpy as np

import smss


@smss.model(
    name="tiny",
    inputs={{"x": ("FP32", [-1, 1])}},
    outputs={{"y": ("FP32", [-1, 1])}},
    concurrency=1,
    max_instances=2,
    cpu={CPU},
    memory={MEMORY_MB},
)
class Tiny:
    def load(self, weights):
        pass

    def predict(self, inputs):
        time.sleep({SLEEP_MS / 1000})
        return {{"y": inputs["x"] * 2}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data", ["--keep-alive", "1", "--log-level", "warning"]) as s:
        yield s


def _wait(cond: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        time.sleep(0.05)


def _priced(usage: dict[str, Any], prices: dict[str, float]) -> float:
    return (
        usage["cpu_s"] * prices["usd_per_vcpu_second"]
        + usage["memory_gb_s"] * prices["usd_per_gb_second"]
        + usage["gpu_s"] * prices["usd_per_gpu_second"]
        + usage["invocations"] / 1e6 * prices["usd_per_million_requests"]
        + usage["standby_gb_s"] * prices["usd_per_gb_second"]
        + usage["standby_cpu_s"] * prices["usd_per_vcpu_second"]
    )


def test_cost_report_matches_the_metered_usage(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "tiny.py"
    source.write_text(MODEL)
    _, cls = load_class(f"{source}:Tiny")
    with Client(server.url) as client:
        client.deploy_package(package_class(source, cls, None))
        server.wait_for_model("tiny")
        assert client.get("/v1/cost")["total"]["invocations"] == 0  # nothing metered yet

        def instances() -> int:
            (fn,) = [f for f in client.functions() if f["name"] == "tiny"]
            return len(fn["instances"]) + int(fn["starting"])

        first_sent = time.monotonic()
        for k in range(REQUESTS):
            out = client.infer("tiny", {"x": np.array([[float(k)]], dtype=np.float32)})
            assert float(out["y"][0][0]) == 2.0 * k
        last_answer = time.monotonic()
        assert instances() >= 1
        _wait(lambda: instances() == 0)  # the 1 s keep-alive scaled it to zero
        gone_by = time.monotonic()
        report = client.get("/v1/cost")

    cli = subprocess.run(
        [sys.executable, "-m", "smss.cli", "cost", "--json", "--url", server.url],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    from_cli = json.loads(cli.stdout)

    for rep in (report, from_cli):
        fn = rep["functions"]["tiny"]
        total = rep["total"]
        assert fn["invocations"] == total["invocations"] == REQUESTS
        # Busy: at least the model's sleeps; alive: more than busy (starts, gaps, the
        # keep-alive), and at most the time from the first request to the instance
        # being seen gone (metering starts when the instance is ready).
        assert fn["busy_s"] >= REQUESTS * SLEEP_MS / 1000 * 0.9
        assert fn["alive_s"] > fn["busy_s"] > 0
        assert fn["alive_s"] >= 1.0  # the last instance idled its keep-alive first
        assert fn["alive_s"] <= (gone_by - first_sent) + 1.0
        assert fn["busy_s"] <= (last_answer - first_sent) + 0.5
        # Resource-seconds are alive seconds times the declaration.
        assert fn["cpu_s"] == pytest.approx(fn["alive_s"] * CPU, rel=1e-6)
        assert fn["memory_gb_s"] == pytest.approx(fn["alive_s"] * MEMORY_MB / 1024, rel=1e-6)
        assert fn["gpu_s"] == 0
        # Money: the price table applied to the usage, recomputed here.
        prices = rep["prices"]
        assert fn["cost_usd"] == pytest.approx(_priced(fn, prices), rel=1e-9)
        assert total["cost_usd"] == pytest.approx(fn["cost_usd"], rel=1e-9)
        parts = fn["cpu_usd"] + fn["memory_usd"] + fn["gpu_usd"] + fn["request_usd"] + fn["standby_usd"]
        assert parts == pytest.approx(fn["cost_usd"], rel=1e-9)
        assert fn["instance_usd"] == pytest.approx(fn["cpu_usd"] + fn["memory_usd"] + fn["gpu_usd"], rel=1e-9)
        # Always-on baseline: ceil(peak / concurrency) containers for the whole period.
        assert fn["peak_concurrency"] == 1  # requests were sent one at a time
        assert fn["containers"] == math.ceil(fn["peak_concurrency"] / 1) == 1
        per_second = CPU * prices["usd_per_vcpu_second"] + MEMORY_MB / 1024 * prices["usd_per_gb_second"]
        assert fn["container_cost_usd"] == pytest.approx(rep["period_s"] * per_second, rel=1e-6)
        assert fn["cost_ratio"] == pytest.approx(fn["cost_usd"] / fn["container_cost_usd"], rel=1e-9)
    # Scaled to zero: instance usage no longer grows between the two reads; the period
    # does, and so may what is kept resident for it (standby: tests/integration/test_tiers_live.py).
    for key in ("invocations", "alive_s", "busy_s", "memory_gb_s", "instance_usd"):
        assert from_cli["total"][key] == pytest.approx(report["total"][key], rel=1e-9)
    assert from_cli["total"]["standby_gb_s"] >= report["total"]["standby_gb_s"]
    assert from_cli["period_s"] >= report["period_s"]
