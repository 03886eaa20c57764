"""SMSS on a Ray multi-node test cluster: gateways on every node, placement across nodes,
locality and proximity in routing, nodes joining and dying under load.

One cluster for the module (see conftest.py); the tests run in order and the last one
removes what it added. Inference goes through ``tritonclient.http`` on each node's
gateway; a model answers with its process id, which names the instance (and node)
that served it.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from cluster_kit import FAR_DELAY_MS, RayPlatform, deploy

pytestmark = pytest.mark.timeout(240)


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def _function(platform: RayPlatform, name: str) -> dict[str, Any]:
    got: dict[str, Any] = httpx.get(f"{platform.gateway('a')}/v1/functions/{name}", timeout=10).json()
    return got


def _pids_by_role(platform: RayPlatform, name: str) -> dict[int, str]:
    return {i["pid"]: platform.role_of(i["node"]) for i in _function(platform, name)["instances"]}


def _infer(url: str, name: str, x: np.ndarray, timeout_s: float = 20.0) -> dict[str, np.ndarray]:
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=timeout_s)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer(name, [tensor])
        return {"y": result.as_numpy("y"), "pid": result.as_numpy("pid")}
    finally:
        client.close()


def _served_on(platform: RayPlatform, role: str, name: str, x: np.ndarray) -> str:
    pid = int(_infer(platform.gateway(role), name, x)["pid"][0])
    return _pids_by_role(platform, name)[pid]


FAST = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def spread(platform: RayPlatform) -> Iterator[str]:
    """A function of two instances of 0.6 cores: one fits on each one-core node (b, c),
    none on the head (no cores)."""
    deploy(platform, "spread", cpu=0.6, min_instances=2, max_instances=2)
    _wait(lambda: len(_function(platform, "spread")["instances"]) == 2, 90, "two instances of spread")
    return "spread"


def test_every_gateway_serves_and_instances_spread_over_the_nodes(platform: RayPlatform, spread: str) -> None:
    roles = sorted(platform.role_of(i["node"]) for i in _function(platform, spread)["instances"])
    assert roles == ["b", "c"]  # never two on one core, none on the head
    for role in ("a", "b", "c"):
        out = _infer(platform.gateway(role), spread, np.full((2, 4), 0.5, np.float32))
        np.testing.assert_allclose(out["y"], np.tile([0.5, 1.0, 1.5, 2.0], (2, 1)))
    devices = httpx.get(f"{platform.gateway('b')}/v1/devices", timeout=10).json()["devices"]
    placed = {
        platform.role_of(d["node"]): [p["function"] for p in d["placed"] if p["kind"] == "instance"]
        for d in devices
        if d["kind"] == "cpu"
    }
    assert placed["a"] == []
    assert placed["b"] == ["spread"]
    assert placed["c"] == ["spread"]


def test_the_distance_matrix_shows_the_far_node(platform: RayPlatform) -> None:
    a, b, c = (platform.nodes[r] for r in "abc")

    def measured() -> dict[str, Any] | None:
        """The matrix once every pair is measured and c is the far one (an EWMA of a few
        probes: one slow sample on a loaded machine may hide it for a moment)."""
        cluster: dict[str, Any] = httpx.get(f"{platform.gateway('a')}/v1/cluster", timeout=10).json()
        rtt = cluster["rtt_ms"]
        if not all(n in rtt.get(m, {}) for m in (a, b) for n in (a, b, c) if n != m):
            return None
        far = rtt[a][c] > rtt[a][b] + FAR_DELAY_MS / 2 and rtt[b][c] > rtt[b][a] + FAR_DELAY_MS / 2
        return cluster if far else None

    cluster = _wait(measured, 30, "RTTs between every pair of nodes, c farther than the others")
    assert cluster["backend"] == "ray"
    assert {n["node"] for n in cluster["nodes"]} == {a, b, c}
    assert min(cluster["rtt_ms"][a][c], cluster["rtt_ms"][b][c]) >= FAR_DELAY_MS
    shown = subprocess.run(
        [sys.executable, "-m", "smss.cli", "status", "--url", platform.gateway("c")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "distance matrix" in shown
    assert c[:8] in shown


def test_routing_prefers_here_then_nearest_and_yields_to_the_far_node_when_busy(
    platform: RayPlatform, spread: str
) -> None:
    # An instance on the gateway's own node wins while it is free.
    assert {_served_on(platform, "b", spread, FAST) for _ in range(8)} == {"b"}
    assert {_served_on(platform, "c", spread, FAST) for _ in range(8)} == {"c"}
    # The head has none: the nearer node by measured RTT (c answers probes 25 ms late).
    _wait(
        lambda: (
            httpx.get(f"{platform.gateway('a')}/v1/cluster", timeout=10)
            .json()["rtt_ms"]
            .get(platform.nodes["a"], {})
            .get(platform.nodes["c"], 0)
            > FAR_DELAY_MS
        ),
        30,
        "the head's RTT to c",
    )
    time.sleep(1.0)  # the gateway's view carries the RTTs
    assert {_served_on(platform, "a", spread, FAST) for _ in range(8)} == {"b"}
    # Slow answers on b teach the head's gateway its service time; with one in flight
    # there its expected wait is far above the trip to c: the next request goes to c.
    slow = np.full((1, 4), -0.4, np.float32)
    assert _served_on(platform, "a", spread, slow) == "b"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(_served_on, platform, "a", spread, np.full((1, 4), -1.5, np.float32))
        time.sleep(0.3)
        assert _served_on(platform, "a", spread, FAST) == "c"
        assert busy.result(timeout=30) == "b"


def test_a_node_that_joins_serves_and_one_that_dies_under_load_is_replaced(
    platform: RayPlatform, spread: str
) -> None:
    d = platform.cluster.add_node(num_cpus=1)
    platform.nodes["d"] = d.node_id
    try:
        joined = time.monotonic()

        def gateway_of_d() -> str | None:
            nodes = httpx.get(f"{platform.gateway('a')}/v1/cluster", timeout=10).json()["nodes"]
            return next((n["gateway"] for n in nodes if n["node"] == d.node_id and n["gateway"]), None)

        platform.gateways[d.node_id] = _wait(gateway_of_d, 60, "an agent and a gateway on the new node")
        print(f"node d serving {time.monotonic() - joined:.1f} s after it joined")
        # b and c have 0.4 cores left: an instance of 0.5 fits on the new node only.
        deploy(platform, "victim", cpu=0.5, min_instances=1, max_instances=1)
        _wait(lambda: _function(platform, "victim")["instances"], 60, "victim's instance")
        assert [platform.role_of(i["node"]) for i in _function(platform, "victim")["instances"]] == ["d"]
        assert _served_on(platform, "d", "victim", FAST) == "d"
        with httpx.Client(base_url=platform.gateway("a"), timeout=30) as admin:
            admin.delete("/v1/functions/spread").raise_for_status()  # room for the replacement
        _load_then_kill(platform, d)
    finally:
        platform.gateways.pop(d.node_id, None)


def _load_then_kill(platform: RayPlatform, d: Any) -> None:
    """Three clients (gateways a, b, c) call victim, whose one instance is on d, while d
    is killed (raylet, agent, gateway, instance: SIGKILL)."""
    stop = time.monotonic() + 9.0
    old_pid = _function(platform, "victim")["instances"][0]["pid"]

    def client(role: str) -> list[tuple[float, int, float, int]]:
        """(sent, status, seconds, pid or 0) of each request until ``stop``."""
        out = []
        with httpx.Client(base_url=platform.gateway(role), timeout=30) as http:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.1] * 4}]}
            while time.monotonic() < stop:
                sent = time.monotonic()
                response = http.post("/v2/models/victim/infer", json=body)
                pid = 0
                if response.status_code == 200:
                    pid = next(o["data"][0] for o in response.json()["outputs"] if o["name"] == "pid")
                out.append((sent, response.status_code, time.monotonic() - sent, pid))
                if response.status_code != 200:
                    time.sleep(0.05)
        return out

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, role) for role in ("a", "b", "c")]
        time.sleep(2.0)
        platform.cluster.remove_node(d, allow_graceful=False)
        killed = time.monotonic()  # every process of d is gone
        results = [r for f in futures for r in f.result(timeout=60)]
    statuses = {s for _, s, _, _ in results}
    assert statuses <= {200, 503}, statuses  # retried elsewhere or refused, nothing else
    assert max(seconds for _, _, seconds, _ in results) < 25  # none hung
    assert any(pid == old_pid for _, _, _, pid in results)  # d served before it died
    again = [sent + seconds for sent, s, seconds, pid in results if s == 200 and pid not in (0, old_pid)]
    assert again, "victim never served again after its node died"
    print(f"victim served again {min(again) - killed:.2f} s after its node was killed")
    assert min(again) - killed < 15
    roles = {platform.role_of(i["node"]) for i in _function(platform, "victim")["instances"]}
    assert roles
    assert roles <= {"b", "c"}
