"""The Ray actors of SMSS on a cluster: the controller, a node agent per node, a gateway per node.

* ``smss-controller`` (:class:`ControllerActor`, detached, one per cluster): the whole
  platform of one process (:func:`smss.compose.build`: registry, workflows, the log,
  the controller) over the :class:`~smss.cluster.ray_backend.RayBackend`; it publishes
  the :class:`~smss.cluster.view.ClusterView` gateways route by, takes their load
  reports and the agents' heartbeats, and runs every route a gateway passes on.
* ``smss-agent-<node id>`` (:class:`AgentActor`, pinned to its node): a
  :class:`~smss.node.agent.NodeAgent` (zygotes, weight store, templates, instances as
  on one machine) and the node's relay (:mod:`smss.node.relay`); it heartbeats to the
  controller and probes the other nodes' relays for their round trips (EWMA).
* ``smss-gateway-<node id>`` (:class:`GatewayActor`, pinned): the HTTP face on its node
  (:mod:`smss.cluster.edge_app`), routing with its own dispatchers.

Every method takes and returns bytes (msgpack of SMSS's own message types): Ray
carries them, nothing of ours is pickled. Each actor's long-lived loops run in one
task owned by the actor (started by ``start``, ended by ``close`` / ``stop`` /
``shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import ray
import uvicorn

from smss import faults
from smss.api import wire
from smss.api.auth import TokenAuth
from smss.api.connection import protocol_class
from smss.api.metrics import PrometheusMetrics
from smss.cluster import agent_report as msg
from smss.cluster import proxy, view
from smss.cluster.edge import Edge
from smss.cluster.edge_app import create_edge_app
from smss.cluster.ray_backend import CONTROLLER_NAME, RayBackend
from smss.cluster.reach import Reach
from smss.config import ClusterSettings, Settings
from smss.control.gateways import GatewayLoads, GatewayReport
from smss.control.router import Proximity
from smss.errors import InvalidSpec, SmssError
from smss.inventory import NodeInventory
from smss.node.agent import NodeAgent, default_weight_budget
from smss.node.devices import discover
from smss.node.relay import Prober, Relay
from smss.ports import SystemClock

log = logging.getLogger(__name__)

#: EWMA weight of a new RTT sample.
RTT_ALPHA = 0.3
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


def _node_facts(node: str) -> tuple[dict[str, float], str]:
    """The node's resources and its address, as Ray's node table has them."""
    for n in ray.nodes():  # type: ignore[no-untyped-call]
        if n.get("NodeID") == node:
            return dict(n.get("Resources", {})), str(n.get("NodeManagerAddress", ""))
    return {}, ""


def _log_to_stderr(settings: Settings) -> None:
    """An actor's process is a composition root: its log goes to its Ray worker's stderr."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _controller(namespace: str) -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)


# ---------------------------------------------------------------- the controller


class ControllerActor:
    """``smss-controller``: the platform's one controller on a cluster."""

    def __init__(self, settings_bytes: bytes) -> None:
        self._settings_bytes = settings_bytes
        self._settings = decode_settings(settings_bytes)
        _log_to_stderr(self._settings)
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


# ---------------------------------------------------------------- a node agent


