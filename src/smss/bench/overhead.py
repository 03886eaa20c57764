"""``smss bench overhead``: what the platform adds over calling predict() in-process.

Starts ``smss serve --demo`` as a subprocess, drives the ``mlp`` model from a
separate load-generator process (closed loop, keep-alive connections) at
concurrency 1 and 32, and compares with the median of an in-process
``predict`` on the same model, weights and thread count.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

from smss.testing.server import running_server

BODY = {
    "inputs": [
        {
            "name": "x",
            "datatype": "FP32",
            "shape": [1, 64],
            "data": np.random.default_rng(0).standard_normal(64).astype(np.float32).tolist(),
        }
    ]
}


def direct_p50_ms(data_dir: Path, calls: int = 2000) -> float:
    import torch

    from smss.demo.generate import ensure_artifact
    from smss.node.weights import Weights
    from smss.packaging import load_class

    torch.set_num_threads(1)
    art = ensure_artifact(data_dir / "demo", "mlp")
    _, cls = load_class(f"{art.source}:{art.class_name}")
    model = cls()
    model.load(Weights(art.weights, art.weights_format))
    x = {"x": np.asarray(BODY["inputs"][0]["data"], dtype=np.float32).reshape(1, 64)}
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        model.predict(x)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def _load(url: str, body_file: Path, concurrency: int, requests: int) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smss.bench.loadgen",
            url,
            "/v2/models/mlp/infer",
            str(body_file),
            str(concurrency),
            str(requests),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result: dict[str, object] = msgspec.json.decode(out.stdout)
    return result


def run(requests: int = 2000) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="smss-bench-") as tmp:
        data = Path(tmp)
        body_file = data / "body.json"
        body_file.write_bytes(msgspec.json.encode(BODY))
        direct = direct_p50_ms(data)
        with running_server(data / "platform", ["--demo", "--log-level", "warning"]) as server:
            server.wait_for_model("mlp")
            _load(server.url, body_file, 1, 200)  # cold start + warm-up, not reported
            c1 = _load(server.url, body_file, 1, requests)
            _load(server.url, body_file, 32, 500)  # let the autoscaler settle
            c32 = _load(server.url, body_file, 32, requests * 2)
    return {
        "model": "mlp",
        "direct_p50_ms": round(direct, 3),
        "overhead_p50_ms": round(float(c1["p50_ms"]) - direct, 3),  # type: ignore[arg-type]
        "concurrency_1": c1,
        "concurrency_32": c32,
    }
