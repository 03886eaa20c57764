"""SMSS on Ray's multi-node test cluster on one machine (``ray.cluster_utils.Cluster``),
for benchmarks: nodes with their own resources, the platform started on them, and a
node removed the hard way (its raylet and every process of it, SIGKILL).

The head's GCS listens on a free port (6379 is often Redis's); Ray's dashboard is
never started.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from smss.cluster import proxy, ray_launch
from smss.config import ClusterSettings, Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class TestCluster:
    cluster: Any
    #: role -> Ray node id; the head's role is ``head``.
    nodes: dict[str, str]
    #: Ray node id -> its gateway's URL.
    gateways: dict[str, str]
    handle: Any
    _ray_nodes: dict[str, Any] = field(default_factory=dict)

    def gateway(self, role: str) -> str:
        return self.gateways[self.nodes[role]]

    def role_of(self, node: str) -> str:
        return next(r for r, n in self.nodes.items() if n == node)

    def controller_get(self, target: str) -> bytes:
        """A GET answered by the controller's own app (e.g. its ``/metrics``, which a
        gateway answers with its own)."""
        passed = proxy.Passed("GET", target, (), b"")
        answer = proxy.decode_answered(ray.get(self.handle.http.remote(proxy.encode(passed)), timeout=60))
        return answer.body

    def kill(self, role: str) -> None:
        """Remove a (non-head) node at once: SIGKILL to its raylet and all its processes."""
        self.cluster.remove_node(self._ray_nodes[role], allow_graceful=False)
        self.gateways.pop(self.nodes[role], None)


@contextlib.contextmanager
def running(
    data_dir: Path,
    head: Mapping[str, Any],
    workers: Mapping[str, Mapping[str, Any]],
    settings: Settings | None = None,
) -> Iterator[TestCluster]:
    """A cluster of a head (``head``: its ``add_node`` arguments) and named worker nodes,
    SMSS serving on it (gateways on free ports)."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"gcs_server_port": free_port(), "include_dashboard": False, **head},
    )
    try:
        added = {role: cluster.add_node(**args) for role, args in workers.items()}
        base = settings or Settings()
        settings = Settings(
            **{
                **base.__dict__,
                "port": 0,
                "data_dir": data_dir,
                "backend": "ray",
                "adopt_window_s": 0.0,
                "cluster": ClusterSettings(
                    address=cluster.address, namespace=f"smss-bench-{uuid.uuid4().hex[:8]}"
                ),
            }
        )
        ray_launch.connect(settings)
        handle, _, gateways = ray_launch.start(settings)
        head_node: Any = cluster.head_node
        nodes = {"head": head_node.node_id, **{r: n.node_id for r, n in added.items()}}
        test = TestCluster(cluster, nodes, dict(gateways), handle, dict(added))
        try:
            yield test
        finally:
            ray_launch.stop(handle)
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
