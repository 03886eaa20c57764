"""The ``smss`` system of ``smss bench peers``: ``smss serve --demo`` with its defaults.

The platform finds its cores from its affinity (the taskset of the placement),
so it places instances on the server cores only; gRPC is off (the bench speaks
HTTP) and logging at ``warning``; everything else is as ``smss serve --demo``
starts it: the demo models' own batching, concurrency and instance limits.
"""

from __future__ import annotations

from pathlib import Path

import smss
from smss.bench.peers.common import ModelInfo
from smss.bench.peers.launch import Launch, Placement


def launch(info: ModelInfo, placement: Placement, port: int, python: Path, work: Path) -> Launch:
    return Launch(
        argv=[
            str(python),
            "-m",
            "smss.cli",
            "serve",
            "--demo",
            "--port",
            str(port),
            "--grpc-port",
            "0",
            "--data-dir",
            str(work / "smss-data"),
            "--log-level",
            "warning",
        ],
        url=f"http://127.0.0.1:{port}",
        infer_path=f"/v2/models/{info.name}/infer",
        binary=True,
        settings={
            "server": f"smss serve --demo (smss {smss.__version__}), defaults; gRPC off",
            "max_instances": placement.max_instances(info),
            "concurrency_per_instance": info.concurrency,
            "batching": {"max_batch_size": info.max_batch_size, "batch_wait_ms": info.batch_wait_ms},
            "cpus": len(placement.server_cores),
            "torch_threads": placement.threads,
        },
    )
