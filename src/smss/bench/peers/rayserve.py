"""The established peer for ``smss bench cold-start``: Ray Serve, scaled to zero.

``python -m smss.bench.peers.rayserve [--tries N] [--budget-s S] --model NAME SOURCE CLASS WEIGHTS ...``

Starts a private local Ray (2 CPUs, no dashboard, a small object store) and
Serve with its HTTP proxy on a free loopback port, then, model by model,
deploys the model SMSS serves, built exactly as :mod:`smss.bench.naive`
builds it (``load_class``, ``cls()``, ``model.load(Weights(...))``, one torch
thread), behind an HTTP endpoint that takes the raw float32 bytes of the
input (shape in the ``x-shape`` header) and answers the raw bytes of
``predict({"image": x})["logits"]``.

Autoscaling is tuned as a careful user tunes it for scale-to-zero (see
:data:`AUTOSCALING` and :data:`ENV`): no replica while idle, none at deploy
time, one replica at most, scale up on the first queued request without
delay, scale to zero after 2 s idle, metrics pushed and looked back over in
fractions of a second instead of Ray's defaults (10 s push, 30 s look-back,
30 s upscale delay, 600 s downscale delay).

Measured per model: ``warm_ms`` (median of 10 once up) and ``cold_ms``: the
median over tries of one HTTP request, send to response, made when Serve
reports no replica of any state for the deployment. Prints one JSON line::

    {"ray_version": ..., "config": ..., "startup_s": ..., "total_s": ...,
     "models": {NAME: {"cold_ms", "warm_ms", "samples_ms", "tries", "note"?}}}

or, where Ray or Serve could not start, ``{"error": ...}`` (exit status 1).
Serve and Ray are shut down before exit, whatever happened.

This is the one module, with the rest of :mod:`smss.cluster`, allowed to import ray.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: The autoscaling config of every deployment (``ray.serve.config.AutoscalingConfig``).
AUTOSCALING: dict[str, Any] = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "max_replicas": 1,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 2.0,
    "downscale_to_zero_delay_s": 2.0,
    # Deprecated in favour of ENV below, but still read by the router and the controller.
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
}
#: Set before Ray starts, so that the controller, proxy and replicas inherit them.
ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
}
#: Other deployment options: one CPU per replica, one request at a time, quick stop.
DEPLOYMENT: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 1},
    "max_ongoing_requests": 1,
    "graceful_shutdown_timeout_s": 1.0,
    "graceful_shutdown_wait_loop_s": 0.5,
}
WARM = 10
ZERO_TIMEOUT_S = 60.0
SLOW_ZERO_S = 20.0  # a scale-to-zero slower than this: at most 3 tries


def config_summary() -> str:
    scaling = ", ".join(f"{k}={v}" for k, v in AUTOSCALING.items())
    env = ", ".join(f"{k}={v}" for k, v in ENV.items() if k.startswith("RAY_SERVE_"))
    return f"autoscaling_config({scaling}); env {env}; num_cpus=1 per replica, max_ongoing_requests=1"


class ModelDeployment:
    """The Serve deployment's class: the model, loaded as :mod:`smss.bench.naive` loads it."""

    def __init__(self, source: str, class_name: str, weights: str) -> None:
        import torch

        torch.set_num_threads(1)
        from smss.node.weights import Weights
        from smss.packaging import load_class

        _, cls = load_class(f"{source}:{class_name}")
        self.model: Any = cls()
        self.model.load(Weights(Path(weights), "safetensors"))

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        shape = tuple(int(d) for d in request.headers["x-shape"].split(","))
        x = np.frombuffer(await request.body(), dtype=np.float32).reshape(shape)
        out = self.model.predict({"image": x})["logits"]
        return Response(np.ascontiguousarray(out).tobytes(), media_type="application/octet-stream")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _replica_count(serve: Any, app: str) -> int | None:
    """Replicas of any state of ``app``'s one deployment; None before it is known."""
    status = serve.status().applications.get(app)
    if status is None or not status.deployments:
        return None
    return sum(sum(d.replica_states.values()) for d in status.deployments.values())


