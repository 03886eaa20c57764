"""``smss bench cluster``: the ``mlp`` model on a 2-node Ray test cluster on this machine.

Nodes (``ray.cluster_utils.Cluster``): the head (2 cores declared; the controller,
an agent, a gateway) and ``b`` (1 core; an agent, a gateway). Copies of the demo
``mlp`` (its code and weights under other names and core counts) are placed so
that each phase is deterministic under best-fit placement:

* ``throughput``: ``mlp`` (0.6 core, two instances: one per node) driven closed loop
  through one gateway, then through both at once (``rps``, ``p50_ms``, ``p99_ms``);
* ``cross_node``: ``mlp_one`` (0.3 core, one instance, on ``b``) at concurrency 1
  through ``b``'s gateway (same node: a Unix socket) and the head's (cross node: TCP
  through ``b``'s relay); ``cross_node_overhead_p50_ms`` is the difference of the p50s;
* ``cold_start_ms``: ``mlp_one``'s first request (no node holds its weights: they
  are read from the file and its template built) against its first request after a
  scale-to-zero (its node holds its weights and template: placement goes back
  there), with the starts' tiers as the controller recorded them; the runtime's
  zygote is warm on both nodes (``mlp`` ran there), so the difference is the weights
  (and template);
* ``recover_s``: ``mlp_victim`` (1 core: it fits only on ``b``) under requests
  through the head's gateway while ``b`` is killed (its raylet and every process of
  it, SIGKILL): seconds from the kill to the first answer from a new instance.

One machine plays every node, so "cross node" is loopback TCP and every figure is
noisy on a shared machine: a smoke run, not a measurement to quote.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from smss.bench.overhead import BODY
from smss.client import Client
from smss.packaging import Package, package_class


def _package(name: str, cpu: float, min_instances: int, max_instances: int, data: Path) -> Package:
    """The demo ``mlp`` (its code and weights) as function ``name`` with these needs."""
    from smss.demo.generate import ensure_artifact
    from smss.packaging import load_class

    art = ensure_artifact(data / "demo", "mlp")
    _, cls = load_class(f"{art.source}:{art.class_name}")
    pkg = package_class(art.source, cls, art.weights)
    spec = msgspec.structs.replace(
        pkg.spec,
        name=name,
        resources=msgspec.structs.replace(pkg.spec.resources, cpu=cpu),
        scaling=msgspec.structs.replace(
            pkg.spec.scaling, min_instances=min_instances, max_instances=max_instances, keep_alive_s=600.0
        ),
    ).validate()
    return dataclasses.replace(pkg, spec=spec)


def _instances(url: str, name: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = httpx.get(f"{url}/v1/functions/{name}", timeout=30).json()["instances"]
    return got


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _load(url: str, name: str, body_file: Path, concurrency: int, requests: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smss.bench.loadgen",
            url,
            f"/v2/models/{name}/infer",
            str(body_file),
            str(concurrency),
            str(requests),
        ],
        stdout=subprocess.PIPE,
    )


def _result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    result: dict[str, Any] = msgspec.json.decode(out)
    return {k: result[k] for k in ("concurrency", "requests", "rps", "p50_ms", "p99_ms", "errors")}


def _timed(http: httpx.Client, name: str) -> tuple[int, float]:
    """(status, ms) of one request."""
    t0 = time.perf_counter()
    response = http.post(f"/v2/models/{name}/infer", json=BODY)
    return response.status_code, (time.perf_counter() - t0) * 1000


def _p50(url: str, name: str, n: int) -> float:
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(20):
            http.post(f"/v2/models/{name}/infer", json=BODY)
        samples = [_timed(http, name)[1] for _ in range(n)]
    return round(statistics.median(samples), 3)


def _cold(url: str, name: str) -> float:
    with httpx.Client(base_url=url, timeout=120) as http:
        status, ms = _timed(http, name)
    if status != 200:
        raise RuntimeError(f"cold request to {name} answered {status}")
    return round(ms, 1)


def run(requests: int = 400) -> dict[str, object]:
    """The benchmark's figures. Ray's processes print to this process's stdout (a killed
    raylet's last log lines, for one): while it runs, stdout goes to stderr, so that the
    command's stdout holds its JSON alone."""
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        return _run(requests)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run(requests: int) -> dict[str, object]:
    from smss.cluster import ray_testkit
    from smss.config import Settings

    with tempfile.TemporaryDirectory(prefix="smss-bench-cluster-") as tmp:
        data = Path(tmp)
        body_file = data / "body.json"
        body_file.write_bytes(msgspec.json.encode(BODY))
        head_args = {"num_cpus": 2}
        workers = {"b": {"num_cpus": 1}}
        with ray_testkit.running(data / "platform", head_args, workers, Settings(log_level="warning")) as tc:
            head, b = tc.gateway("head"), tc.gateway("b")
            with Client(head) as client:
                return _phases(tc, client, head, b, body_file, data, requests)


