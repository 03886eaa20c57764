"""What the Ray actors of SMSS share: their settings on the wire, their log, the controller's handle.

The actors, one module each:

* ``smss-controller`` (:class:`~smss.cluster.ray_controller.ControllerActor`,
  detached, one per cluster): the whole platform of one process
  (:func:`smss.compose.build`: registry, workflows, the log, the controller) over the
  :class:`~smss.cluster.ray_backend.RayBackend`; it publishes the
  :class:`~smss.cluster.view.ClusterView` gateways route by, takes their load reports
  and the agents' heartbeats, and runs every route a gateway passes on.
* ``smss-agent-<node id>`` (:class:`~smss.cluster.ray_agent.AgentActor`, pinned to
  its node): a :class:`~smss.node.agent.NodeAgent` (zygotes, weight store, templates,
  instances as on one machine) and the node's relay (:mod:`smss.node.relay`); it
  heartbeats to the controller and probes the other nodes' relays (RTT, EWMA).
* ``smss-gateway-<node id>`` (:class:`~smss.cluster.ray_gateway.GatewayActor`,
  pinned): the HTTP face on its node (:mod:`smss.cluster.edge_app`), routing with its
  own dispatchers.

Every method takes and returns bytes (msgpack of SMSS's own message types): Ray
carries them, nothing of ours is pickled. Each actor's long-lived loops run in one
task owned by the actor (started by ``start``, ended by ``close`` / ``stop`` /
``shutdown``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import ray

from smss.cluster.ray_backend import CONTROLLER_NAME
from smss.config import Settings

log = logging.getLogger(__name__)

#: How long a view request waits for a newer view before answering with the same one.
VIEW_WAIT_S = 5.0

# ---------------------------------------------------------------- settings on the wire


def _enc_hook(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(type(obj))


def _dec_hook(kind: type, obj: object) -> object:
    if kind is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError(kind)


def encode_settings(settings: Settings) -> bytes:
    return msgspec.msgpack.encode(settings, enc_hook=_enc_hook)


def decode_settings(data: bytes) -> Settings:
    return msgspec.msgpack.decode(data, type=Settings, dec_hook=_dec_hook)


def node_facts(node: str) -> tuple[dict[str, float], str]:
    """The node's resources and its address, as Ray's node table has them."""
    for n in ray.nodes():  # type: ignore[no-untyped-call]
        if n.get("NodeID") == node:
            return dict(n.get("Resources", {})), str(n.get("NodeManagerAddress", ""))
    return {}, ""


def log_to_stderr(settings: Settings) -> None:
    """An actor's process is a composition root: its log goes to its Ray worker's stderr."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def controller_handle(namespace: str) -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