def _wait_zero(serve: Any, app: str, timeout: float) -> float | None:
    """Seconds until ``app`` has no replica at all, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _replica_count(serve, app) == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def measure(
    serve: Any,
    http: Any,
    base_url: str,
    name: str,
    source: str,
    class_name: str,
    weights: str,
    tries: int,
    budget_s: float,
) -> dict[str, Any]:
    t_model = time.monotonic()
    deployment = serve.deployment(ModelDeployment, name=name, autoscaling_config=AUTOSCALING, **DEPLOYMENT)
    serve.run(deployment.bind(source, class_name, weights), name=name, route_prefix=f"/{name}")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    body, headers = x.tobytes(), {"x-shape": ",".join(map(str, x.shape))}
    url = f"{base_url}/{name}"

    def request_ms() -> float:
        t0 = time.perf_counter()
        r = http.post(url, content=body, headers=headers)
        elapsed = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        if not r.content or len(r.content) % 4:
            raise RuntimeError(f"unexpected response of {len(r.content)} bytes")
        return elapsed

    first = request_ms()  # the deployment's first replica, from initial_replicas=0
    warm = [request_ms() for _ in range(WARM)]
    samples: list[float] = []
    zero_waits: list[float] = []
    notes: list[str] = []
    while len(samples) < tries:
        if time.monotonic() - t_model > budget_s:
            notes.append(
                f"stopped after {len(samples)} tries: the model's budget of {budget_s:.0f} s ran out"
            )
            break
        waited = _wait_zero(serve, name, ZERO_TIMEOUT_S)
        if waited is None:
            notes.append(f"no scale to zero within {ZERO_TIMEOUT_S:.0f} s after try {len(samples)}")
            break
        zero_waits.append(round(waited, 1))
        if waited > SLOW_ZERO_S and tries > 3:
            tries = 3
            notes.append(f"scale-to-zero took {waited:.0f} s: reduced to 3 tries")
        samples.append(request_ms())
    serve.delete(name)
    result: dict[str, Any] = {
        "cold_ms": round(statistics.median(samples), 1) if samples else None,
        "warm_ms": round(statistics.median(warm), 2),
        "samples_ms": [round(s, 1) for s in samples],
        "first_request_ms": round(first, 1),
        "tries": len(samples),
        "scale_to_zero_s": zero_waits,
        "model_s": round(time.monotonic() - t_model, 1),
    }
    if notes:
        result["note"] = "; ".join(notes)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smss.bench.peers.rayserve")
    parser.add_argument(
        "--model", nargs=4, action="append", required=True, metavar=("NAME", "SOURCE", "CLASS", "WEIGHTS")
    )
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=240.0, help="per model")
    args = parser.parse_args(argv)

    os.environ.update(ENV)
    t0 = time.monotonic()
    out: dict[str, Any] = {"config": config_summary()}
    ray: Any = None
    serve: Any = None
    try:
        import httpx

        # Imported by name: typed as Any whether or not the bench extra is installed.
        ray = importlib.import_module("ray")
        serve = importlib.import_module("ray.serve")

        out["ray_version"] = ray.__version__
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=300 * 2**20,
            log_to_driver=False,
            logging_level="ERROR",
        )
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "ERROR"})
        out["startup_s"] = round(time.monotonic() - t0, 1)
        models: dict[str, Any] = {}
        with httpx.Client(timeout=300) as http, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # metrics_interval_s, see AUTOSCALING
            for name, source, class_name, weights in args.model:
                try:
                    models[name] = measure(
                        serve,
                        http,
                        f"http://127.0.0.1:{port}",
                        name,
                        source,
                        class_name,
                        weights,
                        args.tries,
                        args.budget_s,
                    )
                except Exception as e:
                    models[name] = {"cold_ms": None, "error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
        out["models"] = models
        status = 0
    except Exception as e:
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
        status = 1
    finally:
        if serve is not None:
            try:
                serve.shutdown()
            except Exception:
                traceback.print_exc()
        if ray is not None:
            ray.shutdown()
    out["total_s"] = round(time.monotonic() - t0, 1)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    # Serve pickles the deployment's class: use the importable module's, not __main__'s.
    from smss.bench.peers import rayserve

    sys.exit(rayserve.main())
