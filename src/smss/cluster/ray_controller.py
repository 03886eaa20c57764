"""``smss-controller``: the platform's one controller on a cluster (see :mod:`smss.cluster.ray_actors`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import msgspec
import ray

from smss.api import wire
from smss.cluster import agent_report as msg
from smss.cluster import proxy, view
from smss.cluster.ray_actors import VIEW_WAIT_S, decode_settings, log_to_stderr
from smss.cluster.ray_agent import AgentRemote
from smss.cluster.ray_backend import RayBackend
from smss.cluster.ray_gateway import GatewayRemote
from smss.cluster.reach import Reach
from smss.control.gateways import GatewayLoads, GatewayReport
from smss.control.router import Proximity
from smss.errors import SmssError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the controller


class ControllerActor:
    """``smss-controller``: the platform's one controller on a cluster."""

    def __init__(self, settings_bytes: bytes) -> None:
        self._settings_bytes = settings_bytes
        self._settings = decode_settings(settings_bytes)
        log_to_stderr(self._settings)
        self._main: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._failure: str | None = None
        self._view = view.ClusterView()
        self._view_changed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._backend: RayBackend | None = None
        self._passthrough: proxy.AppPassthrough | None = None
        self._controller: Any = None
        self._ctx: Any = None
        self._proximity = Proximity()

    async def start(self) -> bytes:
        """Start the platform (once; later calls wait for it) and say where it serves."""
        if self._main is None:
            self._main = asyncio.get_running_loop().create_task(self._run())
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait([ready, self._main], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if self._backend is not None:
            await self._backend.wait_settled(60.0)
        return msgspec.msgpack.encode(self._gateways())

    def _gateways(self) -> dict[str, str]:
        return {} if self._backend is None else self._backend.gateway_urls()

    async def gateways(self) -> bytes:
        return msgspec.msgpack.encode(self._gateways())

    async def _run(self) -> None:
        from smss.api.app import create_app
        from smss.compose import ClusterParts, build, deploy_demo, save_usage

        settings = self._settings
        here = ray.get_runtime_context().get_node_id()
        backend = RayBackend(
            settings, secrets.token_urlsafe(24), agent_cls=AgentRemote, gateway_cls=GatewayRemote
        )
        self._backend = backend
        reach = Reach(here, write_timeout_s=settings.serving.write_timeout_s)
        reach.secret = backend.secret

        self._proximity = Proximity(here=here)
        try:
            ctx = build(settings, ClusterParts(backend, reach, GatewayLoads(), lambda: self._proximity))
        except SmssError as e:
            self._failure = e.message
            return
        self._ctx = ctx
        self._controller = ctx.platform.controller
        ctx.cluster = lambda: _cluster_json(backend)
        self._passthrough = proxy.AppPassthrough(create_app(ctx))
        backend.on_change = self._dirty.set
        self._controller.subscribe(self._dirty.set)
        try:
            async with backend.running(self._settings_bytes), asyncio.TaskGroup() as group:
                publisher = group.create_task(self._publish(reach, here))
                await backend.ready(60.0)
                async with ctx.platform.running():
                    if settings.demo:
                        await deploy_demo(ctx.platform, settings.data_dir)
                    ctx.ready = True
                    self._ready.set()
                    log.info("smss controller up on node %s", here)
                    await self._stop.wait()
                    ctx.ready = False
                publisher.cancel()
        except Exception as e:
            log.exception("the controller failed")
            self._failure = f"the controller failed: {type(e).__name__}: {e}"
        finally:
            with contextlib.suppress(Exception):
                save_usage(ctx)
            for hook in ctx.on_shutdown:
                with contextlib.suppress(Exception):
                    hook()

    async def _publish(self, reach: Reach, here: str) -> None:
        """Rebuild the view whenever something may have changed; bump its version when it did."""
        assert self._backend is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._dirty.wait()
            self._dirty.clear()
            topology = self._backend.topology()
            reach.relays = {n.node: n.relay for n in topology.nodes}
            row = topology.rtt_ms.get(here, {})
            self._proximity = Proximity(here=here, rtt_s={n: ms / 1000 for n, ms in row.items()})
            candidate = view.ClusterView(
                0,
                view.functions_of(self._controller, time.monotonic()),
                tuple(w.name for w in self._ctx.platform.workflows.list()),
                topology.nodes,
                topology.rtt_ms,
                self._backend.secret,
            )
            if _with_version(candidate, self._view.version) != self._view:
                self._view = _with_version(candidate, self._view.version + 1)
                self._view_changed.set()
                self._view_changed = asyncio.Event()
            await asyncio.sleep(0.005)

    async def view(self, known: int, wait_s: float = VIEW_WAIT_S) -> bytes:
        """The view, once newer than version ``known`` (or after ``wait_s``)."""
        if self._view.version <= known:
            changed = self._view_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait_s)
        return view.encode(self._view)

    async def report(self, data: bytes) -> None:
        if self._controller is not None:
            self._controller.report(msgspec.msgpack.decode(data, type=GatewayReport))

    async def agent_heartbeat(self, data: bytes) -> bytes:
        if self._backend is None:
            return msg.encode(msg.Peers())
        return msg.encode(self._backend.heartbeat(msg.decode(data, msg.AgentReport)))

    async def http(self, data: bytes) -> bytes:
        if self._passthrough is None:
            raise RuntimeError("the controller is not running")
        return proxy.encode(await self._passthrough(proxy.decode_passed(data)))

    async def shutdown(self) -> None:
        """Stop the platform: instances, agents, gateways; then this actor."""
        self._stop.set()
        if self._main is not None:
            with contextlib.suppress(Exception):
                await self._main


def _cluster_json(backend: RayBackend) -> wire.ClusterJson:
    topology = backend.topology()
    nodes = [wire.ClusterNode(n.node, n.ip, n.relay, n.gateway) for n in topology.nodes]
    return wire.ClusterJson("ray", nodes, topology.rtt_ms)


def _with_version(v: view.ClusterView, version: int) -> view.ClusterView:
    return msgspec.structs.replace(v, version=version)


ControllerRemote = ray.remote(ControllerActor)