def _phases(
    tc: Any, client: Client, head: str, b: str, body_file: Path, data: Path, requests: int
) -> dict[str, object]:
    # --- throughput: one instance per node
    client.deploy_package(_package("mlp", 0.6, 2, 2, data))
    _wait(lambda: len(_instances(head, "mlp")) == 2, 300, "two instances of mlp")
    roles = sorted(tc.role_of(i["node"]) for i in _instances(head, "mlp"))
    _result(_load(head, "mlp", body_file, 8, 100))  # warm-up
    _result(_load(b, "mlp", body_file, 8, 100))
    one = _result(_load(head, "mlp", body_file, 16, requests))
    both_procs = [_load(url, "mlp", body_file, 16, requests) for url in (head, b)]
    both = [_result(p) for p in both_procs]
    throughput = {
        "instances_on": roles,
        "one_gateway": one,
        "both_gateways": {
            "rps": round(sum(r["rps"] for r in both), 1),
            "p50_ms": max(r["p50_ms"] for r in both),
            "p99_ms": max(r["p99_ms"] for r in both),
            "errors": sum(r["errors"] for r in both),
            "per_gateway": both,
        },
    }
    # --- cold start where no node holds the weights (mlp_one is new), then the
    # cross-node overhead on its one instance (on b), then a cold start where its node
    # holds them (after scale-to-zero placement goes back there)
    client.deploy_package(_package("mlp_one", 0.3, 0, 1, data))
    without_weights = _cold(head, "mlp_one")
    first_on = tc.role_of(_instances(head, "mlp_one")[0]["node"])
    same_url, cross_url = (b, head) if first_on == "b" else (head, b)
    same = _p50(same_url, "mlp_one", requests)
    cross = _p50(cross_url, "mlp_one", requests)
    warm = same
    client.post("/v2/repository/models/mlp_one/unload")
    _wait(lambda: not _instances(head, "mlp_one"), 60, "mlp_one scaled to zero")
    time.sleep(1.0)  # its template forks its next spare
    with_weights = _cold(same_url, "mlp_one")
    again = tc.role_of(_instances(head, "mlp_one")[0]["node"])
    tiers = _start_tiers(tc).get("mlp_one", {})
    # --- recover: kill the node of mlp_victim's only instance
    for name in ("mlp", "mlp_one"):
        client.delete(name)
    client.deploy_package(_package("mlp_victim", 1.0, 1, 1, data))
    victim = _wait(lambda: _instances(head, "mlp_victim"), 300, "mlp_victim's instance")
    victim_on = tc.role_of(victim[0]["node"])
    recover = _recover(tc, head, victim[0]["pid"]) if victim_on == "b" else None
    return {
        "model": "mlp",
        "nodes": {"head": {"cores": 2}, "b": {"cores": 1}},
        "throughput": throughput,
        "same_node_p50_ms": same,
        "cross_node_p50_ms": cross,
        "cross_node_overhead_p50_ms": round(cross - same, 3),
        "cross_node_path": "TCP through the instance's node relay (raw frames), loopback on one machine",
        "cold_start_ms": {
            "weights_on_no_node": without_weights,
            "weights_on_no_node_started_on": first_on,
            "weights_on_node": with_weights,
            "weights_on_node_started_on": again,
            "warm_p50_ms": warm,
            "starts_by_tier": tiers,
        },
        "recover_s": recover,
        "recover_note": None if recover is not None else f"mlp_victim was placed on {victim_on}, not b",
        "note": "smoke run on one shared machine playing every node: noisy figures, not measurements",
    }


def _start_tiers(tc: Any) -> dict[str, dict[str, int]]:
    """Starts per function and tier of readiness, from the controller's own metrics."""
    out: dict[str, dict[str, int]] = {}
    text = tc.controller_get("/metrics").decode()
    for family in text_string_to_metric_families(text):
        if family.name != "smss_start_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.value:
                fn, tier = sample.labels.get("function", "?"), sample.labels.get("tier", "?")
                out.setdefault(fn, {})[tier] = int(sample.value)
    return out


def _recover(tc: Any, url: str, old_pid: int) -> float | None:
    body = BODY
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(10):
            http.post("/v2/models/mlp_victim/infer", json=body)
        tc.kill("b")
        killed = time.monotonic()
        deadline = killed + 60
        while time.monotonic() < deadline:
            try:
                response = http.post("/v2/models/mlp_victim/infer", json=body)
            except httpx.TransportError:  # a kept-alive connection the gateway closed
                continue
            if response.status_code == 200:
                pids = [i["pid"] for i in _instances(url, "mlp_victim")]
                if pids and old_pid not in pids:
                    return round(time.monotonic() - killed, 2)
            else:
                time.sleep(0.02)
    return None
