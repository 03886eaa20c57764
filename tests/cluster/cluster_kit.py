"""Helpers of the Ray cluster tests: the platform's handle, a model to deploy, Ray itself.

The cluster (see conftest.py): one Ray test cluster per module (``ray.cluster_utils.Cluster``).

Nodes, each with its own resources:

* ``a``: the head, ``num_cpus=0``: the controller, an agent and a gateway, no instance
  fits there (placement sees no cores);
* ``b``: one core;
* ``c``: one core, and every RTT probe it answers delayed by 25 ms (the
  ``probe.before_reply`` fault point, in its raylet's environment): the far node.

The head's GCS listens on a free port (6379 is Redis's on these machines). In CI
(``CI=true``) a missing Ray fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FAR_DELAY_MS = 25


def need_ray() -> Any:
    if os.environ.get("CI") == "true":
        import ray  # in CI a missing Ray is a failure, not a skip

        return ray
    return pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RayPlatform:
    cluster: Any
    #: Role ("a", "b", "c", later ones by name) -> Ray node id.
    nodes: dict[str, str]
    gateways: dict[str, str]
    data_dir: Path
    handle: Any
    settings: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def gateway(self, role: str) -> str:
        return self.gateways[self.nodes[role]]

    def role_of(self, node: str) -> str:
        return next(r for r, n in self.nodes.items() if n == node)


MODEL = """
import os, time
import numpy as np
import smss


@smss.model(
    name="{name}",
    inputs={{"x": ("FP32", [-1, 4])}},
    outputs={{"y": ("FP32", [-1, 4]), "pid": ("INT64", [1])}},
    min_instances={min_instances},
    max_instances={max_instances},
    concurrency={concurrency},
    keep_alive_s=600.0,
    cpu={cpu},
    memory=64,
)
class Where:
    def load(self, weights):
        self.w = np.array(weights.numpy()["w"], dtype=np.float32)

    def predict(self, inputs):
        x = inputs["x"]
        if float(x.flat[0]) < 0:  # a negative first element: answer after that many seconds
            time.sleep(min(-float(x.flat[0]), 5.0))
        return {{"y": (np.abs(x) * self.w).astype(np.float32), "pid": np.array([os.getpid()], np.int64)}}
"""


def deploy(
    platform: RayPlatform,
    name: str,
    *,
    cpu: float = 0.1,
    min_instances: int = 0,
    max_instances: int = 4,
    concurrency: int = 4,
    via: str = "a",
) -> None:
    """Deploy a ``Where`` model (weights: ``w = [1, 2, 3, 4]``) through a gateway."""
    from safetensors.numpy import save_file

    import smss

    folder = platform.data_dir / "models"
    folder.mkdir(exist_ok=True)
    source = folder / f"{name.replace('-', '_')}.py"
    source.write_text(
        MODEL.format(
            name=name,
            cpu=cpu,
            min_instances=min_instances,
            max_instances=max_instances,
            concurrency=concurrency,
        )
    )
    weights = folder / "w.safetensors"
    if not weights.exists():
        save_file({"w": np.array([1, 2, 3, 4], np.float32)}, str(weights))
    with smss.Client(platform.gateway(via)) as client:
        client.deploy(f"{source}:Where", weights)
