"""``smss serve --backend ray``: join a Ray cluster and run SMSS on it.

``--address ADDRESS`` joins the cluster whose GCS listens there, ``auto`` the one this
machine's ``ray start`` recorded, ``local`` starts a private one-node cluster here
(for trying it; bound to loopback). It never starts Ray's dashboard, whose job API
runs any code for anyone who can reach it (ShadowRay, CVE-2023-48022).

The controller is the detached actor ``smss-controller``: found if the cluster runs
one, else started (on this node, where its data directory is). This command waits
until the gateways serve, prints them, and stays until SIGINT / SIGTERM; then, if it
started the controller, it stops the platform (instances, agents, gateways). Killed
(``kill -9``) it leaves the platform running: the next ``smss serve`` finds it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import msgspec
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from smss.cluster.ray_actors import encode_settings
from smss.cluster.ray_backend import CONTROLLER_NAME
from smss.cluster.ray_controller import ControllerRemote
from smss.config import Settings

log = logging.getLogger(__name__)

#: How long the first gateways may take to serve.
READY_TIMEOUT_S = 120.0


def connect(settings: Settings) -> None:
    """Join (or, for ``local``, start) the Ray cluster, without a dashboard."""
    address = settings.cluster.address
    kwargs: dict[str, Any] = {
        "namespace": settings.cluster.namespace,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if address == "local":
        ray.init(_node_ip_address="127.0.0.1", **kwargs)
    else:
        ray.init(address=address, **kwargs)


def controller(settings: Settings) -> tuple[Any, bool]:
    """The cluster's ``smss-controller`` and whether this call started it."""
    namespace = settings.cluster.namespace
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace), False
    except ValueError:
        pass
    here = ray.get_runtime_context().get_node_id()
    handle = ControllerRemote.options(
        name=CONTROLLER_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        # Its data directory (SQLite) is on this node: it stays here. With the registry
        # and log in PostgreSQL and blobs on a shared path it could float (soft=True).
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(encode_settings(settings))
    return handle, True


def start(settings: Settings) -> tuple[Any, bool, dict[str, str]]:
    """Find or start the controller; once it serves: (handle, started here, gateways by node)."""
    handle, created = controller(settings)
    gateways: dict[str, str] = msgspec.msgpack.decode(ray.get(handle.start.remote(), timeout=READY_TIMEOUT_S))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not gateways and time.monotonic() < deadline:
        time.sleep(0.2)
        gateways = msgspec.msgpack.decode(ray.get(handle.gateways.remote(), timeout=30))
    return handle, created, gateways


def stop(handle: Any) -> None:
    """Stop the platform the controller runs, then the controller."""
    try:
        ray.get(handle.shutdown.remote(), timeout=120)
    finally:
        ray.kill(handle, no_restart=True)


def serve(settings: Settings) -> None:
    connect(settings)
    handle, created, gateways = start(settings)
    if not created:
        print("found the running smss-controller; its settings stay as they were", flush=True)
    for node, url in sorted(gateways.items()):
        print(f"smss gateway on node {node}: {url}", flush=True)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        done.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if created:
            print("stopping the platform", flush=True)
            stop(handle)
        ray.shutdown()