class AgentActor:
    """``smss-agent-<node id>``: one node's agent and relay."""

    def __init__(self, node: str, settings_bytes: bytes, secret: str) -> None:
        self._node = node
        self._settings = decode_settings(settings_bytes)
        _log_to_stderr(self._settings)
        self._secret = secret
        self._agent: NodeAgent | None = None
        self._relay: Relay | None = None
        self._hello: msg.AgentHello | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._exits: list[msg.Exit] = []
        self._wake = asyncio.Event()
        self._rtt: dict[str, float] = {}
        self._probers: dict[str, Prober] = {}
        self._seq = 0

    async def start(self) -> bytes:
        if self._hello is None:
            self._hello = await self._start()
        return msg.encode(self._hello)

    async def _start(self) -> msg.AgentHello:
        settings = self._settings
        if settings.allow_faults:
            faults.install(os.environ.get("SMSS_FAULT"))
        resources, ip = await asyncio.to_thread(_node_facts, self._node)
        inventory = _inventory(self._node, resources, settings)
        base = settings.data_dir / "nodes" / self._node[:16]
        agent = NodeAgent(
            base / "logs",
            start_timeout_s=settings.serving.start_timeout_s,
            weight_budget_bytes=settings.weight_cache_bytes or default_weight_budget(inventory),
            spares=settings.spares,
            inventory=inventory,
        )
        agent.set_exit_callback(self._exited)
        self._agent = agent
        # The relay listens on the node's address as Ray was given it, nothing wider.
        ip = ip or ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._relay = Relay(self._secret, agent.socket_of, probe_hook=faults.point("probe.before_reply"))
        _, port = await self._relay.start(ip, 0)
        self._loop_task = asyncio.get_running_loop().create_task(self._loops())
        return msg.AgentHello(self._node, ip, port, inventory)

    def _exited(self, instance_id: str, code: int | None) -> None:
        self._exits.append(msg.Exit(instance_id, code))
        self._wake.set()

    async def _loops(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats())
            group.create_task(self._probes())

    async def _heartbeats(self) -> None:
        cluster = self._settings.cluster
        controller: Any = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cluster.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            assert self._agent is not None
            self._seq += 1
            exits, self._exits = self._exits, []
            try:
                report = msg.AgentReport(
                    self._node,
                    self._seq,
                    tuple(self._agent.resident()),
                    dict(self._agent.weight_cache()),
                    {n: round(v * 1000, 3) for n, v in self._rtt.items()},
                    tuple(exits),
                )
            except Exception:  # never the end of the heartbeats: the node would count as gone
                log.exception("could not build a heartbeat")
                report = msg.AgentReport(self._node, self._seq, exited=tuple(exits))
            try:
                if controller is None:
                    controller = await asyncio.to_thread(_controller, cluster.namespace)
                data = await asyncio.wait_for(controller.agent_heartbeat.remote(msg.encode(report)), 5.0)
                self._peers(msg.decode(data, msg.Peers))
            except Exception as e:
                self._exits = exits + self._exits  # told next time
                controller = None
                log.warning("heartbeat to the controller failed: %s", e)

    def _peers(self, peers: msg.Peers) -> None:
        for node in list(self._probers):
            if node not in peers.relays:
                self._probers.pop(node).close()
                self._rtt.pop(node, None)
        for node, relay in peers.relays.items():
            if node not in self._probers:
                host, _, port = relay.rpartition(":")
                self._probers[node] = Prober(host, int(port), self._secret)

    async def _probes(self) -> None:
        while True:
            await asyncio.sleep(self._settings.cluster.probe_interval_s)
            for node, prober in list(self._probers.items()):
                try:
                    sample = await prober.probe()
                except Exception:  # unreachable, refused, closed mid-probe: unknown until it answers
                    self._rtt.pop(node, None)
                    continue
                old = self._rtt.get(node)
                self._rtt[node] = sample if old is None else old + RTT_ALPHA * (sample - old)

    async def start_instance(self, data: bytes) -> bytes:
        assert self._agent is not None
        request = msg.decode(data, msg.StartRequest)
        try:
            started = await self._agent.start_instance(
                request.spec, Path(request.artifact_dir), request.where
            )
        except SmssError as e:
            return msg.encode(msg.StartAnswer(error=e.message))
        except Exception as e:
            log.exception("start of %s failed", request.spec.name)
            return msg.encode(msg.StartAnswer(error=f"{type(e).__name__} on node {self._node} (see its log)"))
        return msg.encode(msg.StartAnswer(started=started))

    async def stop_instance(self, instance_id: str, grace_s: float) -> None:
        if self._agent is not None:
            await self._agent.stop_instance(instance_id, grace_s)

    async def running(self) -> bytes:
        return msg.encode(msg.Running(tuple(self._agent.running() if self._agent else ())))

    async def evict_weights(self, function: str) -> bool:
        return self._agent.evict_weights(function) if self._agent else False

    async def ping(self) -> str:
        return self._node

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for prober in self._probers.values():
            prober.close()
        if self._relay is not None:
            await self._relay.close()
        if self._agent is not None:
            await self._agent.close()
            self._agent = None


def _inventory(node: str, resources: dict[str, float], settings: Settings) -> NodeInventory:
    """The node's devices, capped by what Ray says the node has (its CPU and memory): a
    node Ray gives no CPU (``num_cpus=0``, e.g. a head kept for the control plane) has
    room for no instance."""
    cpus = resources.get("CPU", 0.0)
    memory = resources.get("memory")
    cap = min(cpus, float(os.cpu_count() or 1)) if cpus > 0 else None
    try:
        inventory = discover(
            node,
            cpus=cap,
            memory_mb=int(memory // (1 << 20)) if memory else None,
            visible=settings.cuda_visible_devices,
        )
    except InvalidSpec:  # Ray counts more memory than the machine reports: the machine's
        inventory = discover(node, cpus=cap, visible=settings.cuda_visible_devices)
    if cpus > 0:
        return inventory
    cpu = inventory.cpu
    none = msgspec.structs.replace(
        cpu,
        capacity=msgspec.structs.replace(cpu.capacity, cpu=0.0),
        total=msgspec.structs.replace(cpu.total, cpu=0.0),
    )
    return msgspec.structs.replace(inventory, devices=(none, *inventory.devices[1:]))


# ---------------------------------------------------------------- a gateway


class GatewayActor:
    """``smss-gateway-<node id>``: HTTP on its node, routing with its own dispatchers."""

    def __init__(self, node: str, settings_bytes: bytes) -> None:
        self._node = node
        self._settings = decode_settings(settings_bytes)
        _log_to_stderr(self._settings)
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
        controller = await asyncio.to_thread(_controller, cluster.namespace)

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
                    controller = await asyncio.to_thread(_controller, namespace)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 10.0)


ControllerRemote = ray.remote(ControllerActor)
AgentRemote = ray.remote(AgentActor)
GatewayRemote = ray.remote(GatewayActor)
