"""The ``mlserver`` peer: Seldon's MLServer (1.7.1), V2 protocol, adaptive batching on.

The model is a custom runtime (:mod:`smss.bench.peers.mlserver_runtime`) in the
peer's virtual environment (``smss bench peers --setup``). Adaptive batching
takes the batch settings of the model's ``@smss.model`` spec (``max_batch_size``,
``batch_wait_ms`` as ``max_batch_time``), and inference runs in as many parallel
workers (MLServer's inference pool) as the other systems may run instances.
``debug`` is off (no access log line per request); metrics stay on, as deployed.
"""

from __future__ import annotations

import json
from pathlib import Path

from smss.bench.peers.common import ModelInfo
from smss.bench.peers.launch import Launch, Placement
from smss.testing.server import free_port


def launch(info: ModelInfo, placement: Placement, port: int, python: Path, work: Path) -> Launch:
    workers = placement.max_instances(info)
    server = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": workers,
        "load_models_at_startup": True,
    }
    model = {
        "name": info.name,
        "implementation": "smss.bench.peers.mlserver_runtime.DemoRuntime",
        "max_batch_size": info.max_batch_size,
        "max_batch_time": info.batch_wait_ms / 1000.0,
        "parameters": {"extra": {"model": info.encode()}},
    }
    repo = work / "mlserver"
    return Launch(
        argv=[str(python.parent / "mlserver"), "start", str(repo)],
        url=f"http://127.0.0.1:{port}",
        infer_path=f"/v2/models/{info.name}/infer",
        # MLServer's REST server reads JSON tensors only (no binary tensor extension).
        binary=False,
        settings={
            "server": "mlserver start, REST V2, custom runtime",
            "parallel_workers": workers,
            "adaptive_batching": {
                "max_batch_size": info.max_batch_size,
                "max_batch_time_s": info.batch_wait_ms / 1000.0,
            },
            "debug": False,
            "torch_threads": placement.threads,
        },
        files={
            "mlserver/settings.json": json.dumps(server),
            f"mlserver/{info.name}/model-settings.json": json.dumps(model),
        },
        cwd=str(repo),
    )
