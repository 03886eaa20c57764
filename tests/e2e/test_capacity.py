"""Placement on the real node: under a 32-client ``mlp`` load the declared cpu placed on
the node never exceeds its capacity, and ``smss devices --json`` reports the CPU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from smss.testing.server import ServerProcess

pytestmark = pytest.mark.slow

CLIENTS = 32
LOAD_S = 4.0


def _body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.01] * 64}]}


async def _load(url: str) -> tuple[int, list[dict[str, Any]]]:
    samples: list[dict[str, Any]] = []
    ok = 0
    end = time.monotonic() + LOAD_S
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            nonlocal ok
            while time.monotonic() < end:
                r = await client.post("/v2/models/mlp/infer", json=_body())
                assert r.status_code == 200, r.text
                ok += 1

        async def sampler() -> None:
            while time.monotonic() < end:
                r = await client.get("/v1/devices")
                assert r.status_code == 200
                samples.append(next(d for d in r.json()["devices"] if d["kind"] == "cpu"))
                await asyncio.sleep(0.05)

        await asyncio.gather(sampler(), *(worker() for _ in range(CLIENTS)))
    return ok, samples


def test_mlp_load_never_places_more_cpu_than_the_node_has(demo_server: ServerProcess) -> None:
    ok, samples = asyncio.run(_load(demo_server.url))
    assert ok > 0
    assert samples
    for cpu in samples:
        assert cpu["allocated"]["cpu"] <= cpu["capacity"]["cpu"] + 1e-9, cpu
        assert cpu["allocated"]["memory_mb"] <= cpu["capacity"]["memory_mb"], cpu
        placed = [p for p in cpu["placed"] if p["kind"] == "instance"]
        assert sum(p["cpu"]["cpu"] for p in placed) == pytest.approx(cpu["allocated"]["cpu"])
    assert any(p["function"] == "mlp" for cpu in samples for p in cpu["placed"] if p["kind"] == "instance")


def test_devices_json_reports_the_cpu(demo_server: ServerProcess) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "smss.cli", "devices", "--json", "--url", demo_server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    devices = json.loads(done.stdout)
    cpu = next(d for d in devices if d["kind"] == "cpu")
    assert cpu["index"] == 0
    assert cpu["capacity"]["cpu"] > 0
    assert cpu["capacity"]["memory_mb"] > 0
    resident = {p["kind"] for p in cpu["placed"]}
    assert "weights" in resident  # the demo models' weights are placed and counted
