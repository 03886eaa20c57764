"""``smss-gateway-<node id>``: HTTP on its node (see :mod:`smss.cluster.ray_actors`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import msgspec
import ray
import uvicorn

from smss.api.auth import TokenAuth
from smss.api.connection import protocol_class
from smss.api.metrics import PrometheusMetrics
from smss.cluster import proxy, view
from smss.cluster.edge import Edge
from smss.cluster.edge_app import create_edge_app
from smss.cluster.ray_actors import VIEW_WAIT_S, controller_handle, decode_settings, log_to_stderr
from smss.config import ClusterSettings
from smss.control.gateways import GatewayReport
from smss.ports import SystemClock

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- a gateway


class GatewayActor:
    """``smss-gateway-<node id>``: HTTP on its node, routing with its own dispatchers."""

    def __init__(self, node: str, settings_bytes: bytes) -> None:
        self._node = node
        self._settings = decode_settings(settings_bytes)
        log_to_stderr(self._settings)
        self._url: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._server: uvicorn.Server | None = None
        self._bound = asyncio.Event()

    async def start(self) -> str:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        bound = asyncio.ensure_future(self._bound.wait())
        await asyncio.wait([bound, self._task], return_when=asyncio.FIRST_COMPLETED)
        bound.cancel()
        if self._url is None:
            if self._task.done() and self._task.exception() is not None:
                raise RuntimeError(f"gateway failed: {self._task.exception()}")
            raise RuntimeError("gateway failed to start")
        return self._url

    async def _run(self) -> None:
        settings = self._settings
        cluster: ClusterSettings = settings.cluster
        clock = SystemClock()
        controller = await asyncio.to_thread(controller_handle, cluster.namespace)

        async def send(report: GatewayReport) -> None:
            await asyncio.wait_for(controller.report.remote(msgspec.msgpack.encode(report)), 5.0)

        async def forward(passed: proxy.Passed) -> proxy.Answered:
            data = await asyncio.wait_for(controller.http.remote(proxy.encode(passed)), 600.0)
            return proxy.decode_answered(data)

        edge = Edge(
            self._node,
            f"gateway-{self._node[:12]}",
            clock,
            settings.serving,
            send,
            heartbeat_s=cluster.heartbeat_s,
        )
        metrics = PrometheusMetrics()
        app = create_edge_app(
            edge, settings, metrics, TokenAuth(settings.token, clock), forward, lambda: edge.view.version > 0
        )
        sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        sock.listen(1024)
        port = sock.getsockname()[1]
        host = settings.host
        if host in ("0.0.0.0", "::"):
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        config = uvicorn.Config(
            app,
            http=protocol_class(settings.serving),
            log_config=None,
            access_log=False,
            lifespan="off",
            limit_concurrency=2 * settings.serving.max_connections + 64,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        async with edge.running(), asyncio.TaskGroup() as group:
            follower = group.create_task(self._follow(edge, controller))
            self._url = f"http://{host}:{port}"
            self._bound.set()
            try:
                await self._server.serve(sockets=[sock])
            finally:
                follower.cancel()

    async def _follow(self, edge: Edge, controller: Any) -> None:
        """Keep ``edge`` on the controller's latest view (long polls)."""
        namespace = self._settings.cluster.namespace
        while True:
            try:
                data = await asyncio.wait_for(controller.view.remote(edge.view.version), VIEW_WAIT_S + 5)
                latest = view.decode(data)
                if latest.version != edge.view.version:
                    edge.apply(latest)
            except Exception as e:
                log.warning("could not read the controller's view: %s", e)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    controller = await asyncio.to_thread(controller_handle, namespace)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 10.0)


GatewayRemote = ray.remote(GatewayActor)
