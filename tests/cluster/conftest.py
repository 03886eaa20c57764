"""One Ray test cluster per module (``ray.cluster_utils.Cluster``), SMSS running on it
(the nodes and their resources: cluster_kit.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from cluster_kit import FAR_DELAY_MS, RayPlatform, free_port, need_ray


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayPlatform]:
    ray = need_ray()
    from ray.cluster_utils import Cluster

    from smss.cluster import ray_launch
    from smss.config import ClusterSettings, ServingSettings, Settings

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"gcs_server_port": free_port(), "num_cpus": 0, "include_dashboard": False},
    )
    try:
        b = cluster.add_node(num_cpus=1)
        c = cluster.add_node(num_cpus=1, env_vars={"SMSS_FAULT": f"probe.before_reply:delay:{FAR_DELAY_MS}"})
        data = tmp_path_factory.mktemp("ray-platform")
        settings = Settings(
            port=0,
            data_dir=data,
            backend="ray",
            allow_faults=True,
            adopt_window_s=0,
            spares=False,
            cluster=ClusterSettings(
                address=cluster.address, namespace=f"smss-test-{uuid.uuid4().hex[:8]}", probe_interval_s=0.5
            ),
            serving=ServingSettings(keep_alive_s=600.0, request_timeout_s=20.0, health_interval_s=0.5),
        )
        ray_launch.connect(settings)
        handle, created, gateways = ray_launch.start(settings)
        assert created
        nodes = {"a": cluster.head_node.node_id, "b": b.node_id, "c": c.node_id}
        assert set(gateways) == set(nodes.values()), gateways
        yield RayPlatform(cluster, nodes, gateways, data, handle, settings)
        ray_launch.stop(handle)
    finally:
        ray.shutdown()
        cluster.shutdown()
