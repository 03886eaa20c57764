"""The ``ray_serve`` peer of ``smss bench peers``: Ray Serve (2.60), tuned as a careful user tunes it.

The server is :mod:`smss.bench.peers.ray_serve_server`, run in the peer's virtual
environment (``smss bench peers --setup``); this module says how to start it and
with which settings. (The Ray Serve column of ``smss bench cold-start`` is
:mod:`smss.bench.peers.rayserve`.)

One deployment of the model behind Serve's HTTP proxy, taking the same V2 JSON
bodies (Serve has no protocol of its own), with ``@serve.batch`` set to the
model spec's batch size and wait, ``max_ongoing_requests`` to the requests one
SMSS instance takes at once, and autoscaling between one replica and as many
as the other systems may run instances, aiming at SMSS's own target (70 % of the
per-instance limit) and reacting within about a second (Ray's defaults wait 30 s
to scale up and push metrics every 10 s). Access logs are off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smss.bench.peers.common import ModelInfo
from smss.bench.peers.launch import Launch, Placement

#: Set in the server's environment, inherited by Ray's controller, proxy and replicas.
ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def autoscaling(info: ModelInfo, placement: Placement) -> dict[str, Any]:
    return {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": placement.max_instances(info),
        "target_ongoing_requests": max(1.0, 0.7 * info.concurrency),
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 30.0,
        "look_back_period_s": 2.0,
        # Deprecated for the ENV push intervals, but still read (look-back must exceed it).
        "metrics_interval_s": 0.5,
    }


def deployment_options(info: ModelInfo, placement: Placement) -> dict[str, Any]:
    return {
        "autoscaling_config": autoscaling(info, placement),
        "max_ongoing_requests": info.concurrency,
        "ray_actor_options": {"num_cpus": 1},
    }


def launch(info: ModelInfo, placement: Placement, port: int, python: Path, work: Path) -> Launch:
    options = deployment_options(info, placement)
    return Launch(
        argv=[
            str(python),
            "-m",
            "smss.bench.peers.ray_serve_server",
            "--port",
            str(port),
            "--cpus",
            str(len(placement.server_cores)),
            "--model-json",
            info.encode(),
        ],
        url=f"http://127.0.0.1:{port}",
        infer_path=f"/v2/models/{info.name}/infer",
        binary=False,
        settings={
            "server": "Ray Serve HTTP proxy, one deployment; V2 JSON decoded in the replica",
            "ray_init": {"num_cpus": len(placement.server_cores), "include_dashboard": False},
            **options,
            "batching": {
                "max_batch_size": info.max_batch_size,
                "batch_wait_timeout_s": info.batch_wait_ms / 1000.0,
            },
            "env": ENV,
            "enable_access_log": False,
            "torch_threads": placement.threads,
        },
        env=dict(ENV),
        ready_timeout_s=300.0,
    )
